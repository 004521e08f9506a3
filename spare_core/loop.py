"""The unlearning loop: one engine for every method (task x objective x adapter x sampler)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .adapter import UnlearnAdapter
from .saliency import Saliency
from .denoiser import Denoiser
from .objectives import Objective, make_objective


class UnlearnCancelled(InterruptedError):
    """Raised when ``should_stop()`` turns true; the model is left as it was given."""


class NonFiniteLoss(FloatingPointError):
    """Raised when a loss or gradient becomes NaN/inf; the model is left as it was given."""


@dataclass
class UnlearnConfig:
    """Training settings. ``lr`` is the AdamW learning rate of the adapter's parameters."""

    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    timestep_sampler: str = "concept"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0

    def validate(self) -> None:
        if not isinstance(self.steps, int) or self.steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite positive number, got {self.lr!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        from .timesteps import TIMESTEP_SAMPLERS
        if self.timestep_sampler not in TIMESTEP_SAMPLERS:
            raise ValueError(f"unknown timestep sampler {self.timestep_sampler!r}; "
                             f"choose one of {list(TIMESTEP_SAMPLERS)}")


@dataclass
class UnlearnResult:
    """The trained adapter (detached from the model) and the run's history.

    history keys: ``loss`` (per step), ``terms`` (per step dict), ``seconds``, ``trainable_params``,
    ``timestep_probs`` (``[T]`` list, the sampler's density).
    """

    adapter: UnlearnAdapter
    history: dict = field(default_factory=dict)
    saliency: "Saliency | None" = None  # set by methods that localize first (spare, salun)


ProgressFn = Callable[[int, int, float], None]


def unlearn(denoiser: Denoiser, adapter: UnlearnAdapter, task, objective: str | Objective = "self_distill",
            config: UnlearnConfig | None = None, *, objective_kwargs: dict | None = None,
            progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
            prepare_progress: Callable[[str, int, int], None] | None = None) -> UnlearnResult:
    """Train ``adapter`` on ``denoiser`` for ``task`` with ``objective``.

    Every input is validated before any work. The adapter is attached to ``denoiser.unet`` only for
    the run (weight parametrizations; the UNet's tensors are never written) and detached in all
    cases, also on cancellation or a non-finite loss.
    """
    config = config or UnlearnConfig()
    config.validate()
    task.validate(denoiser)
    adapter.check_compatible(denoiser.unet)
    obj = make_objective(objective, **(objective_kwargs or {})) if isinstance(objective, str) else objective
    if adapter.num_trainable() == 0:
        raise ValueError("the adapter has no trainable parameters (empty mask?)")

    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    task.prepare(denoiser, config.timestep_sampler, config.seed, prepare_progress)
    gen = torch.Generator().manual_seed(config.seed)

    params = [p for p in adapter.parameters()]
    for p in params:
        p.requires_grad_(True)
    unet = denoiser.unet
    unet_flags = {p: p.requires_grad for p in unet.parameters()}
    unet.requires_grad_(False)
    was_training = unet.training
    unet.eval()  # no dropout: the teacher and the student must see the same network
    adapter.attach(unet)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def student(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return denoiser.eps(x, t, c)

    @torch.no_grad()
    def teacher(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        with adapter.disabled():
            return denoiser.eps(x, t, c)

    losses: list[float] = []
    terms: list[dict[str, float]] = []
    try:
        with torch.enable_grad():
            for step in range(config.steps):
                opt.zero_grad(set_to_none=True)
                step_loss, step_terms = 0.0, {}
                for _ in range(config.grad_accum):
                    if should_stop is not None and should_stop():
                        raise UnlearnCancelled(f"unlearning cancelled at step {step}/{config.steps}")
                    batch = task.batch(denoiser, config.batch_size, gen)
                    loss, logs = obj(student, teacher, batch)
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(f"loss became {loss.item()} at step {step}: lower lr "
                                            f"(now {config.lr}) or use float32; the model is unchanged")
                    (loss / config.grad_accum).backward()
                    step_loss += loss.item() / config.grad_accum
                    for k, v in logs.items():
                        step_terms[k] = step_terms.get(k, 0.0) + v / config.grad_accum
                if config.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    if not torch.isfinite(norm):
                        raise NonFiniteLoss(f"gradient became non-finite at step {step}: lower lr; "
                                            "the model is unchanged")
                opt.step()
                losses.append(step_loss)
                terms.append(step_terms)
                if progress is not None:
                    progress(step + 1, config.steps, step_loss)
    finally:
        adapter.detach(unet)
        for p, flag in unet_flags.items():
            p.requires_grad_(flag)
        unet.train(was_training)
        for p in params:
            p.grad = None
    sampler = getattr(task, "sampler", None)
    history = {
        "loss": losses, "terms": terms, "seconds": time.perf_counter() - t0,
        "trainable_params": adapter.num_trainable(),
        "timestep_probs": sampler.probs().tolist() if sampler is not None and hasattr(sampler, "probs") else None,
        "objective": getattr(obj, "name", type(obj).__name__),
    }
    return UnlearnResult(adapter, history)
