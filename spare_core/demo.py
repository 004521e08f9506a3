"""``spare demo``: forget one concept of an embedded model with SPARE, offline, in minutes on a
CPU: a digit of the digits models, or a style (or object) of the canvas model.

Prints the model's metrics before and after (digits: UA/RA/FD; canvas: UA/IRA/CRA/paraphrase
UA/FD) and writes ``<out>/grid.png`` (rows: digits, or canvas styles; columns: before/after,
paired noise) and ``<out>/metrics.json``.
"""
from __future__ import annotations

import argparse
import os
import time

from . import cli_args as A
from .recipes import RECIPES
from .canvas.names import STYLES

FILES = ("grid.png", "metrics.json")


def add_command(sub) -> None:
    p = sub.add_parser("demo", help="forget one concept of an embedded model and show before/after",
                       description="Forget one digit of the embedded digits model (or a style "
                                   "or object of the canvas model) with SPARE (offline, minutes "
                                   "on a CPU); print the metrics before and after and write "
                                   "OUT/grid.png and OUT/metrics.json.",
                       formatter_class=A.HelpFormatter)
    p.add_argument("--model", choices=A.EMBEDDED_NAMES, default="digits",
                   help="embedded model: the SD-structured digits UNet (DDPM), its flow-matching "
                        "DiT twin (an SD3 transformer, Euler sampler), or canvas (8 styles x 8 "
                        "objects, UnlearnCanvas's metrics)")
    p.add_argument("--forget", default=None,
                   help="what to forget: a digit 0..9 (default 3), or a canvas style or object "
                        "(default stripes)")
    p.add_argument("--surrogate", default=None,
                   help="what it becomes (default: the next digit; canvas: plain style, or the "
                        "next object)")
    p.add_argument("--out", default="demo_out", help="folder for grid.png and metrics.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace grid.png and metrics.json if OUT already holds them")
    p.add_argument("--n", type=A.positive_int, default=None,
                   help="samples per prompt for the metrics (default 10 per digit; 3 per canvas "
                        "prompt)")
    p.add_argument("--steps", type=A.positive_int, default=RECIPES["spare"].steps,
                   help="SPARE training steps (its recipe's)")
    p.add_argument("--sample-steps", type=A.positive_int, default=None,
                   help="ancestral DDPM steps of the evaluation sampler (default: the model's, "
                        "50 for digits, 25 for canvas)")
    p.add_argument("--seed", type=A.seed, default=0, help="seed of training and sampling")
    p.set_defaults(func=cmd_demo, check=check_demo_args)


def check_demo_args(a: argparse.Namespace) -> None:
    """Every check that needs no torch: one target of the model, a surrogate that differs from
    it, and new output files (or ``--overwrite``)."""
    canvas = a.model == "canvas"
    for flag, value in (("--forget", a.forget), ("--surrogate", a.surrogate)):
        if not canvas and value is not None and not A.is_digit(value):
            raise ValueError(f"{flag} must be a digit 0..9 on the {a.model} model, got {value!r}")
    forget = A.forget_targets(a.model, a.forget if a.forget is not None else
                              ("stripes" if canvas else "3"))
    if len(forget) != 1:
        raise ValueError(f"--forget takes one target in the demo, got {a.forget!r}")
    a.forget = forget[0]
    if a.surrogate is not None:  # None: the model's default, EmbeddedBench.default_surrogate
        sur = A.forget_targets(a.model, a.surrogate)
        if len(sur) != 1 or (canvas and (sur[0] in STYLES) != (a.forget in STYLES)):
            raise ValueError(f"--surrogate must be one {'digit' if not canvas else 'concept of the same domain as --forget'}, got {a.surrogate!r}")
        a.surrogate = sur[0]
    if a.surrogate is not None and a.surrogate == a.forget:
        raise ValueError(f"--surrogate must be {'a concept' if canvas else 'a digit'} other than "
                         f"--forget {a.forget}")
    a.n = a.n or (3 if canvas else 10)
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise ValueError(f"--out {a.out!r} is a file; give a folder")
    for f in FILES:
        A.check_new_path(os.path.join(a.out, f), "--out", a.overwrite)


def cmd_demo(a: argparse.Namespace) -> int:
    from .embedded import get
    from .files import atomic_write_json
    from .grid import save_grid
    from .progress import PhaseBars, quiet_libraries
    from .spare import spare_unlearn
    from .threads import apply as apply_threads

    quiet_libraries()
    bench = get(a.model)
    a.sample_steps = a.sample_steps or bench.sample_steps
    if a.surrogate is None:
        a.surrogate = bench.default_surrogate(a.forget)
    t_start = time.perf_counter()
    den, clf = bench.load()
    threads = apply_threads(den)
    req = bench.request([a.forget], [a.surrogate])
    print(f"forgetting '{req['concept']}' -> '{req['surrogate']}' on the embedded {a.model} "
          f"model ({threads} CPU thread{'s' if threads > 1 else ''})", flush=True)
    with PhaseBars() as bars:
        before = bench.measure(den, clf, [a.forget], a.n, a.seed, a.sample_steps, [a.surrogate],
                               callback=bars.sampler("evaluate before"))
        bars.label = "SPARE"
        res = spare_unlearn(den, **req, **bench.settings("spare", a.steps, a.seed),
                            progress=bars.train, phase_progress=bars.phase)
        bars.label = ""
        with res.adapter.applied_to(den):
            after = bench.measure(den, clf, [a.forget], a.n, a.seed, a.sample_steps,
                                  [a.surrogate], callback=bars.sampler("evaluate after"))

    keys = bench.demo_keys
    print(f"\n{'metric':<12}{'before':>10}{'after':>10}")
    for k in keys:
        print(f"{k:<12}{before[k]:>10.3f}{after[k]:>10.3f}")
    print(f"trainable parameters: {res.adapter.num_trainable()} "
          f"({100 * res.adapter.num_trainable() / sum(p.numel() for p in den.unet.parameters()):.2f}% of the network), "
          f"training {res.history['seconds']:.1f} s")
    cells, labels = bench.grid(before, after, min(6, a.n) if a.model != "canvas" else 8)
    grid, metrics_path = (os.path.join(a.out, f) for f in FILES)
    save_grid(cells, grid, labels, ["before", "after"], cell_px=40)
    metrics = {"model": a.model, "forget": a.forget, "surrogate": a.surrogate, "steps": a.steps,
               "n_per_prompt": a.n, "seed": a.seed, "before": {k: before[k] for k in keys},
               "after": {k: after[k] for k in keys},
               "trainable_params": res.adapter.num_trainable(),
               "train_seconds": res.history["seconds"],
               "total_seconds": time.perf_counter() - t_start}
    if "per_class_acc" in before:
        metrics.update(per_class_acc_before=before["per_class_acc"],
                       per_class_acc_after=after["per_class_acc"])
    atomic_write_json(metrics, metrics_path)
    print(f"wrote {grid} and {metrics_path} "
          f"({metrics['total_seconds']:.0f} s in all)")
    return 0
