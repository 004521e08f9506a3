"""The unlearning loop: one engine for every method (task x objective x adapter x sampler)."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .adapter import ATTACH_MODES, UnlearnAdapter
from .denoiser import (Denoiser, check_checkpointing, compute_dtype_of, device_of, prediction,
                       gradient_checkpointing)
from .objectives import Objective, make_objective
from .saliency import Saliency
from .storage_cast import upcast_copies
from .text_encoder import TEXT_ENCODER, PromptReencoder, check_prompt_table


log = logging.getLogger(__name__)


class UnlearnCancelled(InterruptedError):
    """Raised when ``should_stop()`` turns true; the model is left as it was given."""


class NonFiniteLoss(FloatingPointError):
    """Raised when a loss or gradient becomes NaN/inf; the model is left as it was given."""


@dataclass
class UnlearnConfig:
    """Training settings. ``lr`` is the AdamW learning rate of the adapter's parameters.

    Memory and precision:
        gradient_checkpointing: recompute the UNet's activations in backward (needs a denoiser
            with ``enable_gradient_checkpointing``; both backends have one).
        backward_per_term: back-propagate an objective's terms one at a time when it offers
            ``parts`` (self-distillation: forget half, then preserve half).
        loss_scaling: dynamic loss scaling (``torch.amp.GradScaler``); None = on exactly when the
            denoiser computes in float16, whose range cannot hold the UNet's small gradients.
        attach_mode: how the adapter reaches the UNet, ``"unmerged"`` or ``"merged"``
            (see :mod:`spare_core.adapter`).

    Early stop (data unlearning): ``early_stop_every`` N > 0 runs the task's ``stop_probe``
    before step 0 and every N steps (and after the last), without gradients and without drawing
    from any random generator, and ends training, keeping the adapter trained so far, once it
    says the forget set is gone (:meth:`spare_core.data_task.DataTask.stop_probe`). 0: off.
    """

    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    timestep_sampler: str = "concept"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    backward_per_term: bool = False
    loss_scaling: bool | None = None
    attach_mode: str = "unmerged"
    early_stop_every: int = 0

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
        if not isinstance(self.early_stop_every, int) or self.early_stop_every < 0:
            raise ValueError(f"early_stop_every must be an integer >= 0 (0 = off), got "
                             f"{self.early_stop_every!r}")
        if self.attach_mode not in ATTACH_MODES:
            raise ValueError(f"attach_mode must be one of {list(ATTACH_MODES)}, "
                             f"got {self.attach_mode!r}")


@dataclass
class UnlearnResult:
    """The trained adapter (detached from the model) and the run's history.

    history keys: ``ignored`` (task inputs the objective does not use: ``"surrogate"``,
    ``"preserve"``), ``loss`` (per step), ``terms`` (per step dict), ``seconds``, ``trainable_params``,
    ``timestep_probs`` (``[T]`` list, the sampler's density), ``compute_dtype``, ``loss_scale``
    (final scale, 1.0 without loss scaling) and ``skipped_steps`` (steps the loss scaler skipped
    because a scaled gradient overflowed); plus what the task reports of its run, where it has a
    ``run_stats()`` (adversarial training: ``attack_seconds``, ``adversarial_batches``).
    With the early stop on: ``stopped_at`` (the step it stopped before, None if it ran every
    step) and ``probe`` (one dict per check: ``step``, ``forget`` and ``keep`` probe losses,
    ``ratio``), so the keep set's loss shows what the run cost.
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
    the run (forward hooks; the UNet's tensors are never written) and detached in all cases, also
    on cancellation or a non-finite loss. The adapter's parameters stay float32 whatever the
    denoiser computes in; float16 runs use dynamic loss scaling (``config.loss_scaling``).

    A text-encoder adapter (``adapter.root == "text_encoder"``, :mod:`spare_core.text_encoder`)
    is attached to ``denoiser.text_encoder`` instead: the student reads its prompts re-encoded
    through it at every call (with gradient), the teacher the contexts the task encoded before
    the adapter was attached; the task must list its prompts (``prompt_table()``).
    """
    config = config or UnlearnConfig()
    config.validate()
    task.validate(denoiser)
    root = adapter.root_of(denoiser)  # the UNet, or the text encoder a text-encoder adapter edits
    adapter.check_compatible(root)
    text = adapter.root == TEXT_ENCODER
    if text:
        check_prompt_table(task)
    obj = make_objective(objective, **(objective_kwargs or {})) if isinstance(objective, str) else objective
    check_objective = getattr(task, "check_objective", None)
    if check_objective is not None:  # a task made for one objective refuses the others up front
        check_objective(obj)
    if adapter.num_trainable() == 0:
        raise ValueError("the adapter has no trainable parameters (empty mask?)")
    if config.early_stop_every and not hasattr(task, "stop_probe"):
        raise ValueError("early_stop_every needs a task with a stop probe (data unlearning: "
                         "spare_core.data_task.DataTask)")
    check_checkpointing(denoiser, config.gradient_checkpointing)
    dtype = compute_dtype_of(denoiser)
    scaling = (dtype == torch.float16) if config.loss_scaling is None else bool(config.loss_scaling)

    task, ignored = _without_unused_prompts(task, obj)

    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    task.prepare(denoiser, config.timestep_sampler, config.seed, prepare_progress)  # no adapter yet
    gen = torch.Generator().manual_seed(config.seed)
    # the student's contexts: the batch's own, or its prompts through the adapted text encoder
    contexts = PromptReencoder(denoiser, *task.prompt_table()) if text else (lambda c: c)

    params = [p for p in adapter.parameters()]
    for p in params:
        p.requires_grad_(True)
    unet = denoiser.unet
    restore = _freeze(unet, root)  # no dropout: the teacher and the student see the same network
    adapter.attach(root, config.attach_mode)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device_of(denoiser).type, enabled=scaling)
    split = config.backward_per_term and hasattr(obj, "parts")
    skipped = consecutive_skips = 0

    def student(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return prediction(denoiser, x, t, contexts(c))

    @torch.no_grad()
    def teacher(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        with adapter.disabled():
            return prediction(denoiser, x, t, c)

    losses: list[float] = []
    terms: list[dict[str, float]] = []
    checks: list[dict] = []
    stopped_at = None

    def gone(step: int) -> bool:
        """The task's stop probe on the model trained so far (no gradient, no random draw)."""
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            r = task.stop_probe(denoiser, student, max_rows=config.batch_size)
        checks.append({"step": step, **{k: v for k, v in r.items() if k != "gone"}})
        return bool(r["gone"])
    try:
        # upcast_copies: fp8-stored diffusers layers compute on copies backward can read
        with (torch.enable_grad(), gradient_checkpointing(denoiser, config.gradient_checkpointing),
              upcast_copies(unet)):
            for step in range(config.steps):
                if config.early_stop_every and step % config.early_stop_every == 0 and gone(step):
                    stopped_at = step
                    break
                opt.zero_grad(set_to_none=True)
                step_loss, step_terms = 0.0, {}
                for _ in range(config.grad_accum):
                    if should_stop is not None and should_stop():
                        raise UnlearnCancelled(f"unlearning cancelled at step {step}/{config.steps}")
                    batch = task.batch(denoiser, config.batch_size, gen)
                    batch.loss_scale = scaler.get_scale() if scaling else 1.0
                    batch.params = params
                    # one backward per term (lower peak) or one for the whole loss
                    pieces = obj.parts(student, teacher, batch) if split else [obj(student, teacher, batch)]
                    for loss, logs in pieces:
                        value = loss.item()  # one device sync per term
                        if not math.isfinite(value):
                            raise NonFiniteLoss(f"loss became {value} at step {step}: lower lr "
                                                f"(now {config.lr}) or use float32; the model is unchanged")
                        scaler.scale(loss / config.grad_accum).backward()
                        step_loss += value / config.grad_accum
                        for k, v in logs.items():
                            step_terms[k] = step_terms.get(k, 0.0) + v / config.grad_accum
                scaler.unscale_(opt)
                norm = None
                if config.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                if scaling:  # the scaler skips a step whose scaled gradients overflowed
                    before = scaler.get_scale()
                    scaler.step(opt)
                    scaler.update()
                    overflowed = scaler.get_scale() < before
                    skipped += overflowed
                    consecutive_skips = consecutive_skips + 1 if overflowed else 0
                    if consecutive_skips >= 20:
                        raise NonFiniteLoss(f"gradients overflowed float16 for 20 steps in a row "
                                            f"(step {step}): use bfloat16 or float32; the model is "
                                            "unchanged")
                else:
                    if norm is not None and not torch.isfinite(norm):
                        raise NonFiniteLoss(f"gradient became non-finite at step {step}: lower lr; "
                                            "the model is unchanged")
                    opt.step()
                losses.append(step_loss)
                terms.append(step_terms)
                if progress is not None:
                    progress(step + 1, config.steps, step_loss)
            if config.early_stop_every and stopped_at is None:
                gone(config.steps)  # the cost of the full budget, for the history
    finally:
        adapter.detach(root)
        restore()
        for p in params:
            p.grad = None
    sampler = getattr(task, "sampler", None)
    history = {
        "loss": losses, "terms": terms, "seconds": time.perf_counter() - t0,
        "trainable_params": adapter.num_trainable(),
        "timestep_probs": sampler.probs().tolist() if sampler is not None and hasattr(sampler, "probs") else None,
        "objective": getattr(obj, "name", type(obj).__name__),
        "compute_dtype": str(dtype).replace("torch.", ""),
        "loss_scale": scaler.get_scale() if scaling else 1.0, "skipped_steps": int(skipped),
        "ignored": ignored,
    }
    if config.early_stop_every:
        history.update(stopped_at=stopped_at, probe=checks)
    stats = getattr(task, "run_stats", None)
    history.update(stats() if stats is not None else {})
    return UnlearnResult(adapter, history)


def _freeze(*modules: nn.Module) -> Callable[[], None]:
    """Switch ``modules`` (each once) to eval mode with no gradient into their own weights;
    returns the function that restores their flags and modes."""
    mods = list({id(m): m for m in modules}.values())
    flags = {p: p.requires_grad for m in mods for p in m.parameters()}
    modes = [(m, m.training) for m in mods]
    for m in mods:
        m.requires_grad_(False)
        m.eval()

    def restore() -> None:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, was_training in modes:
            m.train(was_training)
    return restore


def _without_unused_prompts(task, obj) -> tuple[object, list[str]]:
    """The task without preserved prompts the objective never reads (no latent pools are
    generated for them: the task's ``without_preserve()``, or a dataclass task's copy), and the
    names of the inputs it ignores, each logged once."""
    ignored = []
    name = getattr(obj, "name", type(obj).__name__)
    if getattr(task, "surrogate", "") and not getattr(obj, "uses_surrogate", True):
        ignored.append("surrogate")
        log.warning("objective %r ignores the surrogate %r", name, task.surrogate)
    drop = getattr(task, "without_preserve", None)  # wrappers (adversarial) are no dataclass
    if ((drop is not None or dataclasses.is_dataclass(task)) and getattr(task, "preserve", ())
            and not getattr(obj, "uses_preserve", True)):
        ignored.append("preserve")
        log.warning("objective %r has no preserve term: the %d preserved prompt(s) are not sampled",
                    name, len(task.preserve))
        task = drop() if drop is not None else dataclasses.replace(task, preserve=(),
                                                                   preserve_latents=None)
    return task, ignored
