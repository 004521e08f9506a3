"""The digits models as an :class:`~spare_core.embedded.EmbeddedBench`: forget a digit, keep the
other nine (UA, RA, to_surrogate, FD of the forgotten digit and of the others)."""
from __future__ import annotations

from typing import Callable, Sequence

from .data import NAMES, prompt_for


def default_surrogate(forget: int) -> int:
    """The digit a forgotten digit is overwritten with by default: the next one (mod 10)."""
    return (int(forget) + 1) % 10


def model_settings(guidance: float, steps: int, seed: int) -> dict:
    """What an embedded model adds to every method's recipe (:mod:`spare_core.recipes`): its
    sampler's guidance, the clip of predicted x0 to [-1, 1] (pixel space), and the bench's
    step budget and seed. Everything else is the recipe's, so the bench runs what ships."""
    return dict(guidance=guidance, clip_x0=1.0, steps=steps, seed=seed)


def spare_digits_defaults(steps: int, seed: int) -> dict:
    """SPARE on the 8x8 digits model: its recipe (spare_core.recipes) and the model's rules
    (:func:`model_settings`), as ``spare_unlearn`` keywords."""
    from ..recipes import RECIPES
    from . import metrics as M

    r = RECIPES["spare"]
    return {**model_settings(M.SAMPLE_GUIDANCE, steps, seed),
            **{k: v for k, v in r.run().items() if k != "steps"}, "lr": r.lr,
            **{k: r.hparams[k] for k in ("rank", "module_fraction", "module_selection")}}


def digit_metrics(den, classifier, forget: int, n: int, seed: int, steps: int,
                  surrogate: int | None = None, callback=None) -> dict:
    """UA/RA/FD of ``den`` for ``forget``, from ``n`` samples per digit; ``to_surrogate`` is the
    share of the forgotten prompt's images labelled as the surrogate digit (default: the next).
    ``callback(i, n)`` reports the sampler's steps."""
    from . import metrics as M

    sur = default_surrogate(forget) if surrogate is None else surrogate
    imgs = M.generate_digits(den, range(10), n, seed=seed, steps=steps, callback=callback)
    preds = M.classify(classifier, imgs)
    fd = M.fd_per_class(classifier, imgs)
    return {"UA": M.unlearning_accuracy(preds[forget], forget),
            "to_surrogate": int((preds[forget] == sur).sum()) / preds[forget].numel(),
            "RA": M.retain_accuracy(preds, forget),
            "FD_forget": fd[forget],
            "FD_retain": sum(v for d, v in fd.items() if d != forget) / 9,
            "per_class_acc": M.per_class_accuracy(preds), "images": imgs}


def paraphrases(d: int) -> list[str]:
    """Wordings of digit ``d`` other than its prompt ("three", "digit three", "a three",
    "handwritten three"): the model was trained on the full prompt only."""
    name = NAMES[int(d)]
    return [name, f"digit {name}", f"a {name}", f"handwritten {name}"]


ATTACK_RESTARTS = 4
"""Attacks per forgotten digit (one prompt, four random starts in one batch): ASR is their mean."""


class DigitsBench:
    """``digits`` (UNet, DDPM) or ``digits-dit`` (SD3 transformer, rectified flow)."""

    metric_keys = ("UA", "RA", "to_surrogate", "FD_forget", "FD_retain")
    probe_keys = ("UA_para", "ASR", "ASR_found")
    demo_keys = ("UA", "RA", "FD_forget", "FD_retain")
    sample_steps = 50  # == metrics.SAMPLE_STEPS (ancestral DDPM; Euler on digits-dit)

    def __init__(self, name: str = "digits") -> None:
        self.name = name

    def label(self, target: int) -> str:
        return NAMES[int(target)]

    def default_surrogate(self, target: int) -> int:
        return default_surrogate(target)

    def _one(self, targets: Sequence[int]) -> int:
        if len(targets) != 1:
            raise ValueError("the digits bench forgets one digit at a time; erase several "
                             "concepts together on the canvas model (--model canvas)")
        return int(targets[0])

    def request(self, targets: Sequence[int], surrogates: Sequence[int] | None = None) -> dict:
        d = self._one(targets)
        sur = default_surrogate(d) if surrogates is None else int(surrogates[0])
        return {"concept": prompt_for(d), "surrogate": prompt_for(sur),
                "preserve": [prompt_for(k) for k in range(10) if k != d]}

    def settings(self, method: str, steps: int, seed: int) -> dict:
        from . import metrics as M

        return model_settings(M.SAMPLE_GUIDANCE, steps, seed)

    def load(self) -> tuple:
        from . import metrics as M

        return M.load_default_model(name=self.name), M.load_classifier()

    def measure(self, den, classifier, targets: Sequence[int], n: int, seed: int,
                sample_steps: int, surrogates: Sequence[int] | None = None,
                callback: Callable[[int, int], None] | None = None) -> dict:
        d = self._one(targets)
        return digit_metrics(den, classifier, d, n, seed, sample_steps,
                             None if surrogates is None else int(surrogates[0]), callback)

    def probe(self, den, classifier, targets: Sequence[int], before: dict, n: int, seed: int,
              sample_steps: int, attack=None) -> dict:
        """``UA_para`` (:func:`paraphrases`) and, given an ``attack`` config, ``ASR``: the share
        of images from the found prompts labelled as the digit (``before``: the original
        model's :meth:`measure`, whose images of the digit the attack fits)."""
        from ..probe.measure import attack_success, paraphrase_ua
        from . import metrics as M

        d = self._one(targets)

        def hit(x, _i):
            return classifier.predict(x) == d

        kw = dict(n=n, seed=seed, steps=sample_steps, guidance=M.SAMPLE_GUIDANCE,
                  method=M.default_sampler(den), clip_x0=1.0)
        out = {"UA_para": paraphrase_ua(den, paraphrases(d), hit, **kw)}
        if attack is not None:
            out.update(attack_success(den, [prompt_for(d)] * ATTACK_RESTARTS,
                                      before["images"][d], hit, config=attack, **kw))
        return out

    def grid(self, before: dict, after: dict, k: int) -> tuple[list, list[str]]:
        cells = [[before["images"][d][:k], after["images"][d][:k]] for d in range(10)]
        return cells, list(NAMES)
