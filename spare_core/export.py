"""Export an adapter to formats other tools load.

- ComfyUI / kohya (A1111, Forge): ``lora_unet_<module with . as _>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha`` for dense low-rank modules; ``.diff`` (full weight difference)
  where an element mask or a masked full delta makes the update not low-rank.
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (scale folded into B);
  masked modules are written at full rank via an SVD of their dense delta, which reproduces it
  exactly (up to float rounding), so ``pipe.load_lora_weights`` gives the same weights.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .adapter import LoRADelta, UnlearnAdapter


def _is_dense_lora(d) -> bool:
    return isinstance(d, LoRADelta) and d.mask is None


def to_comfy_lora(adapter: UnlearnAdapter, prefix: str = "lora_unet_") -> dict[str, Tensor]:
    """State dict for ComfyUI's LoraLoader (strength of the adapter folded in)."""
    out: dict[str, Tensor] = {}
    s = float(adapter.strength)
    for n in adapter.names:
        d = adapter[n]
        key = prefix + n.replace(".", "_")
        if _is_dense_lora(d):
            shape = d.weight_shape
            down = d.lora_A.detach().float().reshape(d.rank, *shape[1:])
            up = (d.lora_B.detach().float() * s)
            if len(shape) == 4:
                up = up.reshape(shape[0], d.rank, 1, 1)
            out[f"{key}.lora_down.weight"] = down.contiguous()
            out[f"{key}.lora_up.weight"] = up.contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(d.alpha))
        else:
            with torch.no_grad():
                out[f"{key}.diff"] = (d.delta().float() * s).contiguous()
    return out


def to_diffusers_lora(adapter: UnlearnAdapter, prefix: str = "unet.") -> dict[str, Tensor]:
    """PEFT-style state dict for ``pipe.load_lora_weights`` / ``unet.load_lora_adapter``.

    Module names must be diffusers UNet names (adapters trained on the diffusers backend are).
    """
    out: dict[str, Tensor] = {}
    s = float(adapter.strength)
    for n in adapter.names:
        d = adapter[n]
        shape = d.weight_shape
        with torch.no_grad():
            if _is_dense_lora(d):
                a = d.lora_A.detach().float()
                b = d.lora_B.detach().float() * (d.scale * s)
            else:
                u, sv, vh = torch.linalg.svd(d.delta().float().reshape(shape[0], -1) * s,
                                             full_matrices=False)
                keep = max(1, int((sv > sv.max() * 1e-7).sum())) if sv.numel() else 1
                a, b = vh[:keep], u[:, :keep] * sv[:keep]
        r = a.shape[0]
        if len(shape) == 4:
            a, b = a.reshape(r, *shape[1:]), b.reshape(shape[0], r, 1, 1)
        out[f"{prefix}{n}.lora_A.weight"] = a.contiguous()
        out[f"{prefix}{n}.lora_B.weight"] = b.contiguous()
    return out
