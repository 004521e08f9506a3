"""Which weights a baseline trains: ESD-x / ESD-u module selection and full fine-tuning.

ESD (Gandikota et al., ICCV 2023) trains one of two parameter sets (their ``train_method``):

- ESD-x (``xattn``): the cross-attention layers only, every parameter whose name contains
  ``attn2`` (to_q, to_k, to_v, to_out in diffusers and in ComfyUI/CompVis naming alike);
- ESD-u (``noxattn``): everything except cross-attention, the output layer (``out.`` in CompVis,
  ``conv_out`` in diffusers) and the time embedding (``time_embed`` / ``time_embedding``).

On a DiT (SD3, Flux), which has no separate cross-attention, ESD-x takes the text stream's
attention projections of the joint blocks (where the prompt enters attention) and ESD-u the rest
but the input/output layers and the time/text embedders (:mod:`spare_core.families.dit`).

The engine adapts Linear/Conv2d weights only (biases and norms stay frozen), so "full
fine-tuning" of a module set is :func:`~spare_core.adapter.init_masked_full` with all-ones
masks (every element of those weights is trainable; nothing else moves), or LoRA on the same
modules.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from .adapter import UnlearnAdapter, init_masked_full, init_sparse_lora
from .families import (adaptable_modules, is_cross_attention, is_output_layer,
                       is_time_embedding)

ESD_VARIANTS = ("x", "u")


def esd_modules(unet: nn.Module, variant: str = "x") -> list[str]:
    """Linear/Conv2d module names ESD trains: ``"x"`` (ESD-x, cross-attention) or ``"u"``
    (ESD-u, all but cross-attention, output layer and time embedding)."""
    if variant not in ESD_VARIANTS:
        raise ValueError(f"ESD variant must be 'x' (cross-attention) or 'u' (non-cross-attention), "
                         f"got {variant!r}")
    names = list(adaptable_modules(unet))
    if variant == "x":
        out = [n for n in names if is_cross_attention(n)]
    else:
        out = [n for n in names
               if not (is_cross_attention(n) or is_output_layer(n) or is_time_embedding(n))]
    if not out:
        raise ValueError(f"this UNet has no modules for ESD-{variant}"
                         + (" (no cross-attention 'attn2' layers, no text-stream attention)"
                            if variant == "x" else ""))
    return out


def all_ones_masks(unet: nn.Module, modules: Iterable[str]) -> dict[str, Tensor]:
    """Weight-shaped all-True masks for ``modules`` (full fine-tuning of their weights)."""
    mods = adaptable_modules(unet)
    unknown = [m for m in modules if m not in mods]
    if unknown:
        raise ValueError(f"modules not Linear/Conv2d in this UNet: {unknown[:3]}")
    return {m: torch.ones(mods[m].weight.shape, dtype=torch.bool) for m in modules}


def init_module_adapter(unet: nn.Module, modules: Iterable[str] | None = None,
                        parameterization: str = "full", rank: int = 4,
                        lora_alpha: float | None = None, seed: int = 0,
                        meta: Mapping[str, str] | None = None) -> UnlearnAdapter:
    """Adapter training ``modules`` (default: every Linear/Conv2d) either in full
    (``"full"``: all their weight elements) or with LoRA of ``rank`` (``"lora"``; a layer too
    small for ``rank``, such as SD's 4-channel output convolution, gets the largest it allows)."""
    modules = list(adaptable_modules(unet)) if modules is None else list(modules)
    if not modules:
        raise ValueError("no modules selected")
    if parameterization == "full":
        return init_masked_full(unet, all_ones_masks(unet, modules), meta=meta)
    if parameterization == "lora":
        return init_sparse_lora(unet, modules, rank=rank, alpha=lora_alpha, seed=seed, meta=meta,
                                clamp_rank=True)
    raise ValueError(f"parameterization must be 'full' or 'lora', got {parameterization!r}")


def init_esd_adapter(unet: nn.Module, variant: str = "x", parameterization: str = "full",
                     rank: int = 4, lora_alpha: float | None = None, seed: int = 0) -> UnlearnAdapter:
    """ESD-x / ESD-u adapter: full fine-tuning (ESD's own) or LoRA on the ESD module set."""
    return init_module_adapter(unet, esd_modules(unet, variant), parameterization, rank,
                               lora_alpha, seed, meta={"method": f"esd_{variant}",
                                                       "esd_variant": variant})
