"""SparseLoRAInit (saliency -> sparse LoRA) and ApplyUnlearnAdapter (adapter -> patched MODEL)."""
from __future__ import annotations

import logging

from spare_core.adapter import UnlearnAdapter
from spare_core.families.unet import adaptable_modules
from spare_core.localize import select_modules
from spare_core.recipes import LOCALIZATIONS, RANKED, RECIPES, UNET_LOCALIZATIONS
from spare_core.saliency import Saliency
from spare_core.sparse_lora import sparse_lora_on

from . import comfy_bridge as bridge
from .concept_pool import carried, carry
from .common import ADAPTER, CATEGORY, MODULE_FRACTION_INPUT, SALIENCY, SEED

SPARE = RECIPES["spare"]

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
    """LoRA of rank ``rank`` on the modules ``module_selection`` picks (SPARE stage 1:
    spare_core.localize): the top ``module_fraction`` of a SALIENCY's ranking (saliency,
    objective, contrastive: connect ComputeSaliency with that ranking), as many random modules,
    the projections that read the text (text_kv: cross-attention to_k / to_v, a DiT's text
    stream), or every module (all). With ``mask_fraction`` < 1 each update is also masked to
    that share of its most salient weight elements. Starts as the identity (B = 0)."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = (ADAPTER,)
    RETURN_NAMES = ("adapter",)
    FUNCTION = "init"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to adapt (left unchanged)."}),
                "module_selection": (list(UNET_LOCALIZATIONS), {
                    "default": SPARE.hparams["module_selection"],
                    "tooltip": "Which modules the LoRA adapts; the ranked ones (saliency, "
                               "objective, contrastive) need the SALIENCY input computed with "
                               "that ranking."}),
                "module_fraction": MODULE_FRACTION_INPUT,
                "rank": ("INT", {"default": SPARE.hparams["rank"], "min": 1, "max": 256,
                                 "tooltip": "LoRA rank r."}),
                "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.01,
                                    "tooltip": "LoRA alpha; the update is scaled by alpha / "
                                               "rank. 0 = the rank (scale 1)."}),
                "mask_fraction": ("FLOAT", {
                    "default": 1.0, "min": 0.001, "max": 1.0, "step": 0.001,
                    "tooltip": "Share of each adapted weight's elements kept by the saliency "
                               "mask: 1 = a dense low-rank update; below 1 needs a SALIENCY "
                               "with element_scores on."}),
                "seed": SEED,
            },
            "optional": {
                "saliency": (SALIENCY, {"tooltip": "Output of ComputeSaliency (ranked module "
                                                   "selections and element masks)."}),
            },
        }

    def init(self, model, module_selection: str, module_fraction: float, rank: int,
             alpha: float, mask_fraction: float, seed: int,
             saliency: Saliency | None = None) -> tuple[UnlearnAdapter]:
        if module_selection not in LOCALIZATIONS:
            raise ValueError(f"module_selection must be one of {list(UNET_LOCALIZATIONS)}, got "
                             f"{module_selection!r}")
        if module_selection not in UNET_LOCALIZATIONS:
            raise ValueError(f"module_selection {module_selection!r} adapts the CLIP text "
                             "encoder, which the nodes do not carry into an adapter yet: train it "
                             "with the API or the CLI (spare unlearn --model PIPELINE_FOLDER "
                             "--module-selection text_encoder --format comfy) and load that LoRA "
                             "with the stock LoraLoader (its CLIP input), or choose text_kv to "
                             "edit the UNet's text projections")
        if not 0.0 < module_fraction <= 1.0:
            raise ValueError(f"module_fraction must be in (0, 1], got {module_fraction}")
        if not 0.0 < mask_fraction <= 1.0:
            raise ValueError(f"mask_fraction must be in (0, 1] (1 = dense update), got "
                             f"{mask_fraction}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0 (0 = the rank, scale 1), got {alpha}")
        masked = mask_fraction < 1.0
        if (module_selection in RANKED or masked) and (
                not isinstance(saliency, Saliency) or not saliency.modules):
            why = (f"module_selection {module_selection!r} ranks modules by saliency"
                   if module_selection in RANKED else f"mask_fraction {mask_fraction} masks "
                   "weight elements by saliency")
            raise ValueError(f"{why}: connect ComputeSaliency's output to the saliency input "
                             "(or choose text_kv, random or all with mask_fraction 1)")
        if module_selection in RANKED:
            made = saliency.meta.get("ranking", "saliency")
            if made != module_selection:
                raise ValueError(f"the SALIENCY was ranked by {made!r} but module_selection is "
                                 f"{module_selection!r}: set ComputeSaliency's ranking to "
                                 f"{module_selection!r}")
        if masked and module_selection == "contrastive":
            raise ValueError("contrastive saliency keeps one score per module, so it cannot "
                             "mask weight elements: set mask_fraction 1, or rank by saliency or "
                             "objective (with element_scores on in Compute Saliency)")
        if masked and not saliency.has_elements:
            raise ValueError(f"mask_fraction {mask_fraction} masks weight elements, but this "
                             "SALIENCY kept one score per module: turn on element_scores in "
                             "Compute Saliency, or set mask_fraction 1")
        if saliency is not None:
            check_saliency_fits(model, saliency)
        net = bridge.diffusion_model(model)
        modules = select_modules(net, module_selection,
                                 saliency=saliency if module_selection in RANKED else None,
                                 fraction=module_fraction, seed=seed)
        with bridge.autograd_enabled():  # trainable tensors, not inference tensors
            adapter = sparse_lora_on(net, modules, rank=rank, alpha=alpha or None,
                                     saliency=saliency, mask_fraction=mask_fraction,
                                     seed=seed, selection=module_selection, clamp_rank=True)
        adapter.meta.update(method="spare", backend="comfyui",
                            concept=saliency.concept if saliency is not None else "",
                            base_model_fingerprint=bridge.fingerprint(model, adapter.names))
        carry(adapter, carried(saliency))  # the saliency's concept images, for the training
        return (adapter,)


STRENGTH_TIP = ("Multiplier of the trained update: 1 = the erasure as trained; between 0 and 1 a "
                "partial erasure (0 returns the input MODEL). Above 1 the adapter extrapolates "
                "past what was trained: a stronger push away from the concept that no training "
                "step checked, so look for damage to other prompts. Below 0 it pushes towards "
                "the concept. A native file saved with its own strength (the API's "
                "adapter.strength) keeps it: the patch is the file's strength times this one.")


class ApplyUnlearnAdapter:
    """A clone of MODEL with the adapter's weight update as ComfyUI patches (``W + strength *
    delta``); the input MODEL and every other clone of it are left unchanged. Wire the output
    into a KSampler like any MODEL, or into the stock CheckpointSave to ship the erased model as
    one checkpoint. ``strength`` above 1 extrapolates past the trained update. On a MODEL stored
    in fp8 (UNETLoader weight_dtype fp8_e4m3fn) the update is added after ComfyUI's cast, at
    compute precision, as training computed it (W + delta rounded back to fp8 would keep little
    of it); CheckpointSave does not bake such an update: save the adapter, or load the model at
    weight_dtype default to bake it."""

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
        if adapter.root != "unet":
            raise ValueError("this adapter edits the CLIP text encoder, which ApplyUnlearnAdapter "
                             "cannot patch (it takes no CLIP): save it with SaveUnlearnAdapter and "
                             "load that LoRA with the stock LoraLoader (MODEL and CLIP)")
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
        clone = bridge.patched_clone(model, adapter, strength)
        if getattr(clone, "weight_wrapper_patches", None):
            log.info("ApplyUnlearnAdapter: %d fp8-stored layers get the update after ComfyUI's "
                     "cast (weight wrappers); CheckpointSave does not bake those: save the "
                     "adapter, or load the model at weight_dtype default to bake it",
                     len(clone.weight_wrapper_patches))
        return (clone,)
