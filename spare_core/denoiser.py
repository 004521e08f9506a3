"""The Denoiser protocol: everything a method may know about a model.

A method sees a model only through its prediction (:func:`prediction`: ``pred(x_t, t, context)``,
or ``eps`` for noise-space backends), its forward process (``process``, see
:mod:`spare_core.process`; a backend with only ``alphas_cumprod`` is VP), ``encode(prompts)``
(a tensor or a :class:`~spare_core.conditioning.Context`: methods pass it through without
looking inside) and ``compute_dtype`` (the dtype the network runs in, which may differ from the
dtype its weights are stored in: fp8 storage computed in bf16), and, where a backend has them,
``predict`` (eps and x0 together), ``enable_gradient_checkpointing``, ``last_word_index``
(where a prompt's words end in its encoded sequence: UCE pairs tokens from there) and
``text_states`` (``encode`` with gradient, for an adapter on the CLIP text encoder: the
``text_encoder`` localisation, :mod:`spare_core.text_encoder`). The trainable
network is
exposed as ``unet`` (a UNet or a DiT) so that saliency and adapters can address its weights by
module name. Backends: :class:`DiffusersDenoiser` (here, SD1.x/SD2.x), the family modules in
:mod:`spare_core.families` (SDXL, SD3, Flux) and the ComfyUI bridge (``nodes/comfy_bridge.py``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from .process import ForwardProcess, process_of


@runtime_checkable
class Denoiser(Protocol):
    """Protocol every backend implements.

    Attributes:
        unet: the trainable network (its weights are what methods edit).
        alphas_cumprod: ``[T]`` float32 tensor, the training schedule's cumulative alpha-bar (VP
            backends; a backend with a ``process`` attribute may leave it out).
        latent_shape: ``(C, H, W)`` of one latent the network denoises.
        compute_dtype: dtype of every input the backend feeds the network (latents, contexts);
            ``eps`` accepts any float dtype and casts. Objectives compute losses in float32.
    """

    unet: nn.Module
    alphas_cumprod: Tensor
    latent_shape: tuple[int, int, int]
    compute_dtype: torch.dtype

    def eps(self, x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """Noise prediction ``[B, C, H, W]`` for latents ``x_t`` ``[B, C, H, W]`` at integer
        timesteps ``t`` ``[B]`` (0 .. T-1) under text context ``[B, L, D]``."""
        ...

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Text context ``[len(prompts), L, D]`` (no gradient; the text encoder is frozen)."""
        ...


def prediction(denoiser: Denoiser, x_t: Tensor, t: Tensor, context) -> Tensor:
    """The network's prediction ``[B, C, H, W]`` in its process's space (the noise for VP
    backends, the velocity for flow ones) at step indices ``t`` ``[B]``: ``denoiser.pred`` where
    the backend has it, else ``denoiser.eps``."""
    pred = getattr(denoiser, "pred", None)
    return pred(x_t, t, context) if pred is not None else denoiser.eps(x_t, t, context)


def eps_and_x0(denoiser: Denoiser, x_t: Tensor, t: Tensor,
               context) -> tuple[Tensor, Tensor | None]:
    """``(eps, x0)`` predictions ``[B, C, H, W]`` in float32, ``x0`` None when it is only the
    division ``(x_t - sqrt(1 - a) eps) / sqrt(a)`` (eps-prediction models). A backend's optional ``predict`` gives x0 division-free from a
    v-prediction, and a velocity gives it as ``x_t - sigma v``, so a zero-terminal-SNR schedule
    (alpha-bar 0 at the last step) and a flow's pure-noise end stay finite."""
    predict = getattr(denoiser, "predict", None)
    if predict is not None:
        eps, x0 = predict(x_t, t, context)
        return eps.float(), None if x0 is None else x0.float()
    p = prediction(denoiser, x_t, t, context).float()
    return process_of(denoiser).eps_and_x0(p, x_t.float(), t)


def v_to_eps_and_x0(v: Tensor, x_t: Tensor, alphas_cumprod: Tensor,
                    t: Tensor) -> tuple[Tensor, Tensor]:
    """From a v-prediction (``v = sqrt(a) eps - sqrt(1 - a) x0``): ``eps = sqrt(1 - a) x_t +
    sqrt(a) v`` and ``x0 = sqrt(a) x_t - sqrt(1 - a) v``, no division."""
    a = alphas_cumprod.to(v.device)[t.to(v.device)].view(-1, 1, 1, 1).to(v.dtype)
    return (1 - a).sqrt() * x_t + a.sqrt() * v, a.sqrt() * x_t - (1 - a).sqrt() * v


def device_of(denoiser: Denoiser) -> torch.device:
    """Device the UNet's first parameter lives on."""
    return next(denoiser.unet.parameters()).device


TRAIN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes the engine computes in, and weights must be stored in to hold their own gradients."""


def compute_dtype_of(denoiser: Denoiser) -> torch.dtype:
    """The denoiser's ``compute_dtype`` (a backend without one computes in its weights' dtype)."""
    dtype = getattr(denoiser, "compute_dtype", None)
    return dtype if dtype is not None else next(denoiser.unet.parameters()).dtype


@contextmanager
def gradient_checkpointing(denoiser: Denoiser, enabled: bool) -> Iterator[None]:
    """``with gradient_checkpointing(den, on):`` the backend's activation checkpointing for the
    block (switched off again after, also on error); nothing when ``enabled`` is False.
    :func:`check_checkpointing` raises the same error up front."""
    if not enabled:
        yield
        return
    check_checkpointing(denoiser, enabled)
    denoiser.enable_gradient_checkpointing(True)
    try:
        yield
    finally:
        denoiser.enable_gradient_checkpointing(False)


def check_checkpointing(denoiser: Denoiser, enabled: bool) -> None:
    """ValueError unless the backend can checkpoint when ``enabled``."""
    if enabled and not hasattr(denoiser, "enable_gradient_checkpointing"):
        raise ValueError(f"{type(denoiser).__name__} cannot turn on gradient checkpointing; "
                         "set gradient_checkpointing=False")


def check_compute_dtype(dtype: torch.dtype, storage: torch.dtype) -> torch.dtype:
    """``dtype`` if it is one the engine trains in (float32, bfloat16, float16), else a ValueError
    naming the fix; raised before any work (fp8 storage needs a wider compute dtype)."""
    if dtype not in TRAIN_DTYPES:
        hint = (f"weights stored in {storage} must be computed in bfloat16 or float16: pass "
                "compute_dtype=torch.bfloat16" if storage not in TRAIN_DTYPES
                else "use torch.float32, torch.bfloat16 or torch.float16")
        raise ValueError(f"cannot compute in {dtype}; {hint}")
    return dtype


class DiffusersDenoiser:
    """Denoiser over diffusers parts: ``UNet2DConditionModel`` + CLIP text encoder + tokenizer +
    a DDPM-style scheduler (anything with ``alphas_cumprod``), i.e. what a
    ``StableDiffusionPipeline`` holds. ``v_prediction`` UNets are converted to eps here.

    ``compute_dtype`` defaults to the UNet's weight dtype; inputs are cast to it, so a bf16 UNet
    works with an fp32 text encoder, and a UNet stored in fp8 (diffusers' layerwise casting)
    runs with ``compute_dtype=torch.bfloat16``."""

    family = "sd"  # the model family (spare_core.recipes rules: guidance, size)

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None, tokenizer, scheduler,
                 compute_dtype: torch.dtype | None = None,
                 allow_added_conditioning: bool = False) -> None:
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(
                f"scheduler {type(scheduler).__name__} has no alphas_cumprod; pass a DDPM-style "
                "scheduler (DDPMScheduler, DDIMScheduler, PNDMScheduler, ...)")
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().float().cpu()
        self.process = ForwardProcess.vp(self.alphas_cumprod)
        self.prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported; "
                             "use an epsilon or v_prediction model")
        cfg = unet.config
        extra = getattr(cfg, "addition_embed_type", None)
        if not allow_added_conditioning and (
                extra is not None or getattr(cfg, "class_embed_type", None) is not None):
            raise ValueError(f"this UNet needs extra conditioning (addition_embed_type={extra!r}: "
                             "SDXL-style pooled text and size ids); load it with "
                             "spare_core.load_denoiser(folder) or "
                             "spare_core.denoiser_from_pipeline(pipe), which pick SDXLDenoiser")
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.latent_shape = (int(cfg.in_channels), int(size), int(size))
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(False)
        storage = next(unet.parameters()).dtype
        self.compute_dtype = check_compute_dtype(compute_dtype or storage, storage)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the UNet's activations in backward (diffusers' own switch)."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    @classmethod
    def from_pipeline(cls, pipe, compute_dtype: torch.dtype | None = None) -> "DiffusersDenoiser":
        """Wrap the parts of a loaded diffusers pipeline (the pipeline is not copied);
        ``compute_dtype`` for a UNet stored in fp8."""
        return cls(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                   compute_dtype=compute_dtype)

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "DiffusersDenoiser":
        """Load ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` from a pipeline folder
        written by ``save_pretrained`` (offline; a VAE, if present, is not needed)."""
        import os

        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
            if not os.path.isdir(os.path.join(folder, sub)):
                raise FileNotFoundError(
                    f"{folder!r} is not a diffusers pipeline folder: no {sub}/ inside. "
                    "Save one with pipe.save_pretrained(folder).")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype,
                                                    use_safetensors=True)
        te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype,
                                           use_safetensors=True)
        tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        return cls(unet.to(device).eval(), te.to(device).eval(), tok, sched)

    def eps(self, x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self.predict(x_t, t, context)[0]

    def predict(self, x_t: Tensor, t: Tensor, context: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(eps, x0)``, x0 division-free for v-prediction models and None for eps models
        (see :func:`eps_and_x0`)."""
        x = x_t.to(self.compute_dtype)
        out = self._forward(x, t, context.to(x.device, self.compute_dtype))
        if self.prediction_type == "v_prediction":
            return v_to_eps_and_x0(out, x, self.alphas_cumprod, t)
        return out, None

    def _forward(self, x: Tensor, t: Tensor, context) -> Tensor:
        """The UNet's raw output for inputs already in the compute dtype (families with more
        conditioning than the text sequence override this)."""
        return self.unet(x, t, encoder_hidden_states=context).sample

    def last_word_index(self, prompt: str) -> int | None:
        """Position of the prompt's last word token in the sequence :meth:`encode` gives (the
        start token at 0, so the empty prompt's is 0; truncated as :meth:`encode` truncates), or
        None without a tokenizer to count with."""
        tok = self.tokenizer
        if tok is None or not callable(tok):
            return None
        n = len(tok(prompt, truncation=True, max_length=tok.model_max_length).input_ids)
        return max(n - 2, 0)  # n counts the start and end tokens

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        return self.text_states(prompts)

    def text_states(self, prompts: Sequence[str]) -> Tensor:
        """The text encoder's last hidden states ``[len(prompts), L, D]``, as :meth:`encode`
        gives them but in the caller's grad mode: an adapter on the text encoder (localisation
        ``text_encoder``, :mod:`spare_core.text_encoder`) trains through it."""
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        dev = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(dev))[0]
