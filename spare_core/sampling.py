"""Samplers over the Denoiser protocol: ancestral (DDPM) and deterministic (DDIM) steps with
classifier-free guidance, for any forward process ``x_t = alpha_t x0 + sigma_t noise``.

Both are written on ``(alpha, sigma)``: DDIM is ``x_prev = alpha_prev x0 + sigma_prev eps``,
which on a rectified flow (``alpha = 1 - s``) is exactly the Euler step ``x += (s_prev - s) v``
flow models are sampled with; the ancestral step draws from the Gaussian posterior
``q(x_prev | x_t, x0)`` (on a VP schedule, DDPM's own formula). Written by hand rather than with
diffusers' schedulers because the engine has only the process from every backend (ComfyUI's
model has no diffusers scheduler), and the same code must generate identically on each.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .denoiser import Denoiser, compute_dtype_of, device_of, eps_and_x0
from .process import ForwardProcess, process_of


def timestep_grid(num_train_steps: int, steps: int) -> list[int]:
    """``steps`` integer timesteps, descending from T-1 to 0, evenly spaced."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be in 1..{num_train_steps}, got {steps}")
    grid = torch.linspace(num_train_steps - 1, 0, steps).round().long().tolist()
    return sorted(set(grid), reverse=True)


def guided_prediction(denoiser: Denoiser, x: Tensor, t: Tensor, cond: Tensor,
                      uncond: Tensor | None, guidance: float) -> tuple[Tensor, Tensor | None]:
    """CFG ``(eps, x0)`` (float32): each is ``u + g (c - u)`` (both are affine in the model's
    output, so guiding one guides the other); x0 None where the backend gives none (then it is
    derived from the guided eps). One batched UNet call when ``g != 1``."""
    if uncond is None or guidance == 1.0:
        return eps_and_x0(denoiser, x, t, cond)
    e, x0 = eps_and_x0(denoiser, torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))
    e_u, e_c = e.chunk(2)
    guided = e_u + guidance * (e_c - e_u)
    if x0 is None:
        return guided, None
    x_u, x_c = x0.chunk(2)
    return guided, x_u + guidance * (x_c - x_u)


@torch.no_grad()
def sample(denoiser: Denoiser, prompts, *, steps: int = 50,
           guidance: float = 3.0, negative_prompt: str = "", method: str = "ddpm",
           generator: torch.Generator | None = None, clip_x0: float | None = None,
           x_T: Tensor | None = None, batch_size: int = 256,
           callback: Callable[[int, int], None] | None = None) -> Tensor:
    """Generate latents ``[N, C, H, W]`` for N prompts (or a ready context: ``[N, L, D]`` or a
    :class:`~spare_core.conditioning.Context` of N).

    Args:
        method: ``"ddpm"`` (ancestral, stochastic) or ``"ddim"`` (deterministic, eta=0).
        clip_x0: clamp the predicted x0 to ``[-clip_x0, clip_x0]`` (pixel-space models); None for
            latent models.
        generator: CPU generator for the initial noise and ancestral noise (reproducible).
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
    dev = device_of(denoiser)
    compute_dtype = compute_dtype_of(denoiser)
    proc = process_of(denoiser)
    cond = prompts if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence) \
        else denoiser.encode(list(prompts))
    n = cond.shape[0]
    uncond_one = denoiser.encode([negative_prompt]) if guidance != 1.0 else None
    grid = timestep_grid(proc.num_steps, steps)
    if x_T is None:
        x_T = torch.randn((n, *denoiser.latent_shape), generator=generator)
    outs = []
    chunks = -(-n // batch_size)
    one = torch.ones((), device=dev)
    for lo in range(0, n, batch_size):
        c = cond[lo:lo + batch_size].to(dev)
        u = uncond_one.expand(c.shape[0], -1, -1).to(dev) if uncond_one is not None else None
        x = x_T[lo:lo + batch_size].to(dev, torch.float32)
        for i, t in enumerate(grid):
            tt = torch.full((x.shape[0],), t, device=dev, dtype=torch.long)
            a_t, s_t = proc.coeffs(torch.tensor(t), one)
            last = i + 1 == len(grid)
            a_p, s_p = (one, 0 * one) if last else proc.coeffs(torch.tensor(grid[i + 1]), one)
            e, x0 = guided_prediction(denoiser, x.to(compute_dtype), tt, c, u, guidance)
            if x0 is None:
                x0 = (x - s_t * e) / a_t
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
                e = (x - a_t * x0) / s_t
            if method == "ddim" or last:
                x = a_p * x0 + s_p * e
            else:
                x = _ancestral_step(proc, t, grid[i + 1], x, x0, e, generator)
            if callback is not None:
                callback((lo // batch_size) * len(grid) + i + 1, chunks * len(grid))
        outs.append(x.cpu())
    return torch.cat(outs)


def _ancestral_step(proc: ForwardProcess, t: int, t_prev: int, x: Tensor, x0: Tensor, e: Tensor,
                    generator: torch.Generator | None) -> Tensor:
    """One draw from ``q(x_prev | x_t, x0)``. VP: DDPM's posterior on alpha-bar (as always);
    otherwise the same Gaussian posterior for ``x_t = alpha x0 + sigma noise``: variance
    ``c^2 = s_p^2 (1 - (a_t s_p / (a_p s_t))^2)``, mean ``a_p x0 + sqrt(s_p^2 - c^2) eps``."""
    dev = x.device
    noise = torch.randn(x.shape, generator=generator).to(dev)
    if proc.is_vp:
        ac = proc.alphas_cumprod.to(dev, torch.float32)
        a_t, a_prev = ac[t], ac[t_prev]
        beta = 1 - a_t / a_prev
        mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + \
               ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x
        var = beta * (1 - a_prev) / (1 - a_t)
        return mean + var.sqrt() * noise
    one = torch.ones((), device=dev)
    a_t, s_t = proc.coeffs(torch.tensor(t), one)
    a_p, s_p = proc.coeffs(torch.tensor(t_prev), one)
    c2 = (s_p ** 2 * (1 - (a_t * s_p / (a_p * s_t)) ** 2)).clamp_min(0)
    return a_p * x0 + (s_p ** 2 - c2).clamp_min(0).sqrt() * e + c2.sqrt() * noise


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """VP forward diffusion ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``; t ``[B]`` integer
    (``ForwardProcess.q_sample`` does any process)."""
    return ForwardProcess.vp(alphas_cumprod).q_sample(x0, t, noise)
