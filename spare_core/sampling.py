"""Samplers over the Denoiser protocol: ancestral DDPM and deterministic DDIM with
classifier-free guidance.

Written by hand rather than with diffusers' schedulers because the engine has only
``alphas_cumprod`` from every backend (ComfyUI's model has no diffusers scheduler), and the same
code must generate identically on each.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .denoiser import Denoiser, compute_dtype_of, device_of, eps_and_x0, x0_from_eps


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
def sample(denoiser: Denoiser, prompts: Sequence[str] | Tensor, *, steps: int = 50,
           guidance: float = 3.0, negative_prompt: str = "", method: str = "ddpm",
           generator: torch.Generator | None = None, clip_x0: float | None = None,
           x_T: Tensor | None = None, batch_size: int = 256,
           callback: Callable[[int, int], None] | None = None) -> Tensor:
    """Generate latents ``[N, C, H, W]`` for N prompts (or a ready context ``[N, L, D]``).

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
    cond = prompts if isinstance(prompts, Tensor) else denoiser.encode(list(prompts))
    n = cond.shape[0]
    uncond_one = denoiser.encode([negative_prompt]) if guidance != 1.0 else None
    ac = denoiser.alphas_cumprod.to(dev, torch.float32)
    grid = timestep_grid(ac.numel(), steps)
    if x_T is None:
        x_T = torch.randn((n, *denoiser.latent_shape), generator=generator)
    outs = []
    chunks = -(-n // batch_size)
    for lo in range(0, n, batch_size):
        c = cond[lo:lo + batch_size].to(dev)
        u = uncond_one.expand(c.shape[0], -1, -1).to(dev) if uncond_one is not None else None
        x = x_T[lo:lo + batch_size].to(dev, torch.float32)
        for i, t in enumerate(grid):
            a_t = ac[t]
            a_prev = ac[grid[i + 1]] if i + 1 < len(grid) else torch.tensor(1.0, device=dev)
            tt = torch.full((x.shape[0],), t, device=dev, dtype=torch.long)
            e, x0 = guided_prediction(denoiser, x.to(compute_dtype), tt, c, u, guidance)
            if x0 is None:
                x0 = x0_from_eps(x, e, a_t)
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
                e = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            if method == "ddim" or i + 1 == len(grid):
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
            else:
                beta = 1 - a_t / a_prev
                mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + \
                       ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x
                var = beta * (1 - a_prev) / (1 - a_t)
                noise = torch.randn(x.shape, generator=generator).to(dev)
                x = mean + var.sqrt() * noise
            if callback is not None:
                callback((lo // batch_size) * len(grid) + i + 1, chunks * len(grid))
        outs.append(x.cpu())
    return torch.cat(outs)


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``; t ``[B]`` integer."""
    a = alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise
