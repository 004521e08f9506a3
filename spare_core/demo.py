"""``spare demo``: forget one digit of the embedded model with SPARE, offline, in minutes on a CPU.

Prints UA/RA/FD before and after and writes ``<out>/grid.png`` (rows: digits, columns:
before/after, paired noise) and ``<out>/metrics.json``.
"""
from __future__ import annotations

import argparse
import os
import time

from .bench import default_surrogate, digit_metrics, spare_digits_defaults
from .digits import metrics as M
from .digits.data import NAMES, prompt_for
from .files import atomic_write_json

KEYS = ("UA", "RA", "FD_forget", "FD_retain")


def add_command(sub) -> None:
    p = sub.add_parser("demo", help="forget one digit of the embedded model and show before/after")
    p.add_argument("--forget", type=int, default=3, help="digit to forget (0..9)")
    p.add_argument("--surrogate", type=int, default=None,
                   help="digit it becomes (default: the next digit)")
    p.add_argument("--out", default="demo_out", help="folder for grid.png and metrics.json")
    p.add_argument("--n", type=int, default=10, help="samples per digit for the metrics")
    p.add_argument("--steps", type=int, default=100, help="SPARE training steps")
    p.add_argument("--sample-steps", type=int, default=M.SAMPLE_STEPS, help="bench sampler steps")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def cmd_demo(a: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .grid import save_grid
    from .spare import spare_unlearn

    if not 0 <= a.forget <= 9:
        raise ValueError(f"--forget must be a digit 0..9, got {a.forget}")
    sur = default_surrogate(a.forget) if a.surrogate is None else a.surrogate
    if not 0 <= sur <= 9 or sur == a.forget:
        raise ValueError(f"--surrogate must be a digit 0..9 other than {a.forget}, got {sur}")
    os.makedirs(a.out, exist_ok=True)
    t_start = time.perf_counter()
    den, clf = M.load_default_model(), M.load_classifier()
    print(f"forgetting '{prompt_for(a.forget)}' -> '{prompt_for(sur)}' on the embedded digits model")
    before = digit_metrics(den, clf, a.forget, a.n, a.seed, a.sample_steps)
    print("SPARE: sampling the concept, computing saliency, then training the sparse LoRA")
    bar = tqdm(total=a.steps, desc="SPARE", unit="step")
    res = spare_unlearn(den, prompt_for(a.forget), prompt_for(sur),
                        [prompt_for(d) for d in range(10) if d != a.forget],
                        **spare_digits_defaults(a.steps, a.seed),
                        progress=lambda i, n, loss: (bar.update(i - bar.n), bar.set_postfix(loss=f"{loss:.4f}")))
    bar.close()
    with res.adapter.applied(den.unet):
        after = digit_metrics(den, clf, a.forget, a.n, a.seed, a.sample_steps)

    print(f"\n{'metric':<12}{'before':>10}{'after':>10}")
    for k in KEYS:
        print(f"{k:<12}{before[k]:>10.3f}{after[k]:>10.3f}")
    print(f"trainable parameters: {res.adapter.num_trainable()} "
          f"({100 * res.adapter.num_trainable() / sum(p.numel() for p in den.unet.parameters()):.2f}% of the UNet), "
          f"training {res.history['seconds']:.1f} s")
    k = min(6, a.n)
    cells = [[before["images"][d][:k], after["images"][d][:k]] for d in range(10)]
    grid = os.path.join(a.out, "grid.png")
    save_grid(cells, grid, [NAMES[d] for d in range(10)], ["before", "after"], cell_px=40)
    metrics = {"forget": a.forget, "surrogate": sur, "steps": a.steps, "n_per_digit": a.n,
               "seed": a.seed, "before": {k: before[k] for k in KEYS},
               "after": {k: after[k] for k in KEYS},
               "per_class_acc_before": before["per_class_acc"],
               "per_class_acc_after": after["per_class_acc"],
               "trainable_params": res.adapter.num_trainable(),
               "train_seconds": res.history["seconds"],
               "total_seconds": time.perf_counter() - t_start}
    atomic_write_json(metrics, os.path.join(a.out, "metrics.json"))
    print(f"wrote {grid} and {os.path.join(a.out, 'metrics.json')} "
          f"({metrics['total_seconds']:.0f} s in all)")
    return 0
