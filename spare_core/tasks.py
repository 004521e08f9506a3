"""What to forget, and how each training batch is drawn for it.

A task validates its inputs, prepares once (encodes prompts, generates latent pools with the
frozen model, builds the timestep sampler) and then draws a :class:`~spare_core.objectives.Batch`
per step. The loop does not know which task it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from .concept_list import prompt_key
from .denoiser import Denoiser, compute_dtype_of, device_of
from .objectives import Batch, Part
from .process import ForwardProcess, process_of
from .sampling import sample
from .timesteps import make_timestep_sampler


@dataclass
class PoolConfig:
    """How latents of a prompt are generated when none are given (frozen model, DDIM);
    ``batch_size`` latents go through the UNet at once (twice that with guidance)."""

    size: int = 16
    steps: int = 25
    guidance: float = 3.0
    clip_x0: float | None = None
    batch_size: int = 256


def concept_pairs(concept: str, surrogate: str) -> list[tuple[str, str]]:
    """``(concept, guide)`` pairs from one concept per line and either one guide per line or a
    single guide for all (blank lines ignored); ValueError when the counts disagree."""
    concepts = [c.strip() for c in str(concept).splitlines() if c.strip()]
    guides = [g.strip() for g in str(surrogate).splitlines()] or [""]
    guides = [g for g in guides if g] or [""]
    if len(guides) == 1:
        guides = guides * len(concepts)
    if len(guides) != len(concepts):
        raise ValueError(f"{len(concepts)} concepts but {len(guides)} guides: give one guide per "
                         "concept line, or a single guide for all")
    return list(zip(concepts, guides))


def _same_prompt(a: str, b: str) -> bool:
    return prompt_key(a) == prompt_key(b)


def make_part(x0: Tensor, ctx, t: Tensor, noise: Tensor, proc: ForwardProcess,
              dev: torch.device, dtype: torch.dtype) -> Part:
    """A :class:`Part` of clean ``x0`` noised to step indices ``t`` with ``noise`` (CPU inputs).
    x0, the noise and the target stay float32; the network's inputs take its dtype."""
    x0 = x0.float()
    x_t = proc.q_sample(x0, t, noise)
    return Part(x0.to(dev), noise.to(dev), t.to(dev), x_t.to(dev, dtype), ctx.to(dev, dtype),
                proc.target(x0, noise).to(dev))


def _part(x0: Tensor, ctx, t: Tensor, gen: torch.Generator, proc: ForwardProcess,
          dev: torch.device, dtype: torch.dtype) -> Part:
    return make_part(x0, ctx, t, torch.randn(x0.shape, generator=gen), proc, dev, dtype)


def sample_pool(denoiser: Denoiser, prompt: str, pool: PoolConfig, generator: torch.Generator,
                callback: Callable[[int, int], None] | None = None) -> Tensor:
    """``pool.size`` latents ``[size, C, H, W]`` of ``prompt`` from the frozen model (DDIM).
    The empty prompt guided against itself (sample's negative prompt is "") is its own
    prediction, u + g (u - u) = u: it is sampled unguided, one UNet call per step instead of two."""
    return sample(denoiser, [prompt] * pool.size, steps=pool.steps,
                  guidance=pool.guidance if prompt.strip() else 1.0, method="ddim",
                  generator=generator, clip_x0=pool.clip_x0, batch_size=pool.batch_size,
                  callback=callback)


def with_unconditional(preserve: Sequence[str]) -> list[str]:
    """``preserve`` with the empty prompt added (unless one is there): the unconditional
    prediction, which classifier-free guidance subtracts from every prompt's at sampling
    (``u + g (c - u)``), so an erasure that moves it moves every kept prompt's images, amplified
    ``g - 1`` times (canvas, guidance 4, every target at seed 0: the kept prompts' FD 272.6
    without it, 220.0 with it, the original's 219.1; benchmarks/RESULTS.md, "The unconditional
    prediction held")."""
    kept = list(preserve)
    return kept if any(not p.strip() for p in kept) else kept + [""]


@dataclass
class ConceptTask:
    """Forget ``concept`` by overwriting it with ``surrogate`` while keeping ``preserve`` prompts.

    Several concepts are erased together when ``concept`` holds one per line; ``surrogate`` then
    holds one per line too (or one for all): :func:`concept_pairs`. ``concept_latents``
    ``[N, C, H, W]`` (e.g. from the saliency stage; with k concepts, N/k per concept in their
    order) and ``preserve_latents`` (one tensor per preserved prompt, or None for a prompt whose
    pool is to be made) are generated with the frozen model when not given (``pool.size`` per
    concept and per preserved prompt). ``surrogate`` may be ``""`` (the
    unconditional prediction).

    ``compose`` (0 to 1) is the share of forget rows whose prompt puts the concept in a
    composition with a preserved prompt, ``"{concept}, {kept}"`` or ``"{kept}, {concept}"``,
    distilled toward the same composition with the surrogate: the erasure then sees the concept's
    words among other words, as in the prompts users write, not only alone.
    """

    concept: str
    surrogate: str = ""
    preserve: Sequence[str] = ()
    concept_latents: Tensor | None = None
    preserve_latents: Sequence[Tensor | None] | None = None
    pool: PoolConfig = field(default_factory=PoolConfig)
    compose: float = 0.0

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """``(concept, surrogate)`` per line."""
        return concept_pairs(self.concept, self.surrogate)

    def without_preserve(self) -> "ConceptTask":
        """A copy without preserved prompts (nor their latents): what the loop runs for an
        objective with no preserve term, so no pools are generated for them."""
        return replace(self, preserve=(), preserve_latents=None)

    def sample_prompts(self, per_concept: int) -> list[str]:
        """The prompt of each concept latent when ``per_concept`` are drawn per concept, in the
        order :attr:`concept_latents` keeps them."""
        return [c for c, _ in self.pairs for _ in range(per_concept)]

    def validate(self, denoiser: Denoiser | None = None) -> None:
        """Raise ValueError for bad input, before any long work."""
        if not isinstance(self.concept, str) or not self.concept.strip():
            raise ValueError("concept prompt is empty: type the concept to forget, e.g. 'Van Gogh style'")
        pairs = self.pairs
        for concept, surrogate in pairs:
            if _same_prompt(concept, surrogate):
                raise ValueError(f"surrogate equals the concept ({concept!r}): choose what the "
                                 "concept should turn into, e.g. 'a painting', or '' for "
                                 "unconditional")
            if any(_same_prompt(concept, p) for p in self.preserve):
                raise ValueError(f"the concept {concept!r} is also listed as a preserved prompt")
            if any(_same_prompt(surrogate, c) for c, _ in pairs):
                raise ValueError(f"the surrogate {surrogate!r} of {concept!r} is itself erased: "
                                 "choose a surrogate that is kept")
        if self.concept_latents is not None and self.concept_latents.shape[0] % len(pairs):
            raise ValueError(f"{self.concept_latents.shape[0]} concept latents cannot be split "
                             f"evenly over {len(pairs)} concepts")
        if not 0.0 <= self.compose <= 1.0:
            raise ValueError(f"compose is a share of the forget rows, in [0, 1]; got {self.compose}")
        if self.compose > 0 and not self.composable():
            raise ValueError("compose puts the concept beside the preserved prompts: give "
                             "preserve prompts, or set compose 0")
        if self.pool.size < 1 or self.pool.steps < 1 or self.pool.batch_size < 1:
            raise ValueError("pool size, pool steps and pool batch size must be >= 1")
        if self.preserve_latents is not None and len(self.preserve_latents) != len(self.preserve):
            raise ValueError("give one latent tensor per preserved prompt")
        if denoiser is not None:
            shape = tuple(denoiser.latent_shape)
            given = [self.concept_latents] + list(self.preserve_latents or [])
            for x in given:
                if x is not None and (x.dim() != 4 or tuple(x.shape[1:]) != shape):
                    raise ValueError(f"latents must be [N, {', '.join(map(str, shape))}], got {list(x.shape)}")

    def prepare(self, denoiser: Denoiser, timestep_sampler: str, seed: int,
                progress: Callable[[str, int, int], None] | None = None) -> None:
        """Encode prompts, generate missing latent pools, build the timestep sampler."""
        gen = torch.Generator().manual_seed(seed + 1)
        concepts, surrogates = (list(x) for x in zip(*self.pairs))
        self._ctx = denoiser.encode(concepts)       # [k, L, D]
        self._sur = denoiser.encode(surrogates)     # [k, L, D]
        self._uncond = denoiser.encode([""])
        self._pctx = denoiser.encode(list(self.preserve)) if self.preserve else None
        self._composed = self.compositions()
        if self._composed:
            self._cctx = denoiser.encode([c for c, _ in self._composed])  # [2kP, L, D]
            self._csur = denoiser.encode([s for _, s in self._composed])

        def pool_for(prompt: str, what: str) -> Tensor:
            cb = (lambda i, n: progress(what, i, n)) if progress else None
            return sample_pool(denoiser, prompt, self.pool, gen, cb)

        if self.concept_latents is None:
            self.concept_latents = torch.cat([pool_for(c, "concept pool") for c in concepts])
        k = len(concepts)
        self._owner = torch.arange(k).repeat_interleave(self.concept_latents.shape[0] // k)
        if self.preserve:  # the pools not given (None entries too), in the prompts' order
            given = list(self.preserve_latents or [None] * len(self.preserve))
            self.preserve_latents = [x if x is not None else pool_for(p, f"preserve pool {i + 1}")
                                     for i, (p, x) in enumerate(zip(self.preserve, given))]
        one = k == 1  # one concept: its [1, L, D] contexts, as before
        self.sampler = make_timestep_sampler(
            timestep_sampler, denoiser, self.concept_latents,
            self._ctx if one else self._ctx[self._owner],
            self._sur if one else self._sur[self._owner], seed=seed,
            callback=(lambda i, n: progress("timestep gaps", i, n)) if progress else None,
            batch_size=self.pool.batch_size)

    def compositions(self) -> list[tuple[str, str]]:
        """``(composed concept, composed surrogate)`` prompts, concept-major: for each concept
        line and each preserved prompt ``p``, ``"c, p"`` then ``"p, c"`` (empty without
        ``compose``). A composed empty surrogate keeps only ``p``."""
        words = self.composable()
        if not self.compose or not words:
            return []
        def join(a: str, b: str) -> str:
            return ", ".join(x for x in (a, b) if x)
        return [pair for c, s in self.pairs for p in words
                for pair in ((join(c, p), join(s, p)), (join(p, c), join(p, s)))]

    def composable(self) -> list[str]:
        """The preserved prompts a composition puts beside the concept: every one but the empty
        (unconditional) prompt, which has no words."""
        return [p for p in self.preserve if p.strip()]

    def prompt_table(self) -> tuple[list[str], Tensor]:
        """Every prompt this task encodes (after :meth:`prepare`): concepts, surrogates, ``""``
        and the preserved prompts, with their frozen contexts ``[P, L, D]`` in the same order
        (a batch's contexts are rows of it): what a text-encoder adapter re-encodes
        (:class:`~spare_core.text_encoder.PromptReencoder`)."""
        concepts, surrogates = (list(x) for x in zip(*self.pairs))
        frozen = [self._ctx, self._sur, self._uncond] + ([self._pctx] if self.preserve else [])
        names = concepts + surrogates + [""] + list(self.preserve)
        if self._composed:
            frozen += [self._cctx, self._csur]
            names += [c for c, _ in self._composed] + [s for _, s in self._composed]
        return names, torch.cat(frozen)

    def batch(self, denoiser: Denoiser, batch_size: int, gen: torch.Generator) -> Batch:
        """Draw ``batch_size`` concept latents and as many preserved ones (random prompts)."""
        dev = device_of(denoiser)
        dtype = compute_dtype_of(denoiser)
        proc = process_of(denoiser)
        idx = torch.randint(0, self.concept_latents.shape[0], (batch_size,), generator=gen)
        t = self.sampler(batch_size, gen)
        if self._ctx.shape[0] == 1:
            ctx, sur = self._ctx.expand(batch_size, -1, -1), self._sur.expand(batch_size, -1, -1)
        else:  # several concepts: each latent with its own concept and surrogate
            ctx, sur = self._ctx[self._owner[idx]], self._sur[self._owner[idx]]
        if self._composed:  # a share of the rows: the concept among the preserved prompts' words
            per = 2 * len(self.composable())  # compositions per concept line
            rows = torch.rand(batch_size, generator=gen) < self.compose
            pick = self._owner[idx] * per + torch.randint(0, per, (batch_size,), generator=gen)
            ctx = torch.where(rows[:, None, None], self._cctx[pick], ctx)
            sur = torch.where(rows[:, None, None], self._csur[pick], sur)
        forget = _part(self.concept_latents[idx], ctx, t, gen, proc, dev, dtype)
        preserve = None
        if self.preserve:
            which = torch.randint(0, len(self.preserve), (batch_size,), generator=gen).tolist()
            x0 = torch.stack([self.preserve_latents[w][int(torch.randint(
                0, self.preserve_latents[w].shape[0], (1,), generator=gen))] for w in which])
            tp = self.sampler(batch_size, gen)
            preserve = _part(x0, self._pctx[which], tp, gen, proc, dev, dtype)
        return Batch(forget, preserve, sur.to(dev, dtype),
                     self._uncond.to(dev, dtype), proc,
                     extras={"concept": self._owner[idx]})  # concept line of each forget row
