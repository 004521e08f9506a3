"""Before/after image grids (PNG) from latents, with row and column labels."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .files import atomic_write


def to_uint8_images(images: Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] (C = 1 or 3; other C: first 3 channels or the mean) ->
    ``[N, H, W, 3]`` uint8."""
    x = images.detach().float().cpu()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] != 3:
        x = x[:, :3] if x.shape[1] > 3 else x.mean(1, keepdim=True).repeat(1, 3, 1, 1)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def decode_latents(latents: Tensor, vae=None) -> Tensor:
    """Pixels ``[N, 3, H*f, W*f]`` in [-1, 1] via a diffusers VAE (undoing its scaling and, for
    SD3 / Flux VAEs, its shift factor), or the latents themselves when the model is pixel-space
    (no VAE, e.g. the embedded digits models)."""
    if vae is None:
        return latents
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        z = latents.to(next(vae.parameters()).device, next(vae.parameters()).dtype)
        return vae.decode(z / vae.config.scaling_factor + shift).sample.float().cpu()


def save_grid(cells: Sequence[Sequence[Tensor]], path: str, row_labels: Sequence[str] = (),
              col_labels: Sequence[str] = (), cell_px: int = 64) -> None:
    """Write a grid PNG atomically. ``cells[r][c]`` is ``[K, C, H, W]`` in [-1, 1]: K images shown
    side by side in that cell, each upscaled (nearest) to ``cell_px``."""
    from PIL import Image, ImageDraw

    rows, cols = len(cells), len(cells[0])
    k = cells[0][0].shape[0]
    label_w = 8 + 7 * max([len(s) for s in row_labels] + [0])
    head_h = 18 if col_labels else 0
    pad = 6
    width = label_w + cols * (k * cell_px + pad)
    img = Image.new("RGB", (width, head_h + rows * (cell_px + pad)), "white")
    draw = ImageDraw.Draw(img)
    for c, name in enumerate(col_labels):
        draw.text((label_w + c * (k * cell_px + pad) + 2, 2), name, fill="black")
    for r in range(rows):
        y = head_h + r * (cell_px + pad)
        if r < len(row_labels):
            draw.text((4, y + cell_px // 2 - 6), row_labels[r], fill="black")
        for c in range(cols):
            for i, arr in enumerate(to_uint8_images(cells[r][c])):
                tile = Image.fromarray(arr).resize((cell_px, cell_px), Image.NEAREST)
                img.paste(tile, (label_w + c * (k * cell_px + pad) + i * cell_px, y))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"), suffix=".png")
