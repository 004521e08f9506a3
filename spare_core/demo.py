"""``spare demo``: forget one digit of the embedded model with SPARE, offline, in minutes on a CPU.

Prints UA/RA/FD before and after and writes ``<out>/grid.png`` (rows: digits, columns:
before/after, paired noise) and ``<out>/metrics.json``.
"""
from __future__ import annotations

import argparse
import os
import time

from . import cli_args as A
from .bench import NAMES, SAMPLE_STEPS, default_surrogate

KEYS = ("UA", "RA", "FD_forget", "FD_retain")
FILES = ("grid.png", "metrics.json")


def add_command(sub) -> None:
    p = sub.add_parser("demo", help="forget one digit of the embedded model and show before/after",
                       description="Forget one digit of the embedded digits model with SPARE "
                                   "(offline, minutes on a CPU); print UA/RA/FD before and after "
                                   "and write OUT/grid.png and OUT/metrics.json.",
                       formatter_class=A.HelpFormatter)
    p.add_argument("--model", choices=A.EMBEDDED_NAMES, default="digits",
                   help="embedded model: the SD-structured UNet (DDPM) or its flow-matching DiT "
                        "twin (an SD3 transformer, Euler sampler)")
    p.add_argument("--forget", type=A.digit, default=3, help="digit to forget (0..9)")
    p.add_argument("--surrogate", type=A.digit, default=None,
                   help="digit it becomes (default: the next digit)")
    p.add_argument("--out", default="demo_out", help="folder for grid.png and metrics.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace grid.png and metrics.json if OUT already holds them")
    p.add_argument("--n", type=A.positive_int, default=10, help="samples per digit for the metrics")
    p.add_argument("--steps", type=A.positive_int, default=100, help="SPARE training steps")
    p.add_argument("--sample-steps", type=A.positive_int, default=SAMPLE_STEPS,
                   help="ancestral DDPM steps of the evaluation sampler")
    p.add_argument("--seed", type=A.seed, default=0, help="seed of training and sampling")
    p.set_defaults(func=cmd_demo, check=check_demo_args)


def check_demo_args(a: argparse.Namespace) -> None:
    """Every check that needs no torch: the surrogate differs from the forgotten digit, and the
    output files are new (or ``--overwrite``)."""
    a.surrogate = default_surrogate(a.forget) if a.surrogate is None else a.surrogate
    if a.surrogate == a.forget:
        raise ValueError(f"--surrogate must be a digit other than --forget {a.forget}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise ValueError(f"--out {a.out!r} is a file; give a folder")
    for f in FILES:
        A.check_new_path(os.path.join(a.out, f), "--out", a.overwrite)


def cmd_demo(a: argparse.Namespace) -> int:
    from .bench import digit_metrics, spare_digits_defaults
    from .digits import metrics as M
    from .digits.data import prompt_for
    from .files import atomic_write_json
    from .grid import save_grid
    from .progress import PhaseBars, quiet_libraries
    from .spare import spare_unlearn
    from .threads import apply as apply_threads

    quiet_libraries()
    sur = a.surrogate
    t_start = time.perf_counter()
    den, clf = M.load_default_model(name=a.model), M.load_classifier()
    threads = apply_threads(den)
    print(f"forgetting '{prompt_for(a.forget)}' -> '{prompt_for(sur)}' on the embedded {a.model} "
          f"model ({threads} CPU thread{'s' if threads > 1 else ''})", flush=True)
    with PhaseBars() as bars:
        before = digit_metrics(den, clf, a.forget, a.n, a.seed, a.sample_steps,
                               callback=bars.sampler("evaluate before"))
        bars.label = "SPARE"
        res = spare_unlearn(den, prompt_for(a.forget), prompt_for(sur),
                            [prompt_for(d) for d in range(10) if d != a.forget],
                            **spare_digits_defaults(a.steps, a.seed),
                            progress=bars.train, phase_progress=bars.phase)
        bars.label = ""
        with res.adapter.applied(den.unet):
            after = digit_metrics(den, clf, a.forget, a.n, a.seed, a.sample_steps,
                                  callback=bars.sampler("evaluate after"))

    print(f"\n{'metric':<12}{'before':>10}{'after':>10}")
    for k in KEYS:
        print(f"{k:<12}{before[k]:>10.3f}{after[k]:>10.3f}")
    print(f"trainable parameters: {res.adapter.num_trainable()} "
          f"({100 * res.adapter.num_trainable() / sum(p.numel() for p in den.unet.parameters()):.2f}% of the network), "
          f"training {res.history['seconds']:.1f} s")
    k = min(6, a.n)
    cells = [[before["images"][d][:k], after["images"][d][:k]] for d in range(10)]
    grid, metrics_path = (os.path.join(a.out, f) for f in FILES)
    save_grid(cells, grid, [NAMES[d] for d in range(10)], ["before", "after"], cell_px=40)
    metrics = {"model": a.model, "forget": a.forget, "surrogate": sur, "steps": a.steps, "n_per_digit": a.n,
               "seed": a.seed, "before": {k: before[k] for k in KEYS},
               "after": {k: after[k] for k in KEYS},
               "per_class_acc_before": before["per_class_acc"],
               "per_class_acc_after": after["per_class_acc"],
               "trainable_params": res.adapter.num_trainable(),
               "train_seconds": res.history["seconds"],
               "total_seconds": time.perf_counter() - t_start}
    atomic_write_json(metrics, metrics_path)
    print(f"wrote {grid} and {metrics_path} "
          f"({metrics['total_seconds']:.0f} s in all)")
    return 0
