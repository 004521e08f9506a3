"""The canvas model as an :class:`~spare_core.embedded.EmbeddedBench`: forget styles or objects
(several at once; a list may mix the two domains) and measure UA, IRA, CRA, paraphrase UA and
FD as UnlearnCanvas does (:mod:`spare_core.canvas.metrics`).

The erasure is given the concept's one-domain prompt (``"stripes style"``, ``"a circle"``), the
surrogate's (default: ``"plain style"`` for a style, UnlearnCanvas's photo class; for an object
the next object that is not erased, one for all the objects of a list) and the other concepts
of the domain (of both domains, for a mixed list) as preserved prompts; it is measured on the
full prompts ``a {object} in {style} style``.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .names import OBJECTS, STYLES, concept_prompt, domain_of


class CanvasBench:
    """The ``canvas`` model (16x16 RGB, 8 styles x 8 objects, DDPM)."""

    metric_keys = ("UA", "IRA", "CRA", "RA_style", "RA_object", "UA_para", "UA_tmpl", "to_surrogate",
                   "FD")  # RA_*: mixed lists only
    probe_keys = ("ASR", "ASR_found")  # paraphrase UA is a metric of every canvas row already
    demo_keys = ("UA", "IRA", "CRA", "UA_para", "FD")
    sample_steps = 25  # == metrics.SAMPLE_STEPS

    def __init__(self, name: str = "canvas") -> None:
        self.name = name

    def label(self, target: str) -> str:
        return target

    def default_surrogate(self, target: str, erased: Sequence[str] = ()) -> str:
        """``plain`` for a style (``dots`` for plain); for an object the next object that is
        not erased, after the first object of ``erased`` (or after ``target`` alone): one kept
        object for every object of a list, as every style of a list turns into plain. (Each
        object into a kept object of its own cost the kept objects 3 to 36 points of accuracy:
        benchmarks/RESULTS.md, "Four objects with one surrogate".)"""
        if domain_of(target) == "style":
            return "plain" if target != "plain" else "dots"
        first = next((c for c in erased if domain_of(c) == "object"), target)
        i = OBJECTS.index(first)
        return next(o for o in OBJECTS[i + 1:] + OBJECTS[:i] if o not in erased and o != target)

    def _surrogates(self, targets: Sequence[str], surrogates) -> list[str]:
        from .metrics import check_erased

        check_erased(targets, mixed=True)
        sur = ([self.default_surrogate(t, targets) for t in targets] if surrogates is None
               else list(surrogates))
        if len(sur) == 1 and len(targets) > 1:
            sur = sur * len(targets)
        bad = [s for s, t in zip(sur, targets)
               if s in targets or s not in (STYLES + OBJECTS) or domain_of(s) != domain_of(t)]
        if len(sur) != len(targets) or bad:
            raise ValueError(f"each surrogate must be a concept of its target's domain (style or "
                             f"object) that is not erased, one per target or one for all; got "
                             f"{list(sur)} for {list(targets)}")
        return sur

    def request(self, targets: Sequence[str], surrogates: Sequence[str] | None = None) -> dict:
        """The erasure's prompts: each target's one-domain prompt with its surrogate's, and every
        concept left of the targets' domains (both, for a mixed list) as preserved prompts."""
        sur = self._surrogates(targets, surrogates)
        domains = {domain_of(t) for t in targets}
        keep = [c for c in STYLES + OBJECTS if domain_of(c) in domains and c not in targets]
        return {"concept": "\n".join(concept_prompt(t) for t in targets),
                "surrogate": "\n".join(concept_prompt(s) for s in sur),
                "preserve": [concept_prompt(c) for c in keep]}

    def settings(self, method: str, steps: int, seed: int) -> dict:
        from ..digits.bench import model_settings
        from . import metrics as M

        return model_settings(M.SAMPLE_GUIDANCE, steps, seed)

    def load(self) -> tuple:
        from . import metrics as M

        return M.load_model(), M.load_classifier()

    def measure(self, den, classifier, targets: Sequence[str], n: int, seed: int,
                sample_steps: int, surrogates: Sequence[str] | None = None,
                callback: Callable[[int, int], None] | None = None) -> dict:
        from .metrics import canvas_metrics

        sur = self._surrogates(targets, surrogates)
        shared = sur[0] if len(set(sur)) == 1 else None
        return canvas_metrics(den, classifier, list(targets), n, seed, sample_steps,
                              surrogate=shared, callback=callback)

    def probe(self, den, classifier, targets: Sequence[str], before: dict, n: int, seed: int,
              sample_steps: int, attack=None) -> dict:
        """Given an ``attack`` config, ``ASR``: every prompt holding an erased concept
        (``a {object} in {style} style``) is attacked once, fitted to the original model's
        images of it (``before["images"]``), and ASR is the share of ``n`` images per found
        prompt that the classifier gives the erased concept."""
        if attack is None:
            return {}
        from ..probe.measure import attack_success
        from .metrics import PAIRS, SAMPLE_GUIDANCE, check_erased
        from .names import prompt

        domain = check_erased(targets)
        pairs = [p for p in PAIRS if p[0] in targets or p[1] in targets]

        def hit(x, i):
            s, o = pairs[i]
            ps, po = classifier.predict(x)
            return ps == STYLES.index(s) if domain == "style" else po == OBJECTS.index(o)

        return attack_success(den, [prompt(s, o, 0) for s, o in pairs],
                              [before["images"][p] for p in pairs], hit, n=n, seed=seed,
                              steps=sample_steps, guidance=SAMPLE_GUIDANCE, method="ddpm",
                              clip_x0=1.0, config=attack)

    def grid(self, before: dict, after: dict, k: int) -> tuple[list, list[str]]:
        """Rows: styles; each cell ``k`` objects (one image each)."""
        import torch

        cells = [[torch.cat([m["images"][(s, o)][:1] for o in OBJECTS[:k]]) for m in (before, after)]
                 for s in STYLES]
        return cells, list(STYLES)
