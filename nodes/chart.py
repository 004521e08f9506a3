"""Charts drawn with PIL (no matplotlib), returned as ComfyUI IMAGEs: the per-module saliency bars
and the training loss of the unlearning nodes."""
from __future__ import annotations

from typing import Collection, Mapping, Sequence

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


LOSS = (40, 70, 140)
LOSS_RAW = (176, 190, 214)
TERM_COLORS = ((222, 110, 40), (60, 150, 90), (150, 90, 170), (120, 120, 120))
SEPARATOR = (200, 200, 200)


def smoothed(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing): the first
    value is the first point, not ``(1 - weight)`` of it."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def loss_chart(runs: Sequence[tuple[str, Mapping]], *, title: str = "", width: int = 768,
               height: int = 384) -> np.ndarray:
    """The training loss of one or more runs (``(label, history)``, each history with ``loss``
    per step and ``terms``, a dict of the objective's terms per step), drawn left to right
    (several runs: a list trained one concept at a time, split by grey lines): the raw loss
    (light), its smoothed line (dark) and each term (``forget``, ``preserve``, ...) apart.
    The y axis is logarithmic when every value is positive and they span more than 20x.
    ``[height, width, 3]`` uint8; with no step at all (a data run stopped before its first
    step), the title and that sentence."""
    font = ImageFont.load_default()
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), _fit(draw, font, title, width - 16), fill=TEXT, font=font)
    runs = [(label, h) for label, h in runs if h.get("loss")]
    if not runs:
        draw.text((8, height // 2), "no training step ran: the run stopped before its first step",
                  fill=TEXT, font=font)
        return np.asarray(img, dtype=np.uint8)
    term_keys = list(dict.fromkeys(k for _, h in runs for t in h.get("terms", []) for k in t))
    series = [v for _, h in runs for v in h["loss"]]
    series += [t[k] for _, h in runs for t in h.get("terms", []) for k in t]
    finite = [v for v in series if np.isfinite(v)]
    log = bool(finite) and min(finite) > 0 and max(finite) > 20 * min(finite)
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if log:
        lo, hi = np.log10(lo), np.log10(hi)
    hi = hi if hi > lo else lo + 1.0

    left, right, top, bottom = 56, 12, 40, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    total = sum(len(h["loss"]) for _, h in runs)

    def x_of(step: int) -> float:
        return left + plot_w * step / max(1, total - 1)

    def xy(step: int, value: float) -> tuple[float, float]:
        v = np.log10(value) if log else value
        return x_of(step), top + plot_h * (1 - (v - lo) / (hi - lo))

    def line(start: int, values: Sequence[float], color, w: int) -> None:
        pts = [xy(start + i, v) for i, v in enumerate(values) if np.isfinite(v) and (v > 0 or not log)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=w)

    legend = [("loss", LOSS_RAW), ("smoothed", LOSS)] + [
        (k, TERM_COLORS[i % len(TERM_COLORS)]) for i, k in enumerate(term_keys)]
    x = 8
    for name, color in legend:
        draw.rectangle([x, 24, x + 10, 32], fill=color)
        draw.text((x + 14, 22), name, fill=TEXT, font=font)
        x += 24 + int(draw.textlength(name, font=font))
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill=TEXT)
    for frac in (0.0, 0.5, 1.0):
        v = lo + (hi - lo) * frac
        label = f"{10 ** v:.3g}" if log else f"{v:.3g}"
        draw.text((4, top + plot_h * (1 - frac) - 6), label, fill=TEXT, font=font)
    draw.text((left + plot_w // 2 - 30, height - 16), f"step (of {total})", fill=TEXT, font=font)
    start = 0
    for label, h in runs:
        n = len(h["loss"])
        if len(runs) > 1:
            sx = x_of(start)
            if start:
                draw.line([(sx, top), (sx, top + plot_h)], fill=SEPARATOR)
            draw.text((sx + 3, top + 2), _short(label, 24), fill=TEXT, font=font)
        line(start, h["loss"], LOSS_RAW, 1)
        for i, k in enumerate(term_keys):
            line(start, [t.get(k, float("nan")) for t in h.get("terms", [])],
                 TERM_COLORS[i % len(TERM_COLORS)], 1)
        line(start, smoothed(h["loss"]), LOSS, 2)
        start += n
    return np.asarray(img, dtype=np.uint8)
