"""Metrics of the digits benchmark (SPEC 4) and the loaders of the committed assets.

Images everywhere are ``[N, 1, 8, 8]`` float tensors in ``[-1, 1]`` (the model's pixel space).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import Tensor

from .data import load_digit_images, prompt_for

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEFAULT_MODEL = os.path.join(ASSETS, "digits")
PATTERN_MODEL = os.path.join(ASSETS, "digits_pattern")
DIT_MODEL = os.path.join(ASSETS, "digits_dit")
EMBEDDED_MODELS = {"digits": DEFAULT_MODEL, "digits-dit": DIT_MODEL}
"""``--model`` names of the embedded concept models: the SD-structured UNet (DDPM) and its
flow-matching twin (an SD3 transformer with the same text encoder), trained on the same data."""
CLASSIFIER = os.path.join(ASSETS, "digit_classifier.safetensors")

SAMPLE_STEPS = 50       # ancestral DDPM steps of the bench sampler (measured: 10/10 classes at 10-200)
SAMPLE_GUIDANCE = 3.0
PATTERN_RADIUS = 2.0    # L2 in [-1, 1] pixel units over 64 pixels (RMS error 0.25)


# ---- loaders -------------------------------------------------------------------------------

def load_default_model(device: str | torch.device = "cpu", name: str = "digits"):
    """A committed embedded model by ``--model`` name (:data:`EMBEDDED_MODELS`), offline:
    ``digits`` as a ``DiffusersDenoiser``, ``digits-dit`` as an ``SD3Denoiser``."""
    from ..families import load_denoiser

    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; choose from {sorted(EMBEDDED_MODELS)}")
    return load_denoiser(EMBEDDED_MODELS[name], device=device)


def default_sampler(denoiser) -> str:
    """The bench's sampler for a model: ancestral DDPM for VP models (as the digits rows always
    used), deterministic DDIM, i.e. the Euler flow sampler, for flow models."""
    from ..process import process_of

    return "ddpm" if process_of(denoiser).is_vp else "ddim"


def load_pattern_model(device: str | torch.device = "cpu"):
    """The data-unlearning twin (digits + checkerboard pattern) as a ``DiffusersDenoiser``."""
    from ..denoiser import DiffusersDenoiser

    return DiffusersDenoiser.from_pretrained(PATTERN_MODEL, device=device)


def load_classifier():
    """The committed :class:`~spare_core.digits.classifier.DigitClassifier` (eval mode, CPU)."""
    from .classifier import load_classifier_file

    return load_classifier_file(CLASSIFIER)


# ---- generation ----------------------------------------------------------------------------

def generate_digits(denoiser, digits: Sequence[int], n_per_digit: int, seed: int = 0, *,
                    steps: int = SAMPLE_STEPS, guidance: float = SAMPLE_GUIDANCE,
                    method: str | None = None,
                    callback: Callable[[int, int], None] | None = None) -> dict[int, Tensor]:
    """Sample ``n_per_digit`` images per digit from its prompt, in one batched call (the noise is
    fixed by ``seed``, ``digits`` and ``n_per_digit``, so before/after comparisons are paired).
    ``callback(i, n)`` reports sampler steps (as :func:`spare_core.sampling.sample`);
    ``method`` None takes the model's :func:`default_sampler`.

    Returns ``{digit: images [n_per_digit, 1, 8, 8] in [-1, 1]}``."""
    from ..sampling import sample

    digits = [int(d) for d in digits]
    prompts = [prompt_for(d) for d in digits for _ in range(n_per_digit)]
    x = sample(denoiser, prompts, steps=steps, guidance=guidance,
               method=method or default_sampler(denoiser),
               generator=torch.Generator().manual_seed(seed), clip_x0=1.0,
               callback=callback).clamp(-1, 1)
    return {d: x[i * n_per_digit:(i + 1) * n_per_digit] for i, d in enumerate(digits)}


def generate_unconditional(denoiser, n: int, seed: int = 0, *, steps: int = SAMPLE_STEPS,
                           method: str = "ddpm",
                           callback: Callable[[int, int], None] | None = None) -> Tensor:
    """``n`` samples ``[n, 1, 8, 8]`` from the empty prompt at guidance 1 (``callback(i, n)``
    reports sampler steps)."""
    from ..sampling import sample

    return sample(denoiser, [""] * n, steps=steps, guidance=1.0, method=method,
                  generator=torch.Generator().manual_seed(seed), clip_x0=1.0,
                  callback=callback).clamp(-1, 1)


def classify(classifier, images_by_digit: dict[int, Tensor]) -> dict[int, Tensor]:
    """Predicted labels ``{digit: [n] int64}``."""
    return {d: classifier.predict(x) for d, x in images_by_digit.items()}


# ---- metrics -------------------------------------------------------------------------------

def unlearning_accuracy(labels_pred: Tensor, forget_digit: int) -> float:
    """UA: share of predictions (for images of the forgotten prompt) NOT equal to the digit."""
    labels_pred = torch.as_tensor(labels_pred)
    if labels_pred.numel() == 0:
        raise ValueError("no predictions")
    # counts over the total in Python floats, so 9 of 10 is exactly 0.9 (float32 mean gives 0.8999..)
    return int((labels_pred != int(forget_digit)).sum()) / labels_pred.numel()


def per_class_accuracy(preds_by_digit: dict[int, Tensor]) -> dict[int, float]:
    """``{digit: share of its images labelled as that digit}``."""
    return {d: int((torch.as_tensor(p) == d).sum()) / torch.as_tensor(p).numel()
            for d, p in preds_by_digit.items()}


def retain_accuracy(preds_by_digit: dict[int, Tensor], forget_digit: int) -> float:
    """RA: share labelled correctly, pooled over every digit except ``forget_digit``."""
    kept = [torch.as_tensor(p) == d for d, p in preds_by_digit.items() if d != int(forget_digit)]
    if not kept:
        raise ValueError("no retained digits")
    hits = torch.cat(kept)
    return int(hits.sum()) / hits.numel()


def _sqrtm_psd(m: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix (eigenvalues clamped at 0)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to ``[Na, D]`` and ``[Nb, D]`` features:
    ``|mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2)`` in float64. Works for small N
    (rank-deficient covariances; one sample gives a zero covariance)."""
    a, b = torch.as_tensor(feats_a).double(), torch.as_tensor(feats_b).double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"need [Na, D] and [Nb, D] features, got {tuple(a.shape)}, {tuple(b.shape)}")

    def cov(x: Tensor) -> Tensor:
        if len(x) < 2:
            return torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
        xc = x - x.mean(0)
        return xc.T @ xc / (len(x) - 1)

    sa, sb = cov(a), cov(b)
    ra = _sqrtm_psd(sa)
    cross = torch.linalg.eigvalsh(ra @ sb @ ra).clamp(min=0).sqrt().sum()
    fd = (a.mean(0) - b.mean(0)).pow(2).sum() + sa.trace() + sb.trace() - 2 * cross
    return max(fd.item(), 0.0)


_REAL: dict[int, Tensor] | None = None


def real_digits_by_class() -> dict[int, Tensor]:
    """All real digits per class ``{d: [n_d, 1, 8, 8]}`` (cached)."""
    global _REAL
    if _REAL is None:
        x, y = load_digit_images()
        _REAL = {d: x[y == d] for d in range(10)}
    return _REAL


@torch.no_grad()
def fd_per_class(classifier, images_by_digit: dict[int, Tensor]) -> dict[int, float]:
    """``{digit: FD of classifier features of its generated images vs all its real images}``."""
    real = real_digits_by_class()
    classifier.eval()
    return {d: frechet_distance(classifier.features(x.clamp(-1, 1)),
                                classifier.features(real[d])) for d, x in images_by_digit.items()}


def pattern_rate(samples: Tensor, pattern: Tensor, radius: float = PATTERN_RADIUS) -> float:
    """Share of ``samples`` ``[N, 1, 8, 8]`` within L2 distance ``radius`` of ``pattern``
    ``[1, 8, 8]`` (or ``[8, 8]``)."""
    s = torch.as_tensor(samples).float().flatten(1)
    p = torch.as_tensor(pattern).float().reshape(1, -1)
    if s.shape[1] != p.shape[1]:
        raise ValueError(f"samples have {s.shape[1]} pixels, pattern {p.shape[1]}")
    return ((s - p).norm(dim=1) <= radius).float().mean().item()
