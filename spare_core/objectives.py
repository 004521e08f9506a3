"""Unlearning objectives: each is a function of (student eps, frozen-teacher eps, batch).

``student(x_t, t, ctx)`` runs the UNet with the adapter on (gradients flow into the adapter);
``teacher(x_t, t, ctx)`` runs the same UNet with the adapter off, without gradients. Objectives
batch their student and teacher calls so one training step costs one student and one teacher
forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

EpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class Part:
    """One side of a batch: clean latents ``x0`` ``[B, C, H, W]``, ``noise`` (same shape),
    timesteps ``t`` ``[B]``, noisy ``x_t`` and text context ``ctx`` ``[B, L, D]``."""

    x0: Tensor
    noise: Tensor
    t: Tensor
    x_t: Tensor
    ctx: Tensor

    def __len__(self) -> int:
        return self.x0.shape[0]


@dataclass
class Batch:
    """What an objective gets each step.

    Attributes:
        forget: latents of what is forgotten (concept images or the forget set), with the concept
            context.
        preserve: latents of what must be kept (preserved prompts or the keep set), or None.
        surrogate_ctx: ``[B_forget, L, D]`` context of the surrogate prompt.
        uncond_ctx: ``[1, L, D]`` context of the empty prompt.
        alphas_cumprod: ``[T]`` training schedule.
        extras: objective-specific tensors a batch builder adds (e.g. SISS's mixture weights).
    """

    forget: Part
    preserve: Part | None
    surrogate_ctx: Tensor
    uncond_ctx: Tensor
    alphas_cumprod: Tensor
    extras: dict | None = None


class Objective(Protocol):
    name: str

    def __call__(self, student: EpsFn, teacher: EpsFn, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss to minimise and a dict of named float terms for the history."""
        ...


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error in float32."""
    return ((a.float() - b.float()) ** 2).mean()


def _cat(*xs: Tensor) -> Tensor:
    return torch.cat(xs) if len(xs) > 1 else xs[0]


class SelfDistill:
    """SPARE stage 2: ``wf * ||s(x_c, t, c) - T(x_c, t, c_sur)||^2 + wp * ||s(x_p, t, p) - T(x_p, t, p)||^2``.

    The student on the concept prompt matches the frozen original on the surrogate prompt; on
    preserved prompts it matches the frozen original on the same prompts.
    """

    name = "self_distill"

    def __init__(self, forget_weight: float = 1.0, preserve_weight: float = 1.0) -> None:
        self.wf, self.wp = float(forget_weight), float(preserve_weight)

    def __call__(self, student: EpsFn, teacher: EpsFn, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        f, p = batch.forget, batch.preserve
        nf = len(f)
        if p is None:
            s = student(f.x_t, f.t, f.ctx)
            target = teacher(f.x_t, f.t, batch.surrogate_ctx)
            lf = mse(s, target)
            return self.wf * lf, {"forget": lf.item()}
        s = student(_cat(f.x_t, p.x_t), _cat(f.t, p.t), _cat(f.ctx, p.ctx))
        target = teacher(_cat(f.x_t, p.x_t), _cat(f.t, p.t), _cat(batch.surrogate_ctx, p.ctx))
        lf, lp = mse(s[:nf], target[:nf]), mse(s[nf:], target[nf:])
        return self.wf * lf + self.wp * lp, {"forget": lf.item(), "preserve": lp.item()}


OBJECTIVES: dict[str, type] = {"self_distill": SelfDistill}


def make_objective(name: str, **kwargs) -> Objective:
    """Objective by registry name; kwargs go to its constructor."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)
