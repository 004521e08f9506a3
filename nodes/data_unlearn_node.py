"""DataUnlearn: forget specific training images (SISS, NegGrad, EraseDiff, naive deletion)."""
from __future__ import annotations

import logging

from spare_core.data_task import probe_summary
from spare_core.memory import format_bytes, full_weight_bytes
from spare_core.methods import DATA_METHODS, METHODS, run_method
from spare_core.recipes import RECIPES
from spare_core.families.unet import adaptable_modules

from . import comfy_bridge as bridge
from .chart import loss_chart, to_image_tensor
from .common import ADAPTER, CATEGORY, MEMORY_INPUTS, SEED

log = logging.getLogger(__name__)

_SISS = RECIPES["siss"]  # the default method's recipe: the widgets' defaults (one config)


def check_full_weights_fit(model) -> None:
    """ValueError, before any work, when a full-weight run (a float32 value, gradient and two
    AdamW moments per UNet weight: 16 bytes each) cannot fit in the device's free memory."""
    shapes = [tuple(m.weight.shape) for m in adaptable_modules(bridge.diffusion_model(model)).values()]
    need, free = full_weight_bytes(shapes), bridge.free_memory(model)
    if need > free:
        raise ValueError(f"parameterization 'full' trains every UNet weight: {format_bytes(need)} "
                         f"for the values, gradients and optimizer state, but only "
                         f"{format_bytes(free)} is free; choose parameterization 'lora' (rank 8 "
                         "needs a few MB)")


class DataUnlearn:
    """Trains an adapter so the model stops generating the forget images while the keep images
    stay modelled. SISS (importance-sampled mixture, the default) and its baselines NegGrad,
    EraseDiff and naive deletion; images are encoded with the VAE, prompts are optional.
    Training stops early once the forget images are no longer memorised (their denoising loss
    reaches that of keep images held out of training), so the model is not damaged further."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = (ADAPTER, "IMAGE")
    RETURN_NAMES = ("adapter", "loss")
    OUTPUT_TOOLTIPS = ("The trained adapter: apply it, save it, or bake it into a checkpoint.",
                       "The training loss per step (raw, smoothed, and the method's terms apart, "
                       "e.g. SISS's keep and forget): preview it to see whether the loss moved.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to make forget (left unchanged)."}),
                "clip": ("CLIP", {"tooltip": "Its text encoder (for the prompts, or the empty prompt)."}),
                "vae": ("VAE", {"tooltip": "Encodes the images into the model's latents."}),
                "forget_images": ("IMAGE", {"tooltip": "The training images to forget."}),
                "keep_images": ("IMAGE", {"tooltip": "Images to keep (same size as the forget images)."}),
                "method": (list(DATA_METHODS), {"default": "siss", "tooltip":
                    "siss: importance-sampled forgetting with a keep term (the recipe); neggrad: "
                    "gradient ascent on the forget images; erasediff: forget within the keep "
                    "loss's constraint; naive_deletion: fine-tune on the keep images only."}),
                "steps": ("INT", {"default": _SISS.steps, "min": 1, "max": 100000,
                                  "tooltip": "Step budget (the early stop may end sooner)."}),
                "lr": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-6, "round": False,
                                 "tooltip": "0 = the method's recipe (spare_core.recipes)."}),
                "parameterization": (["lora", "full"], {
                    "default": _SISS.hparams["parameterization"],
                    "tooltip": "lora: low-rank adapter on every UNet layer (small file); full: "
                               "every weight, as in the papers (file as large as the UNet)."}),
                "seed": SEED,
            },
            "optional": {
                "rank": ("INT", {"default": _SISS.hparams["rank"], "min": 1, "max": 256,
                                 "tooltip": "LoRA rank."}),
                "batch_size": ("INT", {"default": _SISS.batch_size, "min": 1, "max": 64,
                                       "tooltip": "Forget and keep images per training step "
                                                  "(each); lower it if memory runs out."}),
                "early_stop_every": ("INT", {
                    "default": _SISS.hparams["early_stop_every"], "min": 0, "max": 100000,
                    "tooltip": "Every N steps, compare the forget images' denoising loss with "
                               "held-out keep images' and stop once it is no longer lower (the "
                               "images are no longer memorised). 0 = train every step."}),
                "forget_prompt": ("STRING", {"default": "", "multiline": False,
                                             "tooltip": "Caption of the forget images (empty = none)."}),
                "keep_prompt": ("STRING", {"default": "", "multiline": False,
                                           "tooltip": "Caption of the keep images (empty = none)."}),
                "gradient_checkpointing": MEMORY_INPUTS["gradient_checkpointing"],
            },
        }

    def run(self, model, clip, vae, forget_images, keep_images, method: str, steps: int,
            lr: float, parameterization: str, seed: int, rank: int = _SISS.hparams["rank"],
            batch_size: int = _SISS.batch_size, forget_prompt: str = "", keep_prompt: str = "",
            gradient_checkpointing: bool = True,
            early_stop_every: int = _SISS.hparams["early_stop_every"]) -> tuple:
        if method not in DATA_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {list(DATA_METHODS)}")
        if forget_images.shape[1:3] != keep_images.shape[1:3]:
            raise ValueError(f"forget images are {forget_images.shape[2]}x{forget_images.shape[1]} "
                             f"but keep images {keep_images.shape[2]}x{keep_images.shape[1]}: "
                             "scale both to the same size")
        height, width = int(forget_images.shape[1]), int(forget_images.shape[2])
        if height % 8 or width % 8:
            raise ValueError(f"image size {width}x{height} is not a multiple of 8: scale the "
                             "images (e.g. ImageScale) to the model's resolution")
        bridge.check_inputs(model, clip, width, height)
        forget_prompt, keep_prompt = (forget_prompt or "").strip(), (keep_prompt or "").strip()
        hp = {"parameterization": parameterization, "early_stop_every": int(early_stop_every)}
        if parameterization == "lora":
            hp["rank"] = int(rank)
        else:
            check_full_weights_fit(model)
        forget = bridge.encode_images(model, vae, forget_images)
        keep = bridge.encode_images(model, vae, keep_images)
        with bridge.autograd_enabled():
            den = bridge.ComfyDenoiser(model, clip, width, height,
                                       prompts=[forget_prompt, keep_prompt])  # CLIP first
            bridge.load_for_compute(model)
            bar = bridge.Progress(steps)
            tick = bar.phase(0, steps)
            result = run_method(method, den, forget=forget, keep=keep,
                                forget_prompts=forget_prompt or None,
                                keep_prompts=keep_prompt or None, steps=int(steps),
                                lr=float(lr) if lr > 0 else None, batch_size=int(batch_size),
                                seed=int(seed), progress=tick,
                                should_stop=bridge.should_stop,
                                gradient_checkpointing=bool(gradient_checkpointing), **hp)
            tick(steps, steps)  # an early stop ends the run: the bar too
        adapter = result.adapter
        adapter.to("cpu")  # ComfyUI caches node outputs where its memory manager cannot see them
        adapter.meta.update(method=method, forget_images=str(len(forget)),
                            keep_images=str(len(keep)), forget_prompt=forget_prompt,
                            steps=str(steps), lr=repr(result.history["lr"]),
                            parameterization=parameterization,
                            steps_trained=str(len(result.history.get("loss", []))),
                            stopped_at=str(result.history.get("stopped_at")))
        losses = result.history.get("loss", [])
        if result.history.get("probe"):
            log.info("DataUnlearn %s: %s", method, probe_summary(result.history))
        log.info("DataUnlearn %s: %d steps in %.1fs, %d trainable parameters (%s), loss %.4g -> %.4g",
                 method, len(losses), result.history.get("seconds", 0.0), adapter.num_trainable(),
                 METHODS[method].objective, losses[0] if losses else float("nan"),
                 losses[-1] if losses else float("nan"))
        stop = result.history.get("stopped_at")
        title = (f"DataUnlearn {method}: {len(forget)} forget / {len(keep)} keep images, "
                 f"{len(losses)} of {steps} steps" + (" (stopped early)" if stop is not None else ""))
        return (adapter, to_image_tensor(loss_chart([(method, result.history)], title=title)))
