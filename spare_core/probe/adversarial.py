"""Adversarial self-distillation: SPARE trained against its own attacker (the AdvUnlearn recipe,
Zhang et al. 2024, on SPARE's objective).

Every ``every`` training steps the attack of :mod:`spare_core.probe.attack` runs ``attack_steps``
more steps against the model *being trained* (its adapter attached), warm-started from where it
stopped, on the concept's own latents; each forget batch then gets ``fraction`` more rows: its
first noisy latents again, under the concept prompt with the attack's current prefix. The plain
rows stay. Self-distillation pulls the added rows, in turn, to two targets of the frozen model:

- the surrogate prompt alone, without the prefix (AdvUnlearn's target): whatever is typed
  before the concept, the model draws the surrogate;
- the prefix with the concept's words swapped for the surrogate's, then the surrogate prompt
  (:func:`swapped`: ``"<prefix> stripes style"`` -> ``"<prefix'> plain style"``): the prefix's
  other words, often other concepts' names, keep their meaning.

Either target alone failed one embedded model (100 steps, ASR of the bench's probe): the
first wipes the meaning of the words the attacker uses (canvas, stripes, seed 1: the prefixes
held "speckle", grain's second name; IRA 0.866, and a scratch rerun put grain's accuracy at
0.000); the second lets the prefix steer the erased model, and the attack used that (digits,
seed 1: ASR 0.192 against plain SPARE's 0.050; more rows or attack steps made it worse). In turn (the expected loss is the
distance to the mean of the two targets): digits ASR 0.017 / 0.042 and canvas 0.042 / 0.042 at
seeds 0 / 1, retention kept (benchmarks/RESULTS.md has the tables).

A concept gets these rows only after a round whose best prefix beats its plain prompt (lower
denoising loss on the concept's latents, :meth:`PrefixAttack.plain_loss`): while the plain
prompt still draws the concept best, the plain rows are what it needs, and a prefix the model
does not answer to is not a prompt to defend against. Preserved prompts are untouched.

Also measured on the way, before the gate: replacing half of the forget rows instead of adding
rows (canvas, stripes, seed 0: UA 0.312 against plain SPARE's 0.875 then); the prefix kept
before the surrogate, without the swap, taught the digits model to keep the concept's own word
when the attack put it in the prefix ("three eight three ...": ASR 0.775 against plain SPARE's
0.038), hence the swap.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..objectives import Objective, Part
from .attack import AttackConfig, PrefixAttack


@dataclass
class AdversarialConfig:
    """``every``: training steps between attack rounds; ``attack_steps``: attack steps per round
    (warm-started); ``fraction``: adversarial rows added per forget row;
    ``tokens``, ``batch_size``: the attack's prefix length and fixed draws per concept."""

    every: int = 5
    attack_steps: int = 5
    fraction: float = 0.5
    tokens: int = 5
    batch_size: int = 8

    def validate(self) -> None:
        if self.every < 1 or self.attack_steps < 1 or self.tokens < 1 or self.batch_size < 1:
            raise ValueError("adversarial every, attack_steps, tokens and batch_size must be >= 1")
        if not 0.0 < self.fraction <= 1.0:  # at most one adversarial row per plain row
            raise ValueError(f"adversarial fraction must be in (0, 1], got {self.fraction}")


def swapped(access, ids: Tensor, pairs) -> Tensor:
    """Prefix token ids ``[k, T]`` (one row per concept line) with the concept's own tokens
    swapped for the surrogate's: a prefix token that is in the concept prompt but not in the
    surrogate prompt becomes the surrogate's own tokens in turn (the end token when the
    surrogate has none, e.g. the empty prompt). The attack often puts the concept's word in its
    prefix ("three eight three ... a handwritten digit three"); the target must not keep it."""
    out = ids.clone()
    for row, (concept, surrogate) in enumerate(pairs):
        c, g = access.token_ids(concept), access.token_ids(surrogate)
        own = set(c) - set(g)
        theirs = [i for i in g if i not in set(c)] or [access.end_id]
        hits = [j for j in range(ids.shape[1]) if int(ids[row, j]) in own]
        for n, j in enumerate(hits):
            out[row, j] = theirs[n % len(theirs)]
    return out


OBJECTIVE = "self_distill"
"""The one objective the adversarial rows are made for: their targets are surrogate contexts
(``Batch.surrogate_ctx``), which only self-distillation reads as the forget rows' targets."""


class AdversarialConceptTask:
    """A :class:`~spare_core.tasks.ConceptTask` whose forget batches get extra rows on the
    current adversarial prompt of each concept (one prefix per concept line). Everything else
    (inputs, pools, timestep sampler, preserved prompts) is the wrapped task's. Only for the
    ``self_distill`` objective (:meth:`check_objective`, called by the loop before any work)."""

    def __init__(self, task, config: AdversarialConfig | None = None, seed: int = 0) -> None:
        self.task = task
        self.config = config or AdversarialConfig()
        self.seed = seed
        self._attack: PrefixAttack | None = None
        self._ctx = self._sur = None
        self._calls = 0
        self._beats: Tensor | None = None
        self.attack_seconds = 0.0
        self.adversarial_batches = 0  # forget batches that got adversarial rows

    def __getattr__(self, name: str):
        if name == "task":  # not yet set (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.task, name)

    def validate(self, denoiser=None) -> None:
        self.config.validate()
        self.task.validate(denoiser)
        if denoiser is not None:
            from .text import prompt_access
            prompt_access(denoiser)  # refuses text stacks the attack cannot reach, up front

    def check_objective(self, objective: Objective) -> None:
        """ValueError, naming the fix, unless ``objective`` (its ``name``) is self_distill: the
        added rows are steered to the surrogate, a target no other objective reads (ESD pushes
        away from the concept, the data objectives read other batches)."""
        name = getattr(objective, "name", type(objective).__name__)
        if name != OBJECTIVE:
            raise ValueError(f"adversarial training adds forget rows steered to the surrogate, "
                             f"which only the {OBJECTIVE!r} objective trains on; the objective "
                             f"is {name!r}: choose {OBJECTIVE!r} or switch adversarial off")

    def without_preserve(self) -> "AdversarialConceptTask":
        """This task over the wrapped task without its preserved prompts (for an objective with
        no preserve term: the loop then generates no pools for them); same settings and seed."""
        return AdversarialConceptTask(self.task.without_preserve(), self.config, self.seed)

    def prepare(self, denoiser, timestep_sampler: str, seed: int, progress=None) -> None:
        self.task.prepare(denoiser, timestep_sampler, seed, progress)
        self._attack, self._ctx, self._calls = None, None, 0
        self.attack_seconds, self.adversarial_batches = 0.0, 0

    def run_stats(self) -> dict:
        """What the loop adds to the run's history: seconds spent attacking, and how many forget
        batches got adversarial rows (0: the gate never opened, the run is plain SPARE's)."""
        return {"attack_seconds": self.attack_seconds,
                "adversarial_batches": self.adversarial_batches}

    def _round(self, denoiser) -> None:
        """``attack_steps`` attack steps against the model as it is now."""
        import time

        t0 = time.perf_counter()
        if self._attack is None:
            concepts = [c for c, _ in self.task.pairs]
            pool = self.task.concept_latents
            per = pool.shape[0] // len(concepts)
            images = [pool[i * per:(i + 1) * per] for i in range(len(concepts))]
            cfg = AttackConfig(tokens=self.config.tokens, steps=self.config.attack_steps,
                               batch_size=self.config.batch_size, seed=self.seed)
            self._attack = PrefixAttack(denoiser, concepts, images, cfg)
        self._attack.reset_best()
        for _ in range(self.config.attack_steps):
            self._attack.step()
        surrogates = [g for _, g in self.task.pairs]
        ids = self._attack.best_ids
        # defend only against what the attack found: a concept whose best prefix does not beat
        # its plain prompt (the plain rows already train on) gets no adversarial rows this round
        self._beats = self._attack.best_loss < self._attack.plain_loss()           # [k] bool
        self._ctx = self._attack.contexts(ids=ids)                                  # [k, L, D]
        self._sur = self._attack.contexts(surrogates, swapped(self._attack.access, ids,
                                                              self.task.pairs))
        self.attack_seconds += time.perf_counter() - t0

    def batch(self, denoiser, batch_size: int, gen: torch.Generator):
        if self._calls % self.config.every == 0:
            self._round(denoiser)
        self._calls += 1
        b = self.task.batch(denoiser, batch_size, gen)
        f = b.forget
        m = max(1, round(self.config.fraction * len(f)))
        owner = (b.extras or {}).get("concept")
        owner = torch.zeros(len(f), dtype=torch.long) if owner is None else owner
        rows = torch.nonzero(self._beats[owner]).flatten()[:m]   # forget rows whose concept's attack won
        if len(rows) == 0:
            return b
        own = owner[rows]
        self.adversarial_batches += 1
        adv = self._ctx[own.to(self._ctx.device)].to(f.ctx.device, f.ctx.dtype)
        r = rows.to(f.x0.device)
        b.forget = Part(torch.cat([f.x0, f.x0[r]]), torch.cat([f.noise, f.noise[r]]),
                        torch.cat([f.t, f.t[r]]), torch.cat([f.x_t, f.x_t[r]]),
                        torch.cat([f.ctx, adv]), torch.cat([f.target, f.target[r]]))
        # the added rows' targets alternate (row by row, and batch by batch for one-row batches):
        # the swapped prefix + surrogate, or the surrogate alone (the plain row's own target)
        sc = b.surrogate_ctx
        swap = self._sur[own.to(self._sur.device)].to(sc.device, sc.dtype)
        turn = ((torch.arange(len(rows)) + self._calls) % 2 == 0).to(sc.device)
        b.surrogate_ctx = torch.cat([sc, torch.where(turn.view(-1, 1, 1), swap, sc[r.to(sc.device)])])
        b.extras = {**(b.extras or {}), "concept": torch.cat([owner, own])}
        return b
