"""Timestep samplers: where along the diffusion chain the training steps are spent.

- ``uniform``: t ~ U{0..T-1}.
- ``concept`` (SPARE): p(t) proportional to how much the concept changes the model's prediction at
  t, measured on the model itself as ``g(t) = E ||f(x_t, t, c_concept) - f(x_t, t, c_surrogate)||^2``
  on a grid of timesteps, mixed with a uniform floor so no timestep has zero probability.

``t`` is a step index of the model's forward process (:mod:`spare_core.process`): DDPM timesteps
for VP models, positions on the (shifted) sigma grid for flow models, so both samplers cover the
family's own range; ``f`` is the prediction in the process's space.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from .conditioning import context_rows
from .denoiser import Denoiser, compute_dtype_of, device_of, prediction
from .process import process_of


GAP_BINS = 10
"""Timestep bins (one forward pass of the pool each) the concept sampler measures gaps on."""


class TimestepSampler(Protocol):
    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` integer timesteps ``[n]`` (long, CPU)."""
        ...


class UniformSampler:
    def __init__(self, num_train_steps: int) -> None:
        self.T = int(num_train_steps)

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.T, (n,), generator=generator)

    def probs(self) -> Tensor:
        return torch.full((self.T,), 1.0 / self.T)


class ConceptSampler:
    """Samples t from a piecewise-constant density over ``len(grid)`` bins of [0, T).

    Args:
        gaps: ``[K]`` non-negative gap per grid bin.
        floor: share of probability spread uniformly (in (0, 1]) so every t keeps mass.
    """

    def __init__(self, gaps: Tensor, num_train_steps: int, floor: float = 0.2) -> None:
        if not (0.0 < floor <= 1.0):
            raise ValueError(f"floor must be in (0, 1], got {floor}")
        gaps = gaps.double().clamp_min(0)
        k = gaps.numel()
        shape = gaps / gaps.sum() if float(gaps.sum()) > 0 else torch.full((k,), 1.0 / k)
        self.bin_probs = (1 - floor) * shape + floor / k
        self.gaps = gaps.float()
        self.T, self.K = int(num_train_steps), k
        self.edges = torch.linspace(0, self.T, k + 1).round().long()

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        bins = torch.multinomial(self.bin_probs, n, replacement=True, generator=generator)
        lo, hi = self.edges[bins], self.edges[bins + 1]
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (lo + (u * (hi - lo).double()).long()).clamp(max=self.T - 1)

    def probs(self) -> Tensor:
        """Per-timestep probability ``[T]`` (sums to 1)."""
        p = torch.zeros(self.T, dtype=torch.float64)
        for i in range(self.K):
            lo, hi = int(self.edges[i]), int(self.edges[i + 1])
            p[lo:hi] = self.bin_probs[i] / max(hi - lo, 1)
        return p.float()


@torch.no_grad()
def concept_gaps(denoiser: Denoiser, latents: Tensor, concept_ctx: Tensor, surrogate_ctx: Tensor,
                 bins: int = GAP_BINS, seed: int = 0,
                 callback: Callable[[int, int], None] | None = None,
                 batch_size: int = 256) -> Tensor:
    """``g`` ``[bins]``: mean squared gap between concept- and surrogate-conditioned predictions on
    ``latents`` ``[N, C, H, W]`` noised to the middle timestep of each bin (``batch_size``
    latents, i.e. twice as many UNet inputs, per forward). The contexts are ``[1, L, D]`` or one
    per latent ``[N, L, D]`` (several concepts, each with its surrogate)."""

    proc = process_of(denoiser)
    T = proc.num_steps
    dev = device_of(denoiser)
    dtype = compute_dtype_of(denoiser)
    gen = torch.Generator().manual_seed(seed)
    edges = torch.linspace(0, T, bins + 1)
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen)
    gaps = []
    for i in range(bins):
        t_mid = int((edges[i] + edges[i + 1]) / 2)
        total = torch.zeros((), dtype=torch.float64)
        for lo in range(0, n, batch_size):
            x0, eps = latents[lo:lo + batch_size].float(), noise[lo:lo + batch_size]
            m = x0.shape[0]
            t = torch.full((m,), t_mid, dtype=torch.long)
            x_t = proc.q_sample(x0, t, eps).to(dev, dtype)
            tt = t.to(dev)
            ctx = torch.cat([context_rows(concept_ctx, lo, m, n),
                             context_rows(surrogate_ctx, lo, m, n)]).to(dev)
            e = prediction(denoiser, torch.cat([x_t, x_t]), torch.cat([tt, tt]), ctx).float()
            e_c, e_s = e.chunk(2)
            total += ((e_c - e_s) ** 2).sum().double().cpu()
        gaps.append(total / latents[:1].numel() / n)
        if callback is not None:
            callback(i + 1, bins)
    return torch.stack(gaps).float()


def make_timestep_sampler(name: str, denoiser: Denoiser, latents: Tensor | None = None,
                          concept_ctx: Tensor | None = None, surrogate_ctx: Tensor | None = None,
                          bins: int = GAP_BINS, floor: float = 0.2, seed: int = 0,
                          callback: Callable[[int, int], None] | None = None,
                          batch_size: int = 256):
    """Build the sampler called ``name`` (``'uniform'`` or ``'concept'``)."""
    T = process_of(denoiser).num_steps
    if name == "uniform":
        return UniformSampler(T)
    if name == "concept":
        if latents is None or concept_ctx is None or surrogate_ctx is None:
            raise ValueError("the 'concept' timestep sampler needs concept latents and both contexts")
        return ConceptSampler(concept_gaps(denoiser, latents, concept_ctx, surrogate_ctx, bins, seed,
                                           callback, batch_size), T, floor)
    raise ValueError(f"unknown timestep sampler {name!r}; choose 'uniform' or 'concept'")


TIMESTEP_SAMPLERS = ("uniform", "concept")
