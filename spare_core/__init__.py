"""spare_core: make text-to-image diffusion models forget (SPARE, SalUn, SISS, ESD).

Pure PyTorch; never imports ComfyUI. See README for the API in ten lines.
"""
__version__ = "0.1.0"

from .adapter import LoRADelta, MaskedFullDelta, UnlearnAdapter, init_masked_full, init_sparse_lora
from .denoiser import Denoiser, DiffusersDenoiser
from .export import to_comfy_lora, to_diffusers_lora
from .files import (AdapterFileError, ModelMismatchError, load_adapter, model_fingerprint,
                    save_adapter)
from .loop import NonFiniteLoss, UnlearnCancelled, UnlearnConfig, UnlearnResult, unlearn
from .objectives import OBJECTIVES, make_objective
from .saliency import Saliency, compute_saliency, load_saliency, save_saliency
from .sampling import q_sample, sample
from .sparse_lora import sparse_lora_from_saliency
from .spare import SpareResult, spare_unlearn
from .data_task import DataTask, load_image_folder
from .methods import METHODS, run_method
from .tasks import ConceptTask, PoolConfig
from .timesteps import ConceptSampler, UniformSampler, make_timestep_sampler

__all__ = [
    "AdapterFileError", "ConceptSampler", "ConceptTask", "DataTask", "METHODS", "Denoiser", "DiffusersDenoiser",
    "LoRADelta", "MaskedFullDelta", "ModelMismatchError", "NonFiniteLoss", "OBJECTIVES",
    "PoolConfig", "Saliency", "SpareResult", "UniformSampler", "UnlearnAdapter",
    "UnlearnCancelled", "UnlearnConfig", "UnlearnResult", "compute_saliency", "init_masked_full",
    "init_sparse_lora", "load_adapter", "load_image_folder", "run_method", "load_saliency", "make_objective",
    "make_timestep_sampler", "model_fingerprint", "q_sample", "sample", "save_adapter",
    "save_saliency", "sparse_lora_from_saliency", "spare_unlearn", "to_comfy_lora",
    "to_diffusers_lora", "unlearn",
]
