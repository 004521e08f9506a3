"""ProbeErasure: does the erased concept come back under an adversarial prompt?"""
from __future__ import annotations

import logging
import torch

from spare_core.denoiser import gradient_checkpointing as checkpointing
from spare_core.probe import AttackConfig, attack
from spare_core.sampling import sample

from . import comfy_bridge as bridge
from .common import CATEGORY, MEMORY_INPUTS, SEED, node_size, require_text, size_input

log = logging.getLogger(__name__)


class ProbeErasure:
    """Adversarial prompt attack on the erased model (UnlearnDiffAtk, Zhang et al. 2024): the
    original model makes ``num_images`` images of the concept, then ``attack_tokens`` words put
    before the concept are optimised (``attack_steps`` steps, projected to real vocabulary
    tokens) so that the erased model denoises those images again. ``found_prompt`` is the words
    plus the concept, a prompt anyone can type; ``found_latent`` the erased model's images from
    it, ``concept_latent`` its images from the plain concept (same seed): if the first show the
    concept and the second do not, the erasure does not hold against this attack. SD1.x/SD2.x
    (one CLIP); SDXL, SD3 and Flux are refused."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "LATENT", "LATENT")
    RETURN_NAMES = ("found_prompt", "found_latent", "concept_latent")
    FUNCTION = "probe"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "original_model": ("MODEL", {"tooltip": "The model before the erasure (the "
                                                        "checkpoint loader's MODEL)."}),
                "erased_model": ("MODEL", {"tooltip": "The erased model: ApplyUnlearnAdapter's "
                                                      "output (left unchanged)."}),
                "clip": ("CLIP", {"tooltip": "Their text encoder."}),
                "concept": ("STRING", {"default": "Van Gogh style", "multiline": False,
                                       "tooltip": "The erased concept, the prompt to attack."}),
                "attack_tokens": ("INT", {"default": 5, "min": 1, "max": 32,
                                          "tooltip": "Words the attack puts before the concept."}),
                "attack_steps": ("INT", {"default": 40, "min": 1, "max": 10000,
                                         "tooltip": "Optimisation steps of the attack."}),
                "num_images": ("INT", {"default": 4, "min": 1, "max": 64,
                                       "tooltip": "Images of the concept made by the original "
                                                  "model (the attack's target), and images "
                                                  "made from each prompt by the erased model."}),
                "seed": SEED,
            },
            "optional": {
                "width": size_input(),
                "height": size_input(),
                "sample_steps": ("INT", {"default": 25, "min": 1, "max": 1000,
                                         "tooltip": "DDIM steps per generated image."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance of the generated images."}),
                "attack_batch": ("INT", {"default": 16, "min": 1, "max": 256,
                                         "tooltip": "Noisy images per attack step, all through "
                                                    "the UNet at once with gradients: lower it "
                                                    "on a small card."}),
                **MEMORY_INPUTS,
            },
        }

    def probe(self, original_model, erased_model, clip, concept: str, attack_tokens: int,
              attack_steps: int, num_images: int, seed: int, width: int = 0,
              height: int = 0, sample_steps: int = 25, cfg: float = 7.5,
              attack_batch: int = 16, micro_batch: int = 1,
              gradient_checkpointing: bool = True) -> dict:
        concept = require_text(concept, "concept prompt",
                               "the erased concept, e.g. 'Van Gogh style'")
        if "\n" in concept:
            raise ValueError("concept holds several lines: probe one concept per node")
        if min(attack_tokens, attack_steps, num_images, sample_steps, attack_batch,
               micro_batch) < 1:
            raise ValueError("attack_tokens, attack_steps, num_images, sample_steps, "
                             "attack_batch and micro_batch must be >= 1")
        if erased_model is original_model:
            raise ValueError("original_model and erased_model are the same MODEL: connect "
                             "ApplyUnlearnAdapter's output (strength other than 0) to "
                             "erased_model")
        config = AttackConfig(tokens=int(attack_tokens), steps=int(attack_steps),
                              batch_size=int(attack_batch), seed=int(seed))
        config.validate()
        width, height = node_size(original_model, width, height)
        for model in (original_model, erased_model):
            bridge.check_inputs(model, clip, width, height)
            bridge.check_prompt_attack(model, clip, [concept], config.tokens)

        prompts = [concept] * num_images  # every set of images starts from the seed's noise
        bar = bridge.Progress(3 * sample_steps + attack_steps)
        with bridge.autograd_enabled():
            den = bridge.ComfyDenoiser(original_model, clip, width, height, prompts=[concept])
            bridge.load_for_compute(original_model)
            images = sample(den, prompts, steps=sample_steps, guidance=cfg, method="ddim",
                            generator=torch.Generator().manual_seed(seed),
                            batch_size=micro_batch, callback=bar.phase(0, sample_steps))
            erased = bridge.ComfyDenoiser(erased_model, clip, width, height, prompts=[concept])
            bridge.load_for_compute(erased_model)
            with checkpointing(erased, bool(gradient_checkpointing)):  # weights: no grads (attack)
                found = attack(erased, [concept], images, config,
                               progress=bar.phase(sample_steps, attack_steps),
                               should_stop=bridge.should_stop)
            prompt = found.prompts[0]
            erased = bridge.ComfyDenoiser(erased_model, clip, width, height,
                                          prompts=[concept, prompt])  # CLIP first
            bridge.load_for_compute(erased_model)
            done = sample_steps + attack_steps
            plain = sample(erased, prompts, steps=sample_steps, guidance=cfg, method="ddim",
                           generator=torch.Generator().manual_seed(seed),
                           batch_size=micro_batch, callback=bar.phase(done, sample_steps))
            attacked = sample(erased, [prompt] * num_images, steps=sample_steps, guidance=cfg,
                              method="ddim", generator=torch.Generator().manual_seed(seed),
                              batch_size=micro_batch,
                              callback=bar.phase(done + sample_steps, sample_steps))
        losses = found.losses
        log.info("ProbeErasure: %r -> %r in %.1fs (attack loss: first step %.4g, best of %d %.4g)",
                 concept, prompt, found.seconds, losses[0] if losses else float("nan"),
                 len(losses), min(losses) if losses else float("nan"))
        return {"ui": {"text": [prompt]},
                "result": (prompt, bridge.latent_output(erased_model, attacked),
                           bridge.latent_output(erased_model, plain))}
