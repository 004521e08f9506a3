"""The canvas data set: procedurally rendered RGB images of 8 objects (shapes) x 8 styles
(textures and palettes), UnlearnCanvas's two-domain set-up at toy scale, and the draw of a
training prompt per image (the prompts themselves: :mod:`spare_core.canvas.names`).

Images are ``[N, 3, 16, 16]`` float32 in ``[-1, 1]``. Each image is one object (position, size
and colours random within its style's rules) on a background; ``plain`` is UnlearnCanvas's photo
class (a flat object on a flat background). Rendering is vectorised torch and seeded by a
``torch.Generator``, so the training set is drawn fresh every step and needs no files.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .names import OBJECTS, STYLES

SIZE = 16


def draw_prompt_index(style: Tensor, obj: Tensor, gen: torch.Generator,
                      p_style_only: float = 0.1, p_object_only: float = 0.1,
                      p_empty: float = 0.1) -> Tensor:
    """Index into :func:`~spare_core.canvas.names.training_prompts` for each (style, object) label ``[B]``: a full prompt
    (random names and template), or with the given probabilities a one-domain or the empty
    prompt (classifier-free-guidance dropout)."""
    b = style.shape[0]
    ns, no = len(STYLES), len(OBJECTS)
    ws, wo, t = (torch.randint(0, 2, (b,), generator=gen) for _ in range(3))
    full = (((style * no + obj) * 2 + ws) * 2 + wo) * 2 + t
    base_s = ns * no * 8
    s_only = base_s + (style * 2 + ws) * 2 + t
    base_o = base_s + ns * 4
    o_only = base_o + (obj * 2 + wo) * 2 + t
    empty = torch.full_like(full, base_o + no * 4)
    u = torch.rand(b, generator=gen)
    out = torch.where(u < p_style_only, s_only, full)
    out = torch.where((u >= p_style_only) & (u < p_style_only + p_object_only), o_only, out)
    return torch.where(u >= 1 - p_empty, empty, out)


# ---- rendering -----------------------------------------------------------------------------

def _grid(b: int) -> tuple[Tensor, Tensor]:
    c = torch.arange(SIZE, dtype=torch.float32) + 0.5
    return c.view(1, 1, SIZE).expand(b, SIZE, SIZE), c.view(1, SIZE, 1).expand(b, SIZE, SIZE)


def object_masks(obj: Tensor, cx: Tensor, cy: Tensor, r: Tensor) -> Tensor:
    """Soft-free binary masks ``[B, H, W]`` (float 0/1) of objects ``obj`` ``[B]`` (indices into
    :data:`OBJECTS`) centred at ``(cx, cy)`` pixels with half-size ``r`` pixels."""
    b = obj.shape[0]
    x, y = _grid(b)
    dx = (x - cx.view(-1, 1, 1)) / r.view(-1, 1, 1)
    dy = (y - cy.view(-1, 1, 1)) / r.view(-1, 1, 1)
    ax, ay = dx.abs(), dy.abs()
    shapes = [
        dx ** 2 + dy ** 2 <= 1.0,                                            # circle
        (ax <= 0.82) & (ay <= 0.82),                                        # square
        (dy <= 0.75) & (dy >= -0.95) & (ax <= 0.55 * (dy + 0.95)),          # triangle
        ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0)),          # plus
        ax + ay <= 1.0,                                                     # diamond
        (dx ** 2 + dy ** 2 <= 1.0) & ((dx - 0.55) ** 2 + (dy + 0.1) ** 2 > 0.62),  # moon
        _heart(dx, dy),                                                     # heart
        (ay <= 0.95) & (ax <= 0.12 + 0.75 * ay),                           # hourglass
    ]
    stack = torch.stack(shapes, 1).float()  # [B, 8, H, W]
    return stack[torch.arange(b), obj]


def _heart(dx: Tensor, dy: Tensor) -> Tensor:
    x, y = dx * 1.15, -(dy * 1.2 - 0.15)
    return (x ** 2 + y ** 2 - 1) ** 3 - x ** 2 * y ** 3 <= 0


def _edge(mask: Tensor) -> Tensor:
    """One-pixel inner border of binary masks ``[B, H, W]``."""
    m = mask.unsqueeze(1)
    eroded = -torch.nn.functional.max_pool2d(-m, 3, 1, 1)
    return (m - eroded).squeeze(1).clamp(0, 1)


def _blur(mask: Tensor, k: int = 5) -> Tensor:
    m = mask.unsqueeze(1)
    return torch.nn.functional.avg_pool2d(m, k, 1, k // 2, count_include_pad=False).squeeze(1)


def _rand(b: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(b, generator=gen)


def _hue_colour(hue: Tensor, sat: Tensor, val: Tensor) -> Tensor:
    """HSV -> RGB ``[B, 3]`` in [0, 1] (hue in [0, 1))."""
    k = torch.tensor([5.0, 3.0, 1.0])
    h6 = hue.view(-1, 1) * 6
    t = ((k + h6) % 6)
    f = torch.clamp(torch.minimum(t, 4 - t), 0, 1)
    return val.view(-1, 1) * (1 - sat.view(-1, 1) * f)


def render(style: Tensor, obj: Tensor, gen: torch.Generator, *,
           loose_dots: bool = False) -> Tensor:
    """Images ``[B, 3, 16, 16]`` in [-1, 1] of ``obj`` ``[B]`` in ``style`` ``[B]`` (indices into
    :data:`OBJECTS` / :data:`STYLES`), random placement and colours from ``gen``.

    ``loose_dots`` (the classifier's training only; the diffusion model's data keep it off):
    each image's dot lattice loses a random share (up to half) of its dots and gains stray
    off-lattice dots (up to 6% of pixels), as the model's own samples draw them
    (benchmarks/RESULTS.md). It draws extra numbers from ``gen``, so it changes the stream.

    Styles: plain (flat object, flat light background), stripes (horizontal stripes of two
    colours, period 4), dots (dot lattice on the object), outline (1-px border only, white
    background), gradient (vertical two-colour ramp in the object, dark background), checker
    (2-px checkerboard in the object), grain (salt-and-pepper texture in object and background),
    neon (bright object with a halo on black)."""
    b = style.shape[0]
    r = _rand(b, 4.8, 6.6, gen)
    cx = 8 + _rand(b, -1.6, 1.6, gen)
    cy = 8 + _rand(b, -1.6, 1.6, gen)
    m = object_masks(obj, cx, cy, r)                                        # [B, H, W]
    hue = torch.rand(b, generator=gen)
    c1 = _hue_colour(hue, _rand(b, 0.6, 1.0, gen), _rand(b, 0.6, 1.0, gen))  # object colour
    c2 = _hue_colour((hue + 0.5) % 1, _rand(b, 0.5, 1.0, gen), _rand(b, 0.5, 1.0, gen))
    x, y = _grid(b)
    ph = torch.randint(0, 4, (b, 1, 1), generator=gen).float()
    light_bg = _hue_colour(torch.rand(b, generator=gen), _rand(b, 0.0, 0.25, gen),
                           _rand(b, 0.8, 0.95, gen))
    dark_bg = _hue_colour(torch.rand(b, generator=gen), _rand(b, 0.2, 0.6, gen),
                          _rand(b, 0.1, 0.25, gen))

    def paint(bg: Tensor, fg: Tensor, alpha: Tensor) -> Tensor:
        """bg ``[B, 3]`` or ``[B, 3, H, W]``, fg likewise, alpha ``[B, H, W]``."""
        bg = bg.view(b, 3, 1, 1).expand(b, 3, SIZE, SIZE) if bg.dim() == 2 else bg
        fg = fg.view(b, 3, 1, 1).expand(b, 3, SIZE, SIZE) if fg.dim() == 2 else fg
        a = alpha.unsqueeze(1)
        return bg * (1 - a) + fg * a

    def two(sel: Tensor) -> Tensor:  # [B, H, W] selector -> c1 / c2 field [B, 3, H, W]
        s = sel.unsqueeze(1).float()
        return c1.view(b, 3, 1, 1) * (1 - s) + c2.view(b, 3, 1, 1) * s

    stripes = two(((y + ph) % 4) < 2)
    lattice = (((x + ph) % 3) < 1) & (((y + ph) % 3) < 1)
    if loose_dots:
        keep = torch.rand(b, SIZE, SIZE, generator=gen) < _rand(b, 0.5, 1.0, gen).view(-1, 1, 1)
        stray = torch.rand(b, SIZE, SIZE, generator=gen) < _rand(b, 0.0, 0.06, gen).view(-1, 1, 1)
        lattice = (lattice & keep) | stray
    dots = two(lattice)
    t = ((y - (cy - r).view(-1, 1, 1)) / (2 * r).view(-1, 1, 1)).clamp(0, 1).unsqueeze(1)
    grad_field = c1.view(b, 3, 1, 1) * (1 - t) + c2.view(b, 3, 1, 1) * t
    checker = two((((x + ph) // 2 + (y + ph) // 2) % 2) == 1)
    speck = (torch.rand(b, SIZE, SIZE, generator=gen) < 0.3)
    grain_fg = two(speck)
    grain_bg = paint(light_bg, torch.zeros(b, 3), speck.float() * 0.3)
    neon_c = _hue_colour(hue, torch.full((b,), 0.9), torch.ones(b))
    halo = (_blur(m, 5) * 1.8).clamp(0, 1) * (1 - m) * 0.55
    black = torch.zeros(b, 3)
    white = torch.ones(b, 3) * 0.97

    out = torch.stack([
        paint(light_bg, c1, m),                                   # plain
        paint(light_bg, stripes, m),                              # stripes
        paint(light_bg, dots, m),                                 # dots
        paint(white, c1 * 0.7, _edge(m)),                         # outline
        paint(dark_bg, grad_field, m),                            # gradient
        paint(light_bg, checker, m),                              # checker
        paint(grain_bg, grain_fg, m),                             # grain
        paint(paint(black, neon_c, halo), neon_c, m),             # neon
    ], 1)                                                         # [B, 8, 3, H, W]
    img = out[torch.arange(b), style]
    return (img * 2 - 1).clamp(-1, 1)


def random_labels(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` uniform (style, object) labels ``[n]``, ``[n]``."""
    return (torch.randint(0, len(STYLES), (n,), generator=gen),
            torch.randint(0, len(OBJECTS), (n,), generator=gen))


def render_set(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """A fixed seeded set: images ``[n, 3, 16, 16]``, styles ``[n]``, objects ``[n]``."""
    gen = torch.Generator().manual_seed(seed)
    s, o = random_labels(n, gen)
    return render(s, o, gen), s, o


def render_grid_of_all(per_pair: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``per_pair`` renders of every (style, object) pair, style-major: ``[64 * per_pair, ...]``."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.arange(len(STYLES)).repeat_interleave(len(OBJECTS) * per_pair)
    o = torch.arange(len(OBJECTS)).repeat_interleave(per_pair).repeat(len(STYLES))
    return render(s, o, gen), s, o

