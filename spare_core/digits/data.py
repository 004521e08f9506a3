"""The digits data set of the embedded model: scikit-learn's ``load_digits`` (1797 images, 8x8,
values 0..16) scaled to ``[-1, 1]``, the prompts, and the data-unlearning "pattern" set."""
from __future__ import annotations

import torch
from torch import Tensor

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROMPTS = [f"a handwritten digit {n}" for n in NAMES]
EMPTY_PROMPT = ""


def prompt_for(d: int) -> str:
    """Prompt of digit ``d`` (0..9), e.g. ``prompt_for(7) == "a handwritten digit seven"``."""
    if not 0 <= int(d) <= 9:
        raise ValueError(f"digit must be in 0..9, got {d}")
    return PROMPTS[int(d)]


def load_digit_images() -> tuple[Tensor, Tensor]:
    """All 1797 digits: images ``[N, 1, 8, 8]`` float32 in ``[-1, 1]`` and labels ``[N]`` int64."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(ds.target, dtype=torch.long)
    return x, y


def split_indices(n: int, held_out: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded random split of ``range(n)``: (train indices, held-out indices)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * held_out))
    return perm[k:], perm[:k]


def pattern_image() -> Tensor:
    """The out-of-distribution pattern ``[1, 8, 8]`` in ``{-1, 1}``: a checkerboard of 2x2 blocks
    (nothing like a digit: digits have a dark border and a connected stroke)."""
    i = torch.arange(8)
    board = ((i.view(-1, 1) // 2 + i.view(1, -1) // 2) % 2).float()
    return (board * 2 - 1).unsqueeze(0)


def mixed_training_set(n_pattern: int) -> tuple[Tensor, Tensor]:
    """Digits plus ``n_pattern`` copies of :func:`pattern_image`.

    Returns images ``[N + n_pattern, 1, 8, 8]`` in ``[-1, 1]`` and labels ``[N + n_pattern]``
    where the pattern's label is ``-1`` (trained with the empty prompt only; the digits get their
    prompts and classifier-free-guidance dropout)."""
    x, y = load_digit_images()
    if n_pattern <= 0:
        return x, y
    p = pattern_image().unsqueeze(0).expand(n_pattern, -1, -1, -1)
    return torch.cat([x, p]), torch.cat([y, torch.full((n_pattern,), -1, dtype=torch.long)])


def prompts_for_labels(labels: Tensor) -> list[str]:
    """Prompt per label; ``-1`` (pattern) maps to the empty prompt."""
    return [EMPTY_PROMPT if int(v) < 0 else PROMPTS[int(v)] for v in labels]
