"""ComputeSaliency (SPARE stage 1: where the concept lives) and its preview chart."""
from __future__ import annotations

import torch

from spare_core.localize import check_ranking_inputs, ranking_saliency
from spare_core.recipes import RANKED, RECIPES
from spare_core.saliency import Saliency
from spare_core.sampling import sample
from spare_core.sparse_lora import IO_CONVS
from spare_core.tasks import ConceptTask

from . import comfy_bridge as bridge
from .chart import bar_chart, drawn, to_image_tensor
from .concept_pool import SampledPool, carry
from .common import (CATEGORY, CFG_INPUT, MEMORY_INPUTS, MODULE_FRACTION_INPUT, PRESERVE_DEFAULT,
                     SALIENCY, SEED, SURROGATE_DEFAULT, node_guidance, parse_prompts,
                     node_size, prompts_input, require_text, size_input)

SPARE = RECIPES["spare"]
DEFAULT_RANKING = (SPARE.hparams["module_selection"]
                   if SPARE.hparams["module_selection"] in RANKED else "saliency")


class ComputeSaliency:
    """Generates ``samples`` images of each concept with the model itself, then ranks every
    Linear/Conv2d module by the gradient of a loss on them (``ranking``): ``saliency`` the plain
    denoising loss (SalUn's weight saliency); ``objective`` the pull of the concept's prediction
    toward the surrogate's (SPARE's first training step; needs ``surrogate``); ``contrastive``
    the concept's saliency over the preserved prompts' (needs ``preserve``). SparseLoRAInit adapts
    the top modules when its module selection is this ranking."""

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
                "samples": ("INT", {"default": SPARE.num_samples, "min": 1, "max": 512,
                                    "tooltip": "Images generated per concept, the gradients are "
                                               "summed over them. They travel on the SALIENCY "
                                               "(in memory, never saved): Self-Distill Unlearn "
                                               "trains on them instead of sampling the concept "
                                               "again when it asks for no more (pool_size) with "
                                               "the same pool_steps, cfg, size and MODEL."}),
                "ranking": (list(RANKED), {
                    "default": DEFAULT_RANKING,
                    "tooltip": "Which loss ranks the modules: saliency (plain denoising loss), "
                               "objective (the pull toward the surrogate: SPARE's first step), "
                               "contrastive (concept over preserved prompts)."}),
                "seed": SEED,
            },
            "optional": {
                "surrogate": prompts_input(SURROGATE_DEFAULT,
                                           "ranking objective: what the concept turns into (one "
                                           "per concept line, or one for all; empty = "
                                           "unconditional)."),
                "preserve": prompts_input(PRESERVE_DEFAULT,
                                          "ranking contrastive: prompts to keep, one per line."),
                "width": size_input(),
                "height": size_input(),
                "sample_steps": ("INT", {"default": SPARE.sample_steps, "min": 1, "max": 1000,
                                         "tooltip": "DDIM steps per generated concept image."}),
                "cfg": CFG_INPUT,
                **MEMORY_INPUTS,
                "element_scores": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Keep a score per weight (float32, in system RAM: 4 bytes per "
                               "weight) so that SparseLoRAInit can mask elements (mask_fraction "
                               "< 1). Off: one score per module only, each micro-batch's gradient "
                               "reduced at once (no per-weight buffer anywhere)."}),
            },
        }

    def compute(self, model, clip, concept: str, samples: int, ranking: str, seed: int,
                surrogate: str = SURROGATE_DEFAULT, preserve: str = "", width: int = 0,
                height: int = 0, sample_steps: int = SPARE.sample_steps, cfg: float = -1.0,
                micro_batch: int = 1, gradient_checkpointing: bool = True,
                element_scores: bool = False) -> tuple[Saliency]:
        require_text(concept, "concept prompt", "the concept to forget, e.g. 'Van Gogh style'")
        concepts = parse_prompts(concept)  # several: one per line, erased together
        concept = "\n".join(concepts)
        if samples < 1 or sample_steps < 1 or micro_batch < 1:
            raise ValueError("samples, sample_steps and micro_batch must be >= 1")
        if ranking not in RANKED:
            raise ValueError(f"ranking must be one of {list(RANKED)}, got {ranking!r}")
        task = ConceptTask(concept, "\n".join(parse_prompts(surrogate)), parse_prompts(preserve))
        task.validate()
        check_ranking_inputs(ranking, task.preserve, element_scores)
        width, height = node_size(model, width, height)
        bridge.check_inputs(model, clip, width, height)
        guidance = node_guidance(cfg, model)
        with bridge.autograd_enabled():
            prompts = task.sample_prompts(samples)  # `samples` per concept
            surrogates = [s for _, s in task.pairs for _ in range(samples)]
            needed = [*concepts, *(surrogates if ranking == "objective" else []),
                      *(task.preserve if ranking == "contrastive" else [])]
            den = bridge.ComfyDenoiser(model, clip, width, height,
                                       prompts=list(dict.fromkeys(needed)))  # CLIP first
            bridge.load_for_compute(model)
            passes = 2 if ranking == "contrastive" else 1
            bar = bridge.Progress(sample_steps + passes * len(prompts))
            latents = sample(den, prompts, steps=sample_steps, guidance=guidance,
                             method="ddim", generator=torch.Generator().manual_seed(seed),
                             batch_size=micro_batch, callback=bar.phase(0, sample_steps))
            done = [0]

            def progress(i: int, n: int) -> None:  # one bar over the one or two passes
                bar.phase(sample_steps, passes * n)(min(done[0] + i, passes * n), passes * n)
                if i == n:
                    done[0] += n

            sal = ranking_saliency(den, ranking, prompts, latents, surrogates=surrogates,
                                   preserve=task.preserve, element_scores=element_scores,
                                   seed=seed, batch_size=micro_batch,
                                   gradient_checkpointing=gradient_checkpointing,
                                   progress=progress, should_stop=bridge.should_stop)
        checkpoint = bridge.fingerprint(model)
        sal.meta.update(ranking=ranking, model_fingerprint=checkpoint, size=f"{width}x{height}")
        # SelfDistillUnlearn trains on these images when it would sample the same ones
        carry(sal, SampledPool(latents.detach().cpu(), tuple(concepts), samples, sample_steps,
                               float(guidance), (width, height),
                               bridge.sampling_identity(model, checkpoint)))
        return (sal,)


class SaliencyPreview:
    """Bar chart of per-module saliency (highest first); the top ``module_fraction`` of the
    modules, the ones SparseLoRAInit adapts with a ranked selection at that fraction, are orange,
    the network's input/output layers grey (never adapted, however salient:
    spare_core.sparse_lora.IO_CONVS)."""

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
            },
            "optional": {"module_fraction": MODULE_FRACTION_INPUT},
        }

    def preview(self, saliency: Saliency, reduce: str, max_modules: int,
                module_fraction: float = SPARE.hparams["module_fraction"]) -> tuple[torch.Tensor]:
        if not isinstance(saliency, Saliency) or not saliency.modules:
            raise ValueError("the saliency input is empty: connect ComputeSaliency's output")
        if not 0.0 < module_fraction <= 1.0:
            raise ValueError(f"module_fraction must be in (0, 1], got {module_fraction}")
        scores = saliency.module_scores(reduce)
        # SparseLoRAInit ranks by mean whatever the chart shows
        chosen = set(saliency.top_modules(fraction=module_fraction, exclude=IO_CONVS))
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
