"""SDXL-family UNets (SDXL, Pony, Illustrious, ...): the SD UNet with two text encoders, a
pooled text vector and size/crop ids (``addition_embed_type="text_time"``); VP schedule, eps or
v-prediction. Module names are the SD UNet's (:mod:`.unet`), so saliency, adapters and exports
address it unchanged; what differs is the conditioning, built here.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..conditioning import Context
from ..denoiser import DiffusersDenoiser


class SDXLDenoiser(DiffusersDenoiser):
    """``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` + a prompt encoder.

    Args:
        encode: prompts -> Context(seq ``[B, 77, 2048]``, pooled ``[B, 1280]``); ``time_ids``
            ``[B, 6]`` (original size, crop top-left, target size, in pixels) are added here.
        image_size: ``(height, width)`` in pixels put into the time ids (default: the latent
            size times ``vae_scale_factor``).
        tokenizer: a CLIP tokenizer of ``encode``'s (both of SDXL's share token positions, their
            sequences being joined along features), for :meth:`last_word_index`; without one,
            UCE refuses this denoiser.
    """

    family = "sdxl"  # the model family (spare_core.recipes rules: guidance, size)

    def __init__(self, unet: nn.Module, encode, scheduler, vae_scale_factor: int = 8,
                 image_size: tuple[int, int] | None = None,
                 compute_dtype: torch.dtype | None = None, tokenizer=None) -> None:
        if getattr(unet.config, "addition_embed_type", None) != "text_time":
            raise ValueError("SDXLDenoiser needs an SDXL UNet (addition_embed_type='text_time'); "
                             "use DiffusersDenoiser for SD1.x/SD2.x")
        super().__init__(unet, None, None, scheduler, compute_dtype=compute_dtype,
                         allow_added_conditioning=True)
        self._encode_prompts = encode
        self.tokenizer = tokenizer  # counts tokens only (last_word_index); encode tokenizes itself
        h, w = image_size or (self.latent_shape[1] * vae_scale_factor,
                              self.latent_shape[2] * vae_scale_factor)
        self.time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Context:
        ctx = self._encode_prompts(list(prompts))
        ctx.extras["time_ids"] = self.time_ids.to(ctx.device).expand(ctx.shape[0], -1).clone()
        return ctx

    def _forward(self, x: Tensor, t: Tensor, context: Context) -> Tensor:
        return self.unet(x, t, encoder_hidden_states=context.seq,
                         added_cond_kwargs={"text_embeds": context.field("pooled"),
                                            "time_ids": context.field("time_ids")}).sample

    @classmethod
    def from_pipeline(cls, pipe, compute_dtype: torch.dtype | None = None) -> "SDXLDenoiser":
        """Wrap a loaded ``StableDiffusionXLPipeline`` (not copied). Prompts go through its
        ``encode_prompt``; the empty prompt is encoded as zeros where the pipeline does so for
        its negative prompt (``force_zeros_for_empty_prompt``, SDXL base's setting), so the
        unconditional prediction is the one the pipeline guides with."""
        for te in (pipe.text_encoder, pipe.text_encoder_2):
            if te is not None:
                te.requires_grad_(False)
        zeros_for_empty = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))

        def encode(prompts: Sequence[str]) -> Context:
            te = pipe.text_encoder_2 if pipe.text_encoder_2 is not None else pipe.text_encoder
            dev = next(te.parameters()).device
            seq, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), device=dev,
                                                   do_classifier_free_guidance=False)
            seq, pooled = seq.float(), pooled.float()
            if zeros_for_empty:
                empty = torch.tensor([not p.strip() for p in prompts], device=seq.device)
                seq = torch.where(empty.view(-1, 1, 1), torch.zeros_like(seq), seq)
                pooled = torch.where(empty.view(-1, 1), torch.zeros_like(pooled), pooled)
            return Context(seq, {"pooled": pooled})

        tok = pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2
        return cls(pipe.unet, encode, pipe.scheduler, vae_scale_factor=int(pipe.vae_scale_factor),
                   tokenizer=tok, compute_dtype=compute_dtype)
