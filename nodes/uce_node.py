"""UCEErase: UCE's closed-form cross-attention edit as an UNLEARN_ADAPTER (no training)."""
from __future__ import annotations

from spare_core.recipes import RECIPES
from spare_core.tasks import concept_pairs
from spare_core.uce import uce_edit, uce_modules

from . import comfy_bridge as bridge
from .common import ADAPTER, CATEGORY, parse_prompts, require_text

UCE = RECIPES["uce"].hparams


class UCEErase:
    """UCE (Gandikota et al., WACV 2024): edits every cross-attention key/value projection in
    closed form so that each concept reads as its guide while the preserved prompts keep what
    they read; several concepts (one per line) in one solve (1.3 s for one concept on an
    SD1.5-sized UNet on one CPU thread). The
    adapter feeds Apply / Save like any other. SD1.x, SD2.x and SDXL (UNets with
    cross-attention); SD3 and Flux are refused."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = (ADAPTER,)
    RETURN_NAMES = ("adapter",)
    FUNCTION = "erase"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to edit (SD1.x, SD2.x or SDXL)."}),
                "clip": ("CLIP", {"tooltip": "Its text encoder."}),
                "concepts": ("STRING", {"default": "Van Gogh style", "multiline": True,
                                        "tooltip": "Concepts to erase, one per line."}),
                "guides": ("STRING", {"default": "a painting", "multiline": True,
                                      "tooltip": "What each concept becomes: one line per concept, "
                                                 "or one line for all (empty: the empty prompt)."}),
                "preserve": ("STRING", {"default": "a photo of a cat\nClaude Monet style",
                                        "multiline": True,
                                        "tooltip": "Prompts that must keep their meaning, one per "
                                                   "line."}),
                "preserve_scale": ("FLOAT", {"default": UCE["preserve_scale"], "min": 0.0, "max": 100.0, "step": 0.1,
                                             "tooltip": "Weight of the preserved prompts."}),
                "lamb": ("FLOAT", {"default": UCE["lamb"], "min": 0.001, "max": 100.0, "step": 0.01,
                                   "tooltip": "Pull towards the original weights where the "
                                              "prompts say nothing."}),
            },
        }

    def erase(self, model, clip, concepts: str, guides: str, preserve: str,
              preserve_scale: float = UCE["preserve_scale"], lamb: float = UCE["lamb"]) -> tuple:
        require_text(concepts, "concepts", "a concept to erase per line, e.g. 'Van Gogh style'")
        pairs = concept_pairs("\n".join(parse_prompts(concepts)), "\n".join(parse_prompts(guides)))
        keep = parse_prompts(preserve)
        bridge.check_supported(model)
        uce_modules(bridge.diffusion_model(model))  # refuses SD3/Flux before CLIP runs
        prompts = [p for pair in pairs for p in pair] + keep
        with bridge.autograd_enabled():
            den = bridge.ComfyDenoiser(model, clip, 512, 512, prompts=prompts)  # CLIP first
            bridge.load_for_compute(model)
            adapter = uce_edit(den, pairs, keep, erase_scale=UCE["erase_scale"],
                               preserve_scale=preserve_scale, lamb=lamb)
        adapter.meta.update(backend="comfyui",
                            base_model_fingerprint=bridge.fingerprint(model, adapter.names))
        return (adapter,)
