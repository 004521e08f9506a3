"""Adversarial prompt attack on an erased model, in the manner of UnlearnDiffAtk (Zhang et al.,
ECCV 2024): find ``k`` prefix tokens that make the *erased* model denoise images of the erased
concept (made by the original model) as if the concept were still there.

For each attacked prompt ``c`` with images ``x0`` of its concept, the attack minimises over
prefix embeddings ``e = (e_1 .. e_k)``

    L(e) = E_{t, noise} || f_erased(x_t, t, enc([start] e c)) - target(x0, noise) ||^2

with the projection step of PEZ (Wen et al. 2023): the forward pass uses the nearest vocabulary
tokens of ``e`` (cosine similarity), the gradient updates the continuous ``e`` (straight-through),
so what is found is a prompt of real tokens: ``"<w_1> .. <w_k> c"``, which anyone can type and
any sampler can render. The expectation is taken over one fixed draw of ``(x0, t, noise)`` per
prompt (``batch_size`` of them), so every step's loss is exactly the loss of that step's tokens
and the attack keeps the best tokens it met (random draws per step made the loss too noisy for
40 steps to find anything on the embedded models). :class:`PrefixAttack` keeps its state between calls, so adversarial
training warm-starts it every few steps (:mod:`spare_core.probe.adversarial`).

Images are the model's own latents ``[.., C, H, W]``: pixels for the embedded models.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..denoiser import Denoiser, compute_dtype_of, device_of, prediction
from ..process import process_of
from ..storage_cast import upcast_copies
from .text import prompt_access


@dataclass
class AttackConfig:
    """``tokens`` prefix tokens (UnlearnDiffAtk: 5), ``steps`` optimisation steps (40),
    ``batch_size`` images per attacked prompt per step, ``lr``: Adam's step in units of the
    embedding table's per-coordinate standard deviation (about one token spacing per step)."""

    tokens: int = 5
    steps: int = 40
    lr: float = 1.0
    batch_size: int = 16
    seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"attack tokens must be a positive integer, got {self.tokens!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"attack steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0 or self.batch_size < 1:
            raise ValueError("attack lr must be > 0 and batch_size >= 1")


@dataclass
class AttackResult:
    """``prompts``: the found prompts (prefix words, a space, the attacked prompt), one per
    attacked prompt; ``prefixes`` their prefix words; ``token_ids`` ``[P, k]``; ``losses`` per
    step (summed over prompts); ``seconds``."""

    prompts: list[str]
    prefixes: list[str]
    token_ids: Tensor
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _per_prompt(images, n_prompts: int) -> list[Tensor]:
    """``[N, C, H, W]`` (shared), ``[P, N, C, H, W]`` or a list of P ``[N_i, C, H, W]``."""
    if isinstance(images, Tensor):
        if images.dim() == 4:
            return [images] * n_prompts
        if images.dim() == 5 and images.shape[0] == n_prompts:
            return list(images)
    elif len(images) == n_prompts and all(x.dim() == 4 and len(x) for x in images):
        return list(images)
    raise ValueError(f"give the attack images as [N, C, H, W], [{n_prompts}, N, C, H, W] or a "
                     f"list of {n_prompts} [N, C, H, W] tensors (one per attacked prompt)")


@contextmanager
def _weights_without_grad(module: nn.Module) -> Iterator[None]:
    """``module``'s weights that track gradients (a UNet being fine-tuned) stop tracking them
    while open, so autograd keeps only what the prefix's gradient needs."""
    trainable = [q for q in module.parameters() if q.requires_grad]
    for q in trainable:
        q.requires_grad_(False)
    try:
        yield
    finally:
        for q in trainable:
            q.requires_grad_(True)


class PrefixAttack:
    """A running attack on ``denoiser`` for ``prompts`` (one prefix each) with ``images`` of
    their concepts; :meth:`step` runs one optimisation step against the denoiser as it is now
    (an adapter attached or not), :meth:`result` gives the found prompts."""

    def __init__(self, denoiser: Denoiser, prompts: Sequence[str], images,
                 config: AttackConfig | None = None) -> None:
        self.config = config or AttackConfig()
        self.config.validate()
        self.prompts = [str(p) for p in prompts]
        if not self.prompts:
            raise ValueError("name at least one prompt to attack")
        self.images = _per_prompt(images, len(self.prompts))
        shape = tuple(denoiser.latent_shape)
        if any(tuple(x.shape[1:]) != shape for x in self.images):
            raise ValueError(f"attack images must be latents [N, {', '.join(map(str, shape))}]")
        self.denoiser = denoiser
        self.access = prompt_access(denoiser)
        table, allowed = self.access.table()
        self.table = table.float()
        self.allowed = allowed.to(table.device)
        self._unit = F.normalize(self.table[self.allowed], dim=-1)            # [A, D]
        self.gen = torch.Generator().manual_seed(self.config.seed)
        k, p = self.config.tokens, len(self.prompts)
        start = self.allowed[torch.randint(0, len(self.allowed), (p, k), generator=self.gen)]
        self.embeds = self.table[start].clone().requires_grad_(True)          # [P, k, D]
        self.opt = torch.optim.Adam([self.embeds], lr=self.config.lr * float(self.table.std()))
        self.process = process_of(denoiser)
        b = self.config.batch_size
        x0 = torch.cat([x[torch.randint(0, len(x), (b,), generator=self.gen)]
                        for x in self.images]).float()                          # [P*b, C, H, W]
        self._t = torch.randint(0, self.process.num_steps, (len(x0),), generator=self.gen)
        noise = torch.randn(x0.shape, generator=self.gen)
        self._x_t = self.process.q_sample(x0, self._t, noise)
        self._target = self.process.target(x0, noise)
        self.losses: list[float] = []
        self.best_ids = start.cpu().clone()
        self.best_loss = torch.full((p,), float("inf"))
        self._plain_ctx: Tensor | None = None

    def hard_ids(self) -> Tensor:
        """``[P, k]`` the vocabulary tokens nearest (cosine) to the current embeddings."""
        with torch.no_grad():
            sims = F.normalize(self.embeds.detach(), dim=-1) @ self._unit.T    # [P, k, A]
            return self.allowed[sims.argmax(-1)]

    def _losses(self, ctx: Tensor) -> Tensor:
        """``[P]`` the denoising loss on the fixed draws, each prompt's ``b`` rows under its own
        context ``ctx`` ``[P, L, D]`` (MSE against the process's target, mean per prompt)."""
        den, b = self.denoiser, self.config.batch_size
        dev, dtype = device_of(den), compute_dtype_of(den)
        ctx = ctx.repeat_interleave(b, 0).to(dev, dtype)
        pred = prediction(den, self._x_t.to(dev, dtype), self._t.to(dev), ctx).float()
        per = (pred - self._target.to(dev)).pow(2).flatten(1).mean(1)
        return per.view(len(self.prompts), b).mean(1)

    def step(self) -> float:
        """One step; returns the loss of this step's projected prefixes (summed over prompts)."""
        ids = self.hard_ids()
        hard = self.table[ids]
        prefix = self.embeds + (hard - self.embeds).detach()   # forward: tokens; backward: e
        unet = self.denoiser.unet
        with torch.enable_grad(), _weights_without_grad(unet), upcast_copies(unet):
            per = self._losses(self.access.encode(prefix, self.prompts))
            loss = per.sum()
            (grad,) = torch.autograd.grad(loss, [self.embeds])
        better = per.detach().cpu() < self.best_loss
        self.best_loss = torch.where(better, per.detach().cpu(), self.best_loss)
        self.best_ids[better] = ids.cpu()[better]
        self.opt.zero_grad(set_to_none=True)
        self.embeds.grad = grad
        self.opt.step()
        self.losses.append(loss.item())
        return self.losses[-1]

    @torch.no_grad()
    def plain_loss(self) -> Tensor:
        """``[P]`` the denoising loss of the attacked prompts without a prefix, on the same fixed
        draws as :meth:`step` (the bar a found prefix must beat to be worth anything). The
        prompts are encoded once (the attack never trains the text encoder)."""
        if self._plain_ctx is None:
            self._plain_ctx = self.denoiser.encode(self.prompts)
        return self._losses(self._plain_ctx).cpu()

    def reset_best(self) -> None:
        """Forget the best prefixes met so far (their losses were measured against an earlier
        state of a model being trained); the next step's tokens become the best."""
        self.best_loss.fill_(float("inf"))

    @torch.no_grad()
    def contexts(self, prompts: Sequence[str] | None = None, ids: Tensor | None = None) -> Tensor:
        """Contexts ``[P, L, D]`` of the attacked prompts (or of other ``prompts``, one per
        attacked prompt) behind the best prefixes found so far (or behind token ``ids``
        ``[P, k]``)."""
        ids = self.best_ids if ids is None else ids
        return self.access.encode(self.table[ids.to(self.table.device)], prompts or self.prompts)

    def result(self, seconds: float = 0.0) -> AttackResult:
        """The best prefix of each prompt (lowest loss over the steps so far)."""
        ids = self.best_ids.clone()
        prefixes = [self.access.text(row.tolist()) for row in ids]
        return AttackResult([f"{pre} {p}".strip() for pre, p in zip(prefixes, self.prompts)],
                            prefixes, ids, list(self.losses), seconds)


def attack(denoiser: Denoiser, prompts: Sequence[str], images, config: AttackConfig | None = None,
           *, progress: Callable[[int, int, float], None] | None = None,
           should_stop: Callable[[], bool] | None = None) -> AttackResult:
    """Run :class:`PrefixAttack` for ``config.steps`` steps on ``denoiser`` (the erased model:
    a model with its adapter attached or merged) and return the found prompts.

    ``images``: latents of the concept made by the original model, ``[N, C, H, W]`` shared by
    every prompt, or one set per prompt. ``progress(step, steps, loss)`` after each step;
    ``should_stop()`` true cancels (:class:`~spare_core.loop.UnlearnCancelled`). Nothing of the
    denoiser is changed."""
    from ..loop import UnlearnCancelled

    run = PrefixAttack(denoiser, prompts, images, config)
    t0 = time.perf_counter()
    for i in range(run.config.steps):
        if should_stop is not None and should_stop():
            raise UnlearnCancelled(f"attack cancelled at step {i}/{run.config.steps}")
        loss = run.step()
        if progress is not None:
            progress(i + 1, run.config.steps, loss)
    return run.result(time.perf_counter() - t0)
