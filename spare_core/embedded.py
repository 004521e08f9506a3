"""The embedded benchmark models behind one interface, so ``spare demo`` and ``spare bench`` run
on any of them without a fork: the committed digits models (one domain: ten digits) and the
canvas model (two domains: styles x objects, UnlearnCanvas's protocol).

An :class:`EmbeddedBench` knows its model's prompts, classifier and metrics:

- ``targets`` are what ``--forget`` names (digits ``3``; canvas ``"stripes"``), ``label`` their
  table text and ``default_surrogate`` what each is overwritten with by default;
- ``request(targets, surrogates)`` gives ``run_method``'s ``concept`` / ``surrogate`` /
  ``preserve`` (several targets: one concept per line, erased in one adapter);
- ``settings(method, steps, seed)``: ``run_method``'s sampling and training settings;
- ``measure(den, clf, targets, ...)``: the metric values (``metric_keys``) plus the ``images`` a
  grid shows; ``grid(before, after, k)``: the demo's cells and row labels;
- ``probe(den, clf, targets, before, ...)``: does the erasure hold (``probe_keys``): attack
  success rate of the prompt attack (:mod:`spare_core.probe`) and, where the metrics lack it,
  paraphrase UA.

Implementations: :class:`spare_core.digits.bench.DigitsBench`,
:class:`spare_core.canvas.bench.CanvasBench`.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

EMBEDDED = {"digits": ("spare_core.digits.bench", "DigitsBench", "digits"),
            "digits-dit": ("spare_core.digits.bench", "DigitsBench", "digits-dit"),
            "canvas": ("spare_core.canvas.bench", "CanvasBench", "canvas")}
"""``--model`` name -> (module, class, argument); imported on first use."""


class EmbeddedBench(Protocol):
    name: str
    metric_keys: tuple[str, ...]       # the bench table's metric columns, in order
    demo_keys: tuple[str, ...]         # what the demo prints before/after
    probe_keys: tuple[str, ...]        # what ``probe`` adds (bench --probe)
    sample_steps: int                  # the evaluation sampler's default steps

    def label(self, target) -> str: ...

    def default_surrogate(self, target): ...

    def request(self, targets: Sequence, surrogates: Sequence | None = None) -> dict: ...

    def settings(self, method: str, steps: int, seed: int) -> dict: ...

    def load(self) -> tuple: ...

    def measure(self, den, classifier, targets: Sequence, n: int, seed: int, sample_steps: int,
                surrogates: Sequence | None = None,
                callback: Callable[[int, int], None] | None = None) -> dict: ...

    def probe(self, den, classifier, targets: Sequence, before: dict, n: int, seed: int,
              sample_steps: int, attack=None) -> dict: ...

    def grid(self, before: dict, after: dict, k: int) -> tuple[list, list[str]]: ...


def get(name: str) -> EmbeddedBench:
    """The :class:`EmbeddedBench` of ``--model`` ``name``."""
    import importlib

    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; choose from {sorted(EMBEDDED)}")
    module, cls, arg = EMBEDDED[name]
    return getattr(importlib.import_module(module), cls)(arg)
