"""SparseLoRAInit (saliency -> sparse LoRA) and ApplyUnlearnAdapter (adapter -> patched MODEL)."""
from __future__ import annotations

import logging

from spare_core.adapter import UnlearnAdapter
from spare_core.families.unet import adaptable_modules
from spare_core.saliency import Saliency
from spare_core.sparse_lora import sparse_lora_from_saliency

from . import comfy_bridge as bridge
from .common import ADAPTER, CATEGORY, SALIENCY, SEED

log = logging.getLogger(__name__)


def require_adapter(adapter) -> UnlearnAdapter:
    if not isinstance(adapter, UnlearnAdapter):
        raise ValueError("the adapter input is empty: connect SparseLoRAInit, SelfDistillUnlearn "
                         "or LoadUnlearnAdapter")
    return adapter


def check_saliency_fits(model, saliency: Saliency) -> None:
    """ValueError unless every saliency module exists in MODEL with the same weight shape."""
    mods = adaptable_modules(bridge.diffusion_model(model))
    for name, shape in saliency.shapes.items():
        if name not in mods or tuple(mods[name].weight.shape) != tuple(shape):
            raise ValueError(f"the SALIENCY was computed on a model with different layers ({name!r} "
                             "does not match); connect the same MODEL to ComputeSaliency and "
                             "SparseLoRAInit")
    want = saliency.meta.get("model_fingerprint")
    if want and want != bridge.fingerprint(model):
        log.warning("SparseLoRAInit: the SALIENCY was computed on other weights than this MODEL "
                    "(same layers); the adapter is placed by that other model's saliency")


class SparseLoRAInit:
    """LoRA of rank ``rank`` on the ``top_k`` most salient modules (module-level sparsity); with
    ``sparsity`` > 0 each module's update is also masked to its most salient weight elements
    (element-level sparsity: 0.9 keeps the top 10%). Starts as the identity (B = 0)."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = (ADAPTER,)
    RETURN_NAMES = ("adapter",)
    FUNCTION = "init"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the saliency was computed on."}),
                "saliency": (SALIENCY, {"tooltip": "Output of ComputeSaliency."}),
                "rank": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "LoRA rank r."}),
                "alpha": ("FLOAT", {"default": 4.0, "min": 0.01, "max": 1024.0, "step": 0.01,
                                    "tooltip": "LoRA alpha; the update is scaled by alpha / rank."}),
                "sparsity": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.999, "step": 0.001,
                                       "tooltip": "Share of each adapted weight masked out by "
                                                  "saliency: 0 = dense low-rank update."}),
                "seed": SEED,
            }
        }

    def init(self, model, saliency: Saliency, rank: int, alpha: float, sparsity: float,
             seed: int) -> tuple[UnlearnAdapter]:
        if not isinstance(saliency, Saliency) or not saliency.modules:
            raise ValueError("the saliency input is empty: connect ComputeSaliency's output")
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (0 = dense update), got {sparsity}")
        if sparsity > 0.0 and not saliency.has_elements:
            raise ValueError(f"sparsity {sparsity} masks weight elements, but this SALIENCY kept "
                             "one score per module: turn on element_scores in Compute Saliency, "
                             "or set sparsity 0")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}; alpha = rank gives scale 1")
        check_saliency_fits(model, saliency)
        top_k = int(saliency.meta.get("top_k", "32") or 32)
        with bridge.autograd_enabled():  # trainable tensors, not inference tensors
            adapter = sparse_lora_from_saliency(
                bridge.diffusion_model(model), saliency, rank=rank, alpha=alpha, top_modules=top_k,
                mask_fraction=None if sparsity == 0.0 else 1.0 - sparsity, mask_scope="layer",
                seed=seed)
        adapter.meta.update(method="spare", backend="comfyui", sparsity=repr(float(sparsity)),
                            base_model_fingerprint=bridge.fingerprint(model, adapter.names))
        return (adapter,)


STRENGTH_TIP = ("Multiplier of the trained update: 1 = the erasure as trained; between 0 and 1 a "
                "partial erasure (0 returns the input MODEL). Above 1 the adapter extrapolates "
                "past what was trained: a stronger push away from the concept that no training "
                "step checked, so look for damage to other prompts. Below 0 it pushes towards "
                "the concept.")


class ApplyUnlearnAdapter:
    """A clone of MODEL with the adapter's weight update as ComfyUI patches (``W + strength *
    delta``); the input MODEL and every other clone of it are left unchanged. Wire the output
    into a KSampler like any MODEL, or into the stock CheckpointSave to ship the erased model as
    one checkpoint. ``strength`` above 1 extrapolates past the trained update."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the adapter was trained on."}),
                "adapter": (ADAPTER, {"tooltip": "A trained adapter."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.01,
                                       "tooltip": STRENGTH_TIP}),
            }
        }

    def apply(self, model, adapter: UnlearnAdapter, strength: float) -> tuple:
        adapter = require_adapter(adapter)
        try:
            adapter.check_compatible(bridge.diffusion_model(model))
        except ValueError as e:
            raise ValueError(f"{e}; connect the checkpoint the adapter was trained on") from e
        want = adapter.meta.get("base_model_fingerprint")
        if want and want != bridge.fingerprint(model, adapter.names):
            log.warning("ApplyUnlearnAdapter: the adapter was trained on other weights than this "
                        "MODEL (same layers); applying it anyway")
        if strength == 0.0:
            return (model,)
        return (bridge.patched_clone(model, adapter.merged(), strength),)
