"""Flux.1 (dev / schnell; rectified flow, double + single stream DiT) through diffusers.

Conditioning: the T5 sequence, the pooled CLIP-L vector and, for guidance-distilled models
(``guidance_embeds``), the guidance value fed to the network (``Context`` fields ``pooled``,
``guidance``; ``guidance`` defaults to 3.5, the pipeline's default). Latents ``[B, C, H, W]``
are packed into 2x2 patches and given position ids by the pipeline's own static helpers; the
sigma shift depends on the image's token count (``use_dynamic_shifting``), as in the pipeline.
The network is fed ``s`` in [0, 1] (the pipeline passes ``timestep / 1000``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..conditioning import Context
from .flow import FlowTransformerDenoiser, flow_process


class FluxDenoiser(FlowTransformerDenoiser):
    """``FluxTransformer2DModel`` + a prompt encoder + ``FlowMatchEulerDiscreteScheduler``.

    Args:
        latent_shape: ``(C, H, W)`` of one unpacked latent (16, 128, 128 at 1024 px).
        guidance: the distilled-guidance value put into every encoded context.
    """

    family = "flux"  # the model family (spare_core.recipes rules: guidance, size)

    def __init__(self, transformer: nn.Module, encode, scheduler,
                 latent_shape: tuple[int, int, int], guidance: float = 3.5,
                 compute_dtype: torch.dtype | None = None) -> None:
        c, h, w = latent_shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux latents pack 2x2 patches: height and width must be even, got {h}x{w}")
        if 4 * c != int(transformer.config.in_channels):
            raise ValueError(f"latent channels {c} x 4 != the transformer's in_channels "
                             f"{transformer.config.in_channels}")
        self.unet = transformer
        self._encode_prompts = encode
        self.scheduler = scheduler
        self.latent_shape = (int(c), int(h), int(w))
        self.guidance = float(guidance)
        self.process = flow_process(scheduler, image_seq_len=(h // 2) * (w // 2), model_t_scale=1.0)
        self._setup_dtype(compute_dtype)

    def _encode(self, prompts: Sequence[str]) -> Context:
        ctx = self._encode_prompts(prompts)
        n = ctx.shape[0]
        if getattr(self.unet.config, "guidance_embeds", False) and "guidance" not in ctx.extras:
            ctx.extras["guidance"] = torch.full((n,), self.guidance, device=ctx.device)
        return ctx

    def _forward(self, x: Tensor, model_t: Tensor, ctx: Context) -> Tensor:
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(ctx.seq.shape[1], 3, device=x.device, dtype=x.dtype)
        out = self.unet(hidden_states=packed, encoder_hidden_states=ctx.seq,
                        pooled_projections=ctx.field("pooled"), timestep=model_t,
                        img_ids=img_ids, txt_ids=txt_ids,
                        guidance=ctx.extras.get("guidance")).sample
        # the pipeline's _unpack_latents takes pixel sizes; with a scale factor of 1 they are
        # the latent sizes themselves (it divides by 2 * scale and packs 2x2)
        return FluxPipeline._unpack_latents(out, h, w, 1)

    @classmethod
    def from_pipeline(cls, pipe, height: int = 1024, width: int = 1024, guidance: float = 3.5,
                      max_sequence_length: int = 512,
                      compute_dtype: torch.dtype | None = None) -> "FluxDenoiser":
        """Wrap a loaded ``FluxPipeline`` for images of ``height`` x ``width`` pixels
        (``compute_dtype``: for a transformer stored in fp8, e.g. bfloat16)."""
        pipe.text_encoder.requires_grad_(False)
        pipe.text_encoder_2.requires_grad_(False)

        def encode(prompts: Sequence[str]) -> Context:
            dev = next(pipe.text_encoder.parameters()).device
            seq, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=dev,
                                                max_sequence_length=max_sequence_length)
            return Context(seq.float(), {"pooled": pooled.float()})

        f = int(pipe.vae_scale_factor)
        c = int(pipe.transformer.config.in_channels) // 4
        return cls(pipe.transformer, encode, pipe.scheduler, (c, height // f, width // f), guidance,
                   compute_dtype=compute_dtype)
