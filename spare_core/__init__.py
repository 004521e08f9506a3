"""spare_core: make text-to-image diffusion models forget (SPARE, SalUn, SISS, ESD).

Pure PyTorch; never imports ComfyUI. See README for the API in ten lines.

The public names below are imported on first use (PEP 562), so ``import spare_core`` and the
``spare`` command's argument checks and ``--help`` do not pay torch's start-up time.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "adapter": ("LoRADelta", "MaskedFullDelta", "UnlearnAdapter", "init_masked_full",
                "init_sparse_lora"),
    "denoiser": ("Denoiser", "DiffusersDenoiser"),
    "conditioning": ("Context",),
    "process": ("ForwardProcess",),
    "families": ("denoiser_from_pipeline", "load_denoiser"),
    "families.sdxl": ("SDXLDenoiser",),
    "families.sd3": ("SD3Denoiser",),
    "families.flux": ("FluxDenoiser",),
    "export": ("to_comfy_lora", "to_diffusers_lora"),
    "files": ("AdapterFileError", "ModelMismatchError", "load_adapter", "model_fingerprint",
              "save_adapter"),
    "loop": ("NonFiniteLoss", "UnlearnCancelled", "UnlearnConfig", "UnlearnResult", "unlearn"),
    "objectives": ("OBJECTIVES", "make_objective"),
    "saliency": ("Saliency", "compute_saliency", "load_saliency", "save_saliency"),
    "sampling": ("q_sample", "sample"),
    "sparse_lora": ("sparse_lora_from_saliency",),
    "spare": ("SpareResult", "spare_unlearn"),
    "data_task": ("DataTask", "load_image_folder"),
    "methods": ("METHODS", "run_method"),
    "multi_concept": ("ConceptJobError", "unlearn_concepts"),
    "fusion": ("FUSIONS", "fuse_least_squares", "fuse_sum", "fuse_ties"),
    "tasks": ("ConceptTask", "PoolConfig"),
    "timesteps": ("ConceptSampler", "UniformSampler", "make_timestep_sampler"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'spare_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .adapter import (LoRADelta, MaskedFullDelta, UnlearnAdapter, init_masked_full,  # noqa: F401
                          init_sparse_lora)
    from .data_task import DataTask, load_image_folder  # noqa: F401
    from .conditioning import Context  # noqa: F401
    from .denoiser import Denoiser, DiffusersDenoiser  # noqa: F401
    from .families import denoiser_from_pipeline, load_denoiser  # noqa: F401
    from .families.flux import FluxDenoiser  # noqa: F401
    from .families.sd3 import SD3Denoiser  # noqa: F401
    from .families.sdxl import SDXLDenoiser  # noqa: F401
    from .process import ForwardProcess  # noqa: F401
    from .export import to_comfy_lora, to_diffusers_lora  # noqa: F401
    from .files import (AdapterFileError, ModelMismatchError, load_adapter,  # noqa: F401
                        model_fingerprint, save_adapter)
    from .loop import (NonFiniteLoss, UnlearnCancelled, UnlearnConfig, UnlearnResult,  # noqa: F401
                       unlearn)
    from .methods import METHODS, run_method  # noqa: F401
    from .multi_concept import ConceptJobError, unlearn_concepts  # noqa: F401
    from .fusion import FUSIONS, fuse_least_squares, fuse_sum, fuse_ties  # noqa: F401
    from .objectives import OBJECTIVES, make_objective  # noqa: F401
    from .saliency import Saliency, compute_saliency, load_saliency, save_saliency  # noqa: F401
    from .sampling import q_sample, sample  # noqa: F401
    from .spare import SpareResult, spare_unlearn  # noqa: F401
    from .sparse_lora import sparse_lora_from_saliency  # noqa: F401
    from .tasks import ConceptTask, PoolConfig  # noqa: F401
    from .timesteps import ConceptSampler, UniformSampler, make_timestep_sampler  # noqa: F401
