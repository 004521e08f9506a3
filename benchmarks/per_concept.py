"""Shared adapter vs per-concept adapters + each fusion, on an embedded model's list of targets
(issue 24): one row per variant with the bench's metrics and the wall seconds.

    python benchmarks/per_concept.py --model canvas --forget stripes,dots --seeds 0 --n 20 [--peers uce,esd]

The per-concept jobs are trained once per seed (``unlearn_concepts`` with ``least_squares``,
whose parts are also fused by ``sum`` and ``ties``); ``seconds`` of a fused row is that run's
(training both concepts, plus the least-squares inputs) for all three.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="canvas")
    p.add_argument("--forget", default="stripes,dots")
    p.add_argument("--method", default="spare")
    p.add_argument("--seeds", default="0")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--peers", default="", help="other methods run on the whole list (one shared "
                   "edit each, at their recipes), e.g. uce,esd,salun")
    p.add_argument("--ls-preserve-weight", type=float, default=None,
                   help="weight of the preserved prompts' rows in the least-squares fusion "
                        "(default: unlearn_concepts' ls_preserve_weight)")
    a = p.parse_args()

    from spare_core.bench import Row, format_row, mean_over_seeds, markdown_table
    from spare_core.embedded import get
    from spare_core.fusion import fuse_sum, fuse_ties
    from spare_core.methods import run_method
    from spare_core.multi_concept import unlearn_concepts
    from spare_core.recipes import recipe
    from spare_core.tasks import concept_pairs
    from spare_core.threads import apply as apply_threads

    bench = get(a.model)
    den, clf = bench.load()
    apply_threads(den)
    targets = a.forget.split(",")
    steps = a.steps or recipe(a.method).steps
    keys = bench.metric_keys
    label = "+".join(bench.label(t) for t in targets)
    runs = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        req = bench.request(targets)
        kw = bench.settings(a.method, steps, seed)

        def row(name, adapter, secs):
            ctx = adapter.applied_to(den) if adapter is not None else None
            if ctx is None:
                m = bench.measure(den, clf, targets, a.n, seed, bench.sample_steps)
            else:
                with ctx:
                    m = bench.measure(den, clf, targets, a.n, seed, bench.sample_steps)
            r = Row(name, label, {**{k: m[k] for k in keys if k in m},
                                  **({"seconds": secs, "trainable": adapter.num_trainable()}
                                     if adapter is not None else {})})
            print(format_row(r), flush=True)
            return r

        rows = [row("original", None, None)]
        t0 = time.perf_counter()
        shared = run_method(a.method, den, **req, **kw)
        rows.append(row(f"{a.method} shared", shared.adapter, time.perf_counter() - t0))
        t0 = time.perf_counter()
        res = unlearn_concepts(a.method, den, concept_pairs(req["concept"], req["surrogate"]),
                               preserve=req["preserve"], fusion="least_squares",
                               **({} if a.ls_preserve_weight is None
                                  else {"ls_preserve_weight": a.ls_preserve_weight}), **kw)
        secs = time.perf_counter() - t0
        rows.append(row(f"{a.method} per-concept sum", fuse_sum(res.parts), secs))
        rows.append(row(f"{a.method} per-concept ties", fuse_ties(res.parts), secs))
        ls = "least_squares" + ("" if a.ls_preserve_weight is None
                                else f" w={a.ls_preserve_weight:g}")
        rows.append(row(f"{a.method} per-concept {ls}", res.adapter, secs))
        for peer in [m.strip() for m in a.peers.split(",") if m.strip()]:
            t0 = time.perf_counter()
            done = run_method(peer, den, **req,
                              **bench.settings(peer, recipe(peer).steps or steps, seed))
            rows.append(row(peer, done.adapter, time.perf_counter() - t0))
        runs.append(rows)
    print(markdown_table(mean_over_seeds(runs) if len(runs) > 1 else runs[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
