"""Per-module saliency bar chart drawn with PIL (no matplotlib), returned as a ComfyUI IMAGE."""
from __future__ import annotations

from typing import Collection, Mapping

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (250, 250, 248)
TEXT = (30, 30, 30)
BAR = (120, 144, 176)
HIGHLIGHT = (222, 110, 40)
EXCLUDED = (178, 178, 178)


def _short(name: str, limit: int) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def bar_chart(scores: Mapping[str, float], highlight: Collection[str] = (), *, title: str = "",
              excluded: Collection[str] = (), max_bars: int = 40, width: int = 900,
              row: int = 16) -> np.ndarray:
    """Horizontal bars of the ``max_bars`` highest ``scores`` (highest first), ``highlight``-ed
    names in orange, ``excluded`` names (modules that can never be chosen) in grey;
    ``[H, W, 3]`` uint8. A title too wide for the chart is cut with "..."."""
    if not scores:
        raise ValueError("no module scores to draw")
    ranked = drawn(scores, max_bars)
    top = max(v for _, v in ranked) or 1.0
    font = ImageFont.load_default()
    label_w, pad, head = int(width * 0.45), 8, 28
    height = head + row * len(ranked) + pad
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((pad, 8), _fit(draw, font, title, width - 2 * pad), fill=TEXT, font=font)
    chars = max(8, label_w // 6)
    bar_max = width - label_w - 2 * pad - 70
    for i, (name, value) in enumerate(ranked):
        y = head + i * row
        draw.text((pad, y + 2), _short(name, chars), fill=TEXT, font=font)
        length = max(1, int(bar_max * value / top))
        color = EXCLUDED if name in excluded else HIGHLIGHT if name in highlight else BAR
        draw.rectangle([label_w, y + 2, label_w + length, y + row - 3], fill=color)
        draw.text((label_w + length + 4, y + 2), f"{value:.3g}", fill=TEXT, font=font)
    return np.asarray(img, dtype=np.uint8)


def drawn(scores: Mapping[str, float], max_bars: int) -> list[tuple[str, float]]:
    """The ``(name, score)`` rows :func:`bar_chart` draws, highest first."""
    return sorted(scores.items(), key=lambda kv: -kv[1])[:max(1, max_bars)]


def _fit(draw: ImageDraw.ImageDraw, font, text: str, room: int) -> str:
    if draw.textlength(text, font=font) <= room:
        return text
    while text and draw.textlength(text + "...", font=font) > room:
        text = text[:-1]
    return text + "..."


def to_image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ComfyUI IMAGE ``[1, H, W, 3]`` float32 in [0, 1]."""
    return torch.from_numpy(pixels.astype(np.float32) / 255.0).unsqueeze(0)
