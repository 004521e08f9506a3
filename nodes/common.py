"""Names and small helpers shared by the node classes (no ComfyUI imports here)."""
from __future__ import annotations

SALIENCY = "SALIENCY"
"""Custom type: a :class:`spare_core.Saliency`; ``meta`` carries its ``ranking`` and the model
fingerprint."""

ADAPTER = "UNLEARN_ADAPTER"
"""Custom type: a :class:`spare_core.UnlearnAdapter` (detached; never attached to a MODEL)."""

CATEGORY = "SPARE unlearning"

SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                "tooltip": "Seed of the generated latents, noise and timesteps (same seed, same result)."})


MEMORY_INPUTS = {
    "micro_batch": ("INT", {"default": 1, "min": 1, "max": 64,
                            "tooltip": "Images through the UNet at once while generating, "
                                       "computing saliency and training (a training step's "
                                       "batch is split into micro-batches of this size, "
                                       "gradients accumulated): raise it on a large card for "
                                       "speed."}),
    "gradient_checkpointing": ("BOOLEAN", {
        "default": True,
        "tooltip": "Recompute activations during backward instead of keeping them: far less "
                   "memory (SD1.5 at 512 px fits 6 GB) for about a quarter more time per step."}),
}
"""Optional inputs of the nodes that run the UNet with gradients (memory controls)."""


def prompts_input(default: str, tooltip: str) -> tuple:
    """A multiline STRING of prompts (one per line)."""
    return ("STRING", {"default": default, "multiline": True, "tooltip": tooltip})


SURROGATE_DEFAULT = "a painting"
PRESERVE_DEFAULT = "a photo of a cat\na landscape painting"
"""The surrogate and preserved prompts every node that takes them starts with."""


def size_input(default: int = 0) -> tuple:
    return ("INT", {"default": default, "min": 0, "max": 2048, "step": 8,
                    "tooltip": "Image size of the latents generated for the concept (pixels); "
                               "0 = the model family's (SD1.x/SD2.x 512; SDXL, SD3 and Flux "
                               "1024)."})


def parse_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    lines = (line.strip() for line in (text or "").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def require_text(value: str, what: str, example: str) -> str:
    """The stripped text, or ValueError naming the fix."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} is empty: type {example}")
    return value.strip()


def _recipe():
    from spare_core.recipes import RECIPES
    return RECIPES["spare"]


MODULE_FRACTION_INPUT = ("FLOAT", {
    "default": _recipe().hparams["module_fraction"], "min": 0.01, "max": 1.0, "step": 0.01,
    "tooltip": "Share of the candidate modules a ranked or random selection adapts."})

CFG_INPUT = ("FLOAT", {
    "default": -1.0, "min": -1.0, "max": 30.0, "step": 0.1,
    "tooltip": "Classifier-free guidance of the images generated for training; -1 = the model "
               "family's (SD1.x/SD2.x 7.5, SDXL and SD3 7.0, Flux 1.0: its guidance is "
               "distilled)."})


def node_size(model, width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` in pixels, each 0 replaced by the model family's training size."""
    from spare_core.recipes import image_size

    from . import comfy_bridge as bridge
    if width > 0 and height > 0:
        return int(width), int(height)
    side = image_size(bridge.model_family(model))
    return int(width) or side, int(height) or side


def node_guidance(cfg: float, model) -> float:
    """``cfg``, or the model family's guidance when it is negative (the -1 default)."""
    from spare_core.recipes import pool_guidance

    from . import comfy_bridge as bridge
    return pool_guidance(bridge.model_family(model)) if cfg < 0 else float(cfg)
