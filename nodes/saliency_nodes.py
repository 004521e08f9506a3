"""ComputeSaliency (SPARE stage 1: where the concept lives) and its preview chart."""
from __future__ import annotations

import torch

from spare_core.saliency import Saliency, check_gradient_storage, compute_saliency
from spare_core.sampling import sample
from spare_core.sparse_lora import IO_CONVS

from . import comfy_bridge as bridge
from .chart import bar_chart, drawn, to_image_tensor
from .common import CATEGORY, MEMORY_INPUTS, SALIENCY, SEED, parse_prompts, require_text, size_input


class ComputeSaliency:
    """Generates ``samples`` images of the concept with the model itself, then accumulates the
    gradient of the denoising loss on them w.r.t. every Linear/Conv2d weight (SalUn's weight
    saliency). ``top_k`` modules with the highest mean saliency are the ones SparseLoRAInit adapts."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = (SALIENCY,)
    RETURN_NAMES = ("saliency",)
    FUNCTION = "compute"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to analyse: SD1.x, SD2.x, "
                                               "SDXL, SD3 or Flux."}),
                "clip": ("CLIP", {"tooltip": "Its text encoder."}),
                "concept": ("STRING", {"default": "Van Gogh style", "multiline": True,
                                       "tooltip": "The concept to forget; several erased "
                                                  "together: one per line."}),
                "samples": ("INT", {"default": 8, "min": 1, "max": 512,
                                    "tooltip": "Images of the concept the gradients are summed over."}),
                "top_k": ("INT", {"default": 32, "min": 1, "max": 4096,
                                  "tooltip": "How many of the most salient Linear/Conv2d modules to adapt."}),
                "seed": SEED,
            },
            "optional": {
                "width": size_input(),
                "height": size_input(),
                "sample_steps": ("INT", {"default": 25, "min": 1, "max": 1000,
                                         "tooltip": "DDIM steps per generated concept image."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance of the generated images "
                                             "(Flux-dev: 1.0, its guidance is distilled)."}),
                **MEMORY_INPUTS,
                "element_scores": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Keep a score per weight (float32, in system RAM) so that "
                               "SparseLoRAInit can mask elements (sparsity > 0). Off: one score "
                               "per module only, no float32 copy of the UNet."}),
            },
        }

    def compute(self, model, clip, concept: str, samples: int, top_k: int, seed: int,
                width: int = 512, height: int = 512, sample_steps: int = 25,
                cfg: float = 7.5, micro_batch: int = 1, gradient_checkpointing: bool = True,
                element_scores: bool = False) -> tuple[Saliency]:
        require_text(concept, "concept prompt", "the concept to forget, e.g. 'Van Gogh style'")
        concepts = parse_prompts(concept)  # several: one per line, erased together
        concept = "\n".join(concepts)
        if samples < 1 or top_k < 1 or sample_steps < 1 or micro_batch < 1:
            raise ValueError("samples, top_k, sample_steps and micro_batch must be >= 1")
        bridge.check_inputs(model, clip, width, height)
        check_gradient_storage(bridge.diffusion_model(model))
        with bridge.autograd_enabled():
            den = bridge.ComfyDenoiser(model, clip, width, height, prompts=concepts)  # CLIP first
            bridge.load_for_compute(model)
            prompts = [c for c in concepts for _ in range(samples)]  # `samples` per concept
            bar = bridge.Progress(sample_steps + len(prompts))
            latents = sample(den, prompts, steps=sample_steps, guidance=cfg,
                             method="ddim", generator=torch.Generator().manual_seed(seed),
                             batch_size=micro_batch, callback=bar.phase(0, sample_steps))
            sal = compute_saliency(den, prompts, latents, seed=seed, batch_size=micro_batch,
                                   element_scores=element_scores,
                                   gradient_checkpointing=gradient_checkpointing,
                                   progress=bar.phase(sample_steps, len(prompts)),
                                   should_stop=bridge.should_stop)
        sal.meta.update(top_k=str(top_k), model_fingerprint=bridge.fingerprint(model),
                        size=f"{width}x{height}")
        return (sal,)


class SaliencyPreview:
    """Bar chart of per-module saliency (highest first); the ``top_k`` modules SparseLoRAInit
    adapts are orange, the UNet's input/output convolutions grey (SparseLoRAInit never adapts
    them, however salient: spare_core.sparse_lora.IO_CONVS)."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("chart",)
    FUNCTION = "preview"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "saliency": (SALIENCY, {"tooltip": "Output of ComputeSaliency."}),
                "reduce": (["mean", "max"], {"default": "mean",
                                             "tooltip": "Per-module score: mean or max of |grad|."}),
                "max_modules": ("INT", {"default": 40, "min": 1, "max": 500,
                                        "tooltip": "How many modules to draw."}),
            }
        }

    def preview(self, saliency: Saliency, reduce: str, max_modules: int) -> tuple[torch.Tensor]:
        if not isinstance(saliency, Saliency) or not saliency.modules:
            raise ValueError("the saliency input is empty: connect ComputeSaliency's output")
        top_k = int(saliency.meta.get("top_k", "0") or 0)
        scores = saliency.module_scores(reduce)
        # SparseLoRAInit ranks by mean whatever the chart shows
        chosen = set(saliency.top_modules(count=top_k, exclude=IO_CONVS)) if top_k > 0 else set()
        excluded = {name for name in scores if name in IO_CONVS}
        shown = {name for name, _ in drawn(scores, max_modules)}
        title = self.caption(saliency.concept, reduce, len(scores), len(chosen),
                             bool(excluded & shown))
        pixels = bar_chart(scores, chosen, excluded=excluded, title=title, max_bars=max_modules)
        return (to_image_tensor(pixels),)

    @staticmethod
    def caption(concept: str, reduce: str, modules: int, adapted: int, grey_shown: bool) -> str:
        concept = concept if len(concept) <= 40 else concept[:37] + "..."
        text = f"'{concept}': {reduce} |grad| of {modules} modules. orange: the {adapted} adapted"
        if grey_shown:
            text += "; grey: input/output conv, never adapted"
        return text
