"""The forward process: how a clean latent is noised, and what the network predicts.

Every family the engine edits noises a clean latent as ``x_t = alpha_t x0 + sigma_t noise`` over
an integer step index ``t`` in ``0 .. T-1`` (0 = least noise):

- **VP** (SD1.x, SD2.x, SDXL): ``alpha = sqrt(ab)``, ``sigma = sqrt(1 - ab)`` from the training
  schedule's alpha-bar; the engine works in noise space (``space = "eps"``: v-prediction models
  are converted to eps by their backend), so the training target is the noise.
- **Rectified flow** (SD3, Flux, digits-dit): ``alpha = 1 - s``, ``sigma = s`` on the model's
  (shifted) sigma grid; the network predicts the velocity ``v = noise - x0`` (``space =
  "velocity"``), which is also the training target.

Methods index timesteps by ``t`` only and ask the process for coefficients, targets and
conversions, so none of them knows the family. Objectives that match two predictions work in
either space unchanged; those with a ground-truth target use :meth:`ForwardProcess.target`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SPACES = ("eps", "velocity")


@dataclass(frozen=True)
class ForwardProcess:
    """``x_t = alpha[t] x0 + sigma[t] noise``; ``alpha``, ``sigma`` ``[T]`` float64 on CPU.

    Attributes:
        space: what the network's prediction is: ``"eps"`` (noise) or ``"velocity"``
            (``noise - x0``, rectified flow).
        alphas_cumprod: ``[T]`` float32 alpha-bar for VP processes (kept so VP arithmetic stays
            exactly what it was); None for flow.
        model_t: ``[T]`` float32, the timestep value the network is fed at each index (the
            integer t for VP; ``1000 s`` for SD3, ``s`` for Flux: the backend decides).
    """

    alpha: Tensor
    sigma: Tensor
    space: str
    alphas_cumprod: Tensor | None = None
    model_t: Tensor | None = None

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"prediction space must be one of {SPACES}, got {self.space!r}")
        if self.alpha.shape != self.sigma.shape or self.alpha.dim() != 1:
            raise ValueError("alpha and sigma must be 1-D tensors of the same length")

    @classmethod
    def vp(cls, alphas_cumprod: Tensor) -> "ForwardProcess":
        """Variance-preserving process of a DDPM schedule ``[T]``, noise-space predictions."""
        ab = alphas_cumprod.detach().float().cpu()
        a64 = ab.double()
        return cls(a64.sqrt(), (1 - a64).sqrt(), "eps", ab, torch.arange(ab.numel()).float())

    @classmethod
    def flow(cls, sigmas: Tensor, model_t: Tensor | None = None) -> "ForwardProcess":
        """Rectified flow over ``sigmas`` ``[T]`` ascending in (0, 1] (index 0 least noise),
        velocity predictions; ``model_t`` defaults to ``1000 * sigmas``."""
        s = sigmas.detach().double().cpu()
        if s.dim() != 1 or not bool((s[1:] >= s[:-1]).all()) or float(s[0]) <= 0 or float(s[-1]) > 1:
            raise ValueError("flow sigmas must be ascending in (0, 1]")
        mt = (s * 1000).float() if model_t is None else model_t.detach().float().cpu()
        return cls(1 - s, s, "velocity", None, mt)

    @property
    def num_steps(self) -> int:
        """T, the number of step indices."""
        return self.alpha.numel()

    @property
    def is_vp(self) -> bool:
        return self.alphas_cumprod is not None

    def coeffs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` shaped ``[B, 1, ..., 1]`` (``[]`` for a 0-d ``t``) in
        ``like``'s dtype and device. VP computes ``sqrt(ab)``, ``sqrt(1 - ab)`` in that dtype
        from alpha-bar, exactly as the engine always has (so results stay bit-identical)."""
        idx = t.long().cpu()
        shape = (-1, *([1] * (like.dim() - 1))) if idx.dim() else ()
        if self.is_vp:
            a = self.alphas_cumprod[idx].reshape(shape).to(like.device, like.dtype)
            return a.sqrt(), (1 - a).sqrt()
        return (self.alpha[idx].reshape(shape).to(like.device, like.dtype),
                self.sigma[idx].reshape(shape).to(like.device, like.dtype))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = alpha_t x0 + sigma_t noise`` for ``t`` ``[B]`` step indices."""
        a, s = self.coeffs(t, x0)
        return a * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The training target of a prediction: ``noise`` (eps) or ``noise - x0`` (velocity)."""
        return noise if self.space == "eps" else noise - x0

    def eps_and_x0(self, pred: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(eps, x0)`` from a prediction in this space. Velocity: ``x0 = x_t - sigma v``,
        ``eps = x_t + alpha v`` (no division, finite at sigma = 1). Eps: ``(pred, None)``; x0 is
        then ``(x_t - sigma eps) / alpha``, done by the caller only where alpha > 0."""
        if self.space == "eps":
            return pred, None
        a, s = self.coeffs(t, pred)
        return x_t + a * pred, x_t - s * pred


def process_of(denoiser) -> ForwardProcess:
    """The denoiser's ``process``; a backend without one (a minimal test double, an older
    backend) is VP over its ``alphas_cumprod``."""
    proc = getattr(denoiser, "process", None)
    return proc if proc is not None else ForwardProcess.vp(denoiser.alphas_cumprod)
