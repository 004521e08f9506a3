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


def polish(den, fused, req: dict, steps: int, kw: dict):
    """A copy of ``fused`` trained ``steps`` more on the whole list at once (the shared
    task: every concept with its surrogate, the preserved prompts; SPARE's objective, lr, batch
    and pools from the recipe, sampled at the bench's settings ``kw`` as the jobs' were)."""
    from spare_core.adapter import UnlearnAdapter
    from spare_core.loop import UnlearnConfig, unlearn
    from spare_core.recipes import guidance_for, recipe
    from spare_core.tasks import ConceptTask, PoolConfig

    r = recipe("spare")
    pool = PoolConfig(size=r.num_samples, steps=r.sample_steps,
                      guidance=guidance_for(den, kw.get("guidance")), clip_x0=kw.get("clip_x0"))
    task = ConceptTask(concept=req["concept"], surrogate=req["surrogate"],
                       preserve=req["preserve"], pool=pool)
    cfg = UnlearnConfig(steps=steps, lr=r.lr, batch_size=r.batch_size, seed=kw["seed"],
                        timestep_sampler=r.timestep_sampler)
    return unlearn(den, UnlearnAdapter.from_tensors(*fused.to_tensors()), task, "self_distill",
                   cfg).adapter


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="canvas")
    p.add_argument("--forget", default="stripes,dots")
    p.add_argument("--method", default="spare",
                   help="the method of the shared and per-concept rows, with options as the "
                        "sweep takes them, e.g. spare:preserve_weight=2")
    p.add_argument("--surrogate", default=None,
                   help="the surrogate of every target, or one per target (comma-separated); "
                        "default: the bench's (canvas: plain for a style; one kept object for "
                        "every object of the list)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--shared-steps", default="",
                   help="step counts of the shared-adapter rows, e.g. 100,400 (default: --steps; "
                        "k x steps is the per-concept run's total budget)")
    p.add_argument("--polish-steps", default="",
                   help="also train each fused adapter (sum, least squares) this many more steps "
                        "on the whole list at once, e.g. 50,100 (a measured idea, not shipped)")
    p.add_argument("--no-per-concept", action="store_true",
                   help="only the original, the shared-adapter rows and the peers")
    p.add_argument("--no-shared", action="store_true", help="no shared-adapter row")
    p.add_argument("--ls-samples", type=int, default=None,
                   help="latents per concept (and of the preserved prompts) whose layer inputs "
                        "the least-squares fusion reads (default: unlearn_concepts')")
    p.add_argument("--fusions", default="sum,ties,least_squares",
                   help="the fused rows to measure (the jobs are the same for all)")
    p.add_argument("--peers", default="", help="other methods run on the whole list (one shared "
                   "edit each, at their recipes), e.g. uce,esd,salun")
    p.add_argument("--ls-preserve-weight", default="",
                   help="weight of the preserved prompts' rows in the least-squares fusion, or "
                        "several (comma-separated: one least-squares row each, from the same "
                        "jobs; default: unlearn_concepts' ls_preserve_weight)")
    a = p.parse_args()

    from spare_core.bench import Row, format_row, mean_over_seeds, markdown_table, parse_methods
    from spare_core.embedded import get
    from spare_core.fusion import check_fusion, fuse_least_squares, fuse_sum, fuse_ties
    from spare_core.methods import METHODS, run_method
    from spare_core.multi_concept import unlearn_concepts
    from spare_core.recipes import recipe
    from spare_core.tasks import concept_pairs
    from spare_core.threads import apply as apply_threads

    variant = parse_methods(a.method, tuple(METHODS))[0]  # errors before any model loads
    weights = [float(w) for w in a.ls_preserve_weight.split(",") if w.strip()]
    fusions = [f.strip() for f in a.fusions.split(",") if f.strip()]
    for f in fusions:  # a typo would measure nothing, silently
        check_fusion(f)
    bench = get(a.model)
    den, clf = bench.load()
    apply_threads(den)
    targets = a.forget.split(",")
    steps = a.steps or recipe(variant.name).steps
    keys = bench.metric_keys
    label = "+".join(bench.label(t) for t in targets)
    runs = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        req = bench.request(targets, None if a.surrogate is None else a.surrogate.split(","))
        kw = {**bench.settings(variant.name, steps, seed), **variant.options}

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
        for n_steps in [] if a.no_shared else ([int(x) for x in a.shared_steps.split(",")
                                                 if x.strip()] or [steps]):
            t0 = time.perf_counter()
            shared = run_method(variant.name, den, **req, **{**kw, "steps": n_steps})
            rows.append(row(f"{a.method} shared" + ("" if n_steps == steps else f", {n_steps} steps"),
                            shared.adapter, time.perf_counter() - t0))
        if not a.no_per_concept:
            t0 = time.perf_counter()
            res = unlearn_concepts(variant.name, den, concept_pairs(req["concept"], req["surrogate"]),
                                   preserve=req["preserve"], fusion="least_squares",
                                   **({"ls_preserve_weight": weights[0]} if weights else {}),
                                   **({} if a.ls_samples is None else {"ls_samples": a.ls_samples}),
                                   **kw)
            secs = time.perf_counter() - t0
            if "sum" in fusions:
                rows.append(row(f"{a.method} per-concept sum", fuse_sum(res.parts), secs))
            if "ties" in fusions:
                rows.append(row(f"{a.method} per-concept ties", fuse_ties(res.parts), secs))
            ls = "least_squares" + (f" w={weights[0]:g}" if weights else "")
            if "least_squares" in fusions:
                rows.append(row(f"{a.method} per-concept {ls}", res.adapter, secs))
            for w in weights[1:]:  # the same jobs and Grams, solved again at weight w
                res.sums.preserve_weight = w
                rows.append(row(f"{a.method} per-concept least_squares w={w:g}",
                                fuse_least_squares(res.parts, res.sums), secs))
            for name, fused in (("sum", fuse_sum(res.parts)), (ls, res.adapter)):
                for n_steps in [int(x) for x in a.polish_steps.split(",") if x.strip()]:
                    t0 = time.perf_counter()
                    done = polish(den, fused, req, n_steps, kw)
                    rows.append(row(f"{a.method} per-concept {name} + {n_steps} joint steps",
                                    done, secs + time.perf_counter() - t0))
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
