"""Model families: what differs between the networks the engine edits, one module per family.

Each family module answers, for its networks, the questions the methods must not answer
themselves: how prompts become conditioning, the forward process and training target, which
modules an adapter may address and which are input/output layers, and ESD's module sets.

- :mod:`.unet`: SD1.x / SD2.x UNets (diffusers and CompVis / ComfyUI names); the backend is
  :class:`spare_core.denoiser.DiffusersDenoiser`.
- :mod:`.sdxl`: SDXL-family UNets (two text encoders, pooled text, size ids).
- :mod:`.sd3`: SD3 / SD3.5 MMDiT (rectified flow) and the embedded digits-dit.
- :mod:`.flux`: Flux.1 (rectified flow, packed latents, distilled guidance).
- :mod:`.dit` names the DiT layers; :mod:`.flow` is what the flow families share.

The name rules below are the union over families (their module names do not collide), so a
method asks one question whatever the network.
"""
from __future__ import annotations

import json
import os

import torch

from . import dit, unet
from .unet import adaptable_modules  # noqa: F401  (Linear/Conv2d by name: every family)

IO_LAYERS = tuple(unet.IO_CONVS) + dit.INPUT_LAYERS + dit.OUTPUT_LAYERS
"""Input and output layers of every family: every denoising gradient passes through them, so
they rank high for any concept, and SPARE never adapts them."""

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline",
                       "StableDiffusion3Pipeline", "FluxPipeline")


def is_cross_attention(name: str) -> bool:
    """Where text enters the network: a UNet's ``attn2``, a DiT's text-stream attention."""
    return unet.is_cross_attention(name) or dit.is_text_attention(name)


def is_text_projection(name: str) -> bool:
    """The projections that read the text: a UNet's cross-attention ``attn2.to_k`` / ``to_v``
    (diffusers and CompVis / ComfyUI names), a DiT's text-stream key/value projections
    (diffusers ``attn.add_k_proj`` / ``add_v_proj``; ComfyUI's fused text ``qkv``: Flux
    ``txt_attn.qkv``, SD3 ``context_block.attn.qkv``)."""
    parts = name.split(".")
    if unet.is_cross_attention(name):
        return parts[-1] in ("to_k", "to_v")
    if parts[-1] in ("add_k_proj", "add_v_proj"):
        return True
    return parts[-1] == "qkv" and dit.is_text_attention(name)


def is_output_layer(name: str) -> bool:
    return dit.is_output_layer(name) if dit.is_dit_name(name) else unet.is_output_layer(name)


def is_time_embedding(name: str) -> bool:
    return dit.is_time_embedding(name) if dit.is_dit_name(name) else unet.is_time_embedding(name)


def denoiser_from_pipeline(pipe, **kwargs):
    """The engine's backend for a loaded diffusers pipeline (components are not copied):
    SD1.x/SD2.x, SDXL, SD3 or Flux; any other pipeline raises ValueError listing these.
    ``kwargs`` go to the family's ``from_pipeline`` (Flux: ``height``, ``width``, ``guidance``;
    every family: ``compute_dtype``, e.g. bfloat16 for weights stored in fp8)."""
    name = type(pipe).__name__
    if name == "StableDiffusionXLPipeline":
        from .sdxl import SDXLDenoiser
        return SDXLDenoiser.from_pipeline(pipe, **kwargs)
    if name == "StableDiffusion3Pipeline":
        from .sd3 import SD3Denoiser
        return SD3Denoiser.from_pipeline(pipe, **kwargs)
    if name == "FluxPipeline":
        from .flux import FluxDenoiser
        return FluxDenoiser.from_pipeline(pipe, **kwargs)
    if name == "StableDiffusionPipeline":
        from ..denoiser import DiffusersDenoiser
        return DiffusersDenoiser.from_pipeline(pipe, **kwargs)
    raise ValueError(f"{name} is not a supported pipeline; supported: "
                     f"{', '.join(SUPPORTED_PIPELINES)}")


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # a pipeline's encoders


def load_denoiser(folder: str, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu",
                  text_encoders_device: str | torch.device | None = None, **kwargs):
    """Load a diffusers pipeline folder offline and wrap it (:func:`denoiser_from_pipeline`).
    The VAE and safety checker are not loaded (the engine works on latents). A folder without
    ``model_index.json`` is read as the embedded models' layout: ``unet/`` (SD UNet) or
    ``transformer/`` (digits-dit: SD3 transformer with one CLIP).

    ``text_encoders_device`` (pipeline folders): keep the text encoders there instead of on
    ``device`` (e.g. ``"cpu"``: Flux's and SD3's T5-XXL encoder is 8.87 GB in bf16); prompts are
    encoded there and the contexts moved to ``device``."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        if os.path.isdir(os.path.join(folder, "transformer")):
            from .sd3 import load_single_clip_folder
            return load_single_clip_folder(folder, dtype, device)
        from ..denoiser import DiffusersDenoiser
        return DiffusersDenoiser.from_pretrained(folder, dtype, device)
    with open(index) as f:
        cls_name = json.load(f).get("_class_name", "")
    if cls_name not in SUPPORTED_PIPELINES:
        raise ValueError(f"{folder!r} holds a {cls_name or 'unknown'} pipeline; supported: "
                         f"{', '.join(SUPPORTED_PIPELINES)}")
    import diffusers

    with open(index) as f:
        parts = json.load(f)
    # not needed on latents (VAE, safety checker, image encoders), or saved as absent (an SD3
    # folder without T5): passed as None so the pipeline loads without them
    skip = {k: None for k, v in parts.items() if not k.startswith("_") and (
        k in ("vae", "safety_checker", "feature_extractor", "image_encoder")
        or (isinstance(v, list) and v[0] is None))}
    pipe = getattr(diffusers, cls_name).from_pretrained(folder, dtype=dtype,
                                                        use_safetensors=True, **skip)
    apart = text_encoders_device is not None and torch.device(text_encoders_device) != \
        torch.device(device)
    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module):
            part.to(text_encoders_device if apart and name in TEXT_ENCODERS else device)
    den = denoiser_from_pipeline(pipe, **kwargs)
    if apart:  # the contexts go where the network computes, each prompt encoded once
        encoders = [m for n, m in pipe.components.items() if n in TEXT_ENCODERS
                    and isinstance(m, torch.nn.Module)]
        den.encode = EncodeOnce(den.encode, encoders, device)
    return den


class EncodeOnce:
    """``encode(prompts)`` for text encoders kept apart from the network (on the CPU: T5-XXL
    takes seconds a prompt there): each distinct prompt is encoded once and its context kept on
    the encoders' device (T5-XXL's: 4 MB a prompt); every call returns the contexts of its
    prompts, in order, on ``device``. The kept contexts are dropped whenever a module of the
    encoders gains or loses a forward hook or a parametrization: an adapter attached to a text
    encoder (``adapter.applied_to``) changes what they compute."""

    def __init__(self, encode, encoders, device) -> None:
        self.encode, self.encoders, self.device = encode, list(encoders), device
        self.kept: dict[str, object] = {}
        self.state: tuple = ()

    def _state(self) -> tuple:
        from torch.nn.utils import parametrize

        return tuple((id(m), tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
                     for enc in self.encoders for m in enc.modules()
                     if m._forward_hooks or m._forward_pre_hooks
                     or parametrize.is_parametrized(m))

    def __call__(self, prompts):
        from ..conditioning import cat

        state = self._state()
        if state != self.state:
            self.kept, self.state = {}, state
        prompts = list(prompts)
        new = [p for p in dict.fromkeys(prompts) if p not in self.kept]
        if new:
            ctx = self.encode(new)
            self.kept.update({p: ctx[i:i + 1] for i, p in enumerate(new)})
        return cat([self.kept[p] for p in prompts]).to(self.device)
