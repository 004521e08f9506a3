"""Stable Diffusion 3 / 3.5 (MMDiT, rectified flow) through diffusers, and the embedded
digits-dit model that shares its transformer.

Conditioning: the joint CLIP-L + CLIP-G (+ T5) sequence and the pooled CLIP vector
(:class:`~spare_core.conditioning.Context` with ``pooled``), encoded by the pipeline's own
``encode_prompt``. The network is fed ``1000 s`` as its timestep, as the pipeline does.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor, nn

from ..conditioning import Context
from .flow import FlowTransformerDenoiser, flow_process


class SD3Denoiser(FlowTransformerDenoiser):
    """``SD3Transformer2DModel`` + a prompt encoder + ``FlowMatchEulerDiscreteScheduler``.

    Args:
        transformer: the network (what methods edit).
        encode: prompts -> Context(seq ``[B, L, D]``, pooled ``[B, P]``).
        scheduler: gives the sigma shift.
        latent_shape: ``(C, H, W)`` of one latent (default from the transformer's config).
    """

    family = "sd3"  # the model family (spare_core.recipes rules: guidance, size)

    def __init__(self, transformer: nn.Module, encode, scheduler,
                 latent_shape: tuple[int, int, int] | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        self.unet = transformer
        self._encode = encode
        self.scheduler = scheduler
        self.process = flow_process(scheduler, model_t_scale=float(scheduler.config.num_train_timesteps))
        cfg = transformer.config
        self.latent_shape = latent_shape or (int(cfg.in_channels), int(cfg.sample_size),
                                             int(cfg.sample_size))
        self._setup_dtype(compute_dtype)

    def _forward(self, x: Tensor, model_t: Tensor, ctx: Context) -> Tensor:
        return self.unet(hidden_states=x, encoder_hidden_states=ctx.seq,
                         pooled_projections=ctx.field("pooled"), timestep=model_t).sample

    @classmethod
    def from_pipeline(cls, pipe, max_sequence_length: int = 256,
                      compute_dtype: torch.dtype | None = None) -> "SD3Denoiser":
        """Wrap a loaded ``StableDiffusion3Pipeline`` (not copied); prompts go through its
        ``encode_prompt`` (T5 optional, as in the pipeline); ``compute_dtype`` for a transformer
        stored in fp8."""
        pipe.text_encoder.requires_grad_(False)
        pipe.text_encoder_2.requires_grad_(False)
        if pipe.text_encoder_3 is not None:
            pipe.text_encoder_3.requires_grad_(False)

        def encode(prompts: Sequence[str]) -> Context:
            dev = next(pipe.text_encoder.parameters()).device
            seq, _, pooled, _ = pipe.encode_prompt(
                prompt=list(prompts), prompt_2=None, prompt_3=None, device=dev,
                do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
            return Context(seq.float(), {"pooled": pooled.float()})

        size = int(pipe.transformer.config.sample_size)
        shape = (int(pipe.transformer.config.in_channels), size, size)
        return cls(pipe.transformer, encode, pipe.scheduler, shape, compute_dtype=compute_dtype)


def clip_encoder(text_encoder: nn.Module, tokenizer) -> "callable":
    """Prompt encoder of one CLIP (digits-dit): seq = last hidden state ``[B, L, D]``, pooled =
    the pooler output ``[B, D]`` (the end-of-text token's state)."""
    text_encoder.requires_grad_(False)

    def encode(prompts: Sequence[str]) -> Context:
        ids = tokenizer(list(prompts), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        dev = next(text_encoder.parameters()).device
        out = text_encoder(ids.to(dev))
        return Context(out.last_hidden_state.float(), {"pooled": out.pooler_output.float()})

    return encode


def load_single_clip_folder(folder: str, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu") -> SD3Denoiser:
    """A folder with ``transformer/`` (SD3Transformer2DModel), one CLIP ``text_encoder/``,
    ``tokenizer/`` and ``scheduler/`` (FlowMatchEulerDiscreteScheduler): the digits-dit layout."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tr = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype,
                                               use_safetensors=True)
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype,
                                       use_safetensors=True)
    tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    return SD3Denoiser(tr.to(device).eval(), clip_encoder(te.to(device).eval(), tok), sched)
