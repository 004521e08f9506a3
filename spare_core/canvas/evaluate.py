"""Measure the embedded canvas model with the bench sampler: style and object accuracy of the
classifier on the model's own samples for every (style, object) prompt, in both wordings, the FD
to renders, and the sampling time, at several step counts.

    python -m spare_core.canvas.evaluate --steps 25 --n 10 --json spare_core/assets/canvas/eval.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .classifier import held_out_accuracy, load_classifier_file
from .metrics import CANVAS_MODEL, CLASSIFIER, PAIRS, SAMPLE_GUIDANCE, fd, generate, predictions
from .names import OBJECTS, STYLES


def evaluate(model: str, steps: list[int], n: int = 10, seed: int = 0,
             classifier: str = CLASSIFIER, guidance: float = SAMPLE_GUIDANCE,
             method: str = "ddpm", device: str = "cpu") -> dict:
    """Returns ``{"steps": {s: {"wording0": {...}, "wording1": {...}, "seconds": t}}, ...}``
    where each wording holds per-prompt ``style_acc`` / ``object_acc`` and their minima. The model samples on ``device``; the classifier runs on the CPU."""
    from ..families import load_denoiser

    den = load_denoiser(model, device=device)
    clf = load_classifier_file(classifier)
    acc = held_out_accuracy(clf)
    rel = os.path.relpath(model)
    out: dict = {"model": rel if not rel.startswith("..") else model, "sampler": method, "guidance": guidance, "n_per_prompt": n,
                 "seed": seed, "threads": torch.get_num_threads(), "device": str(device),
                 "classifier_held_out": {"style": acc[0], "object": acc[1]}, "steps": {}}
    for s in steps:
        row: dict = {}
        t0 = time.time()
        for wording in (0, 1):
            imgs = generate(den, PAIRS, n, seed, wording=wording, steps=s, guidance=guidance,
                            method=method).cpu()
            preds = predictions(clf, imgs, PAIRS, n)
            sa = {f"{st}/{ob}": int((preds[(st, ob)][0] == STYLES.index(st)).sum()) / n
                  for st, ob in PAIRS}
            oa = {f"{st}/{ob}": int((preds[(st, ob)][1] == OBJECTS.index(ob)).sum()) / n
                  for st, ob in PAIRS}
            row[f"wording{wording}"] = {
                "style_acc": sa, "object_acc": oa, "min_style_acc": min(sa.values()),
                "min_object_acc": min(oa.values()),
                "mean_style_acc": sum(sa.values()) / len(sa),
                "mean_object_acc": sum(oa.values()) / len(oa), "FD": fd(clf, imgs, PAIRS)}
            w = row[f"wording{wording}"]
            print(f"steps {s:4d} wording {wording}: style acc mean {w['mean_style_acc']:.3f} "
                  f"min {w['min_style_acc']:.2f}, object acc mean {w['mean_object_acc']:.3f} "
                  f"min {w['min_object_acc']:.2f}, FD {w['FD']:.1f}", flush=True)
        row["seconds"] = round(time.time() - t0, 1)
        out["steps"][s] = row
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=CANVAS_MODEL)
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    p.add_argument("--n", type=int, default=10, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=SAMPLE_GUIDANCE)
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--classifier", default=CLASSIFIER)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = {"command": "python -m spare_core.canvas.evaluate " + " ".join(argv or sys.argv[1:]),
           **evaluate(a.model, a.steps, a.n, a.seed, a.classifier, a.guidance, a.sampler, a.device)}
    if a.json:
        from ..files import atomic_write_json
        atomic_write_json(res, a.json)


if __name__ == "__main__":
    main()
