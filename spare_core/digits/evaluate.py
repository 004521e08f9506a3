"""Measure an embedded digits model with the bench sampler: per-class classifier accuracy,
per-class FD and sampling time at several step counts, and (``--uncond``) the pattern rate of
unconditional samples. The sampler is the model's own (:func:`default_sampler`: ancestral DDPM for
the UNet, the deterministic Euler flow step for digits-dit).

    python -m spare_core.digits.evaluate --model spare_core/assets/digits --steps 50 100 200
    python -m spare_core.digits.evaluate --model spare_core/assets/digits_dit --steps 10 25 50 \
        --json spare_core/assets/digits_dit/eval.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from .classifier import load_classifier_file
from .data import pattern_image
from .metrics import (CLASSIFIER, PATTERN_RADIUS, classify, default_sampler, fd_per_class,
                      generate_digits, generate_unconditional, pattern_rate, per_class_accuracy)


def evaluate(model: str, steps: list[int], n_per_digit: int = 20, seed: int = 0,
             classifier: str = CLASSIFIER, n_uncond: int = 0, guidance: float = 3.0) -> dict:
    """Returns ``{"steps": {s: {"acc": {d: a}, "fd": {d: f}, "seconds": t}}, "pattern": ...}``."""
    from ..families import load_denoiser

    den = load_denoiser(model)
    clf = load_classifier_file(classifier)
    out: dict = {"model": model, "sampler": default_sampler(den), "guidance": guidance,
                 "n_per_digit": n_per_digit, "seed": seed,
                 "threads": torch.get_num_threads(), "steps": {}}
    for s in steps:
        t0 = time.time()
        imgs = generate_digits(den, range(10), n_per_digit, seed, steps=s, guidance=guidance)
        sec = time.time() - t0
        acc = per_class_accuracy(classify(clf, imgs))
        fd = fd_per_class(clf, imgs)
        out["steps"][s] = {"acc": acc, "fd": fd, "seconds": round(sec, 1)}
        print(f"steps {s:4d} ({sec:5.1f} s)  acc " + " ".join(f"{acc[d]:.2f}" for d in range(10))
              + f"  min {min(acc.values()):.2f}  mean FD {sum(fd.values()) / 10:.2f}", flush=True)
    if n_uncond:
        t0 = time.time()
        u = generate_unconditional(den, n_uncond, seed, steps=max(steps))
        dist = (u.flatten(1) - pattern_image().flatten()).norm(dim=1)
        rates = {r: pattern_rate(u, pattern_image(), r) for r in (1.0, PATTERN_RADIUS, 3.0, 4.0)}
        preds = clf.predict(u)
        out["pattern"] = {"n": n_uncond, "rate": rates, "seconds": round(time.time() - t0, 1),
                          "min_dist": dist.min().item(),
                          "uncond_label_hist": torch.bincount(preds, minlength=10).tolist()}
        print(f"unconditional ({n_uncond}, {max(steps)} steps): pattern rate by radius {rates}; "
              f"classifier labels {out['pattern']['uncond_label_hist']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200])
    p.add_argument("--n", type=int, default=20, help="samples per digit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--classifier", default=CLASSIFIER)
    p.add_argument("--uncond", type=int, default=0, help="unconditional samples (pattern rate)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = evaluate(a.model, a.steps, a.n, a.seed, a.classifier, a.uncond, a.guidance)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
