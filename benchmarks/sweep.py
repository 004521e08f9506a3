"""A resumable sweep of concept-bench runs: (method variant, target, seed) jobs, one row each.

Each finished job appends one JSON line to ``<out>/rows-<shard>.jsonl`` (flushed and fsynced), so
a sweep that is stopped resumes where it was: a job whose key is already in any rows file is
skipped. Run shards side by side, one torch thread each (two on this 2-core box):

    python benchmarks/sweep.py --model canvas --methods spare,spare:module_selection=all \\
        --forget stripes,heart --seeds 0,1 --out benchmarks/runs/loc --shard 0/2 &
    python benchmarks/sweep.py ... --shard 1/2 &
    python benchmarks/sweep.py ... --report        # tables from whatever has finished

Methods and options are ``spare bench``'s (``name:key=value``). ``--report`` prints per-target
rows (mean ± std over seeds), then each variant's mean over targets; the original model's
rows come from the same runs (same seeds, same sampler).

Budget curves (``--checkpoints 25,50,100,200,400``): each job trains once for the largest
count at the variant's (constant) ``lr`` and is measured at every checkpoint, one row per
checkpoint keyed by its step count; ``--report --checkpoints ...`` prints each variant's
curve and the first checkpoint whose mean UA reaches 0.95, with its wall seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def jobs(methods: list[str], targets: list[str], seeds: list[int],
         shard: int = 0, shards: int = 1) -> list[tuple[str, str, int]]:
    """Shard ``shard`` of ``shards`` of every (label, target, seed), seed-major so that an
    early report covers every variant. The original model's rows, then each variant's, are
    dealt round-robin with one running count, so every shard gets its share of the long
    training runs (to within one per variant), also when a sweep has one target and one seed."""
    groups = [[("original", t, s) for s in seeds for t in targets]]
    groups += [[(m, t, s) for s in seeds for t in targets] for m in methods]
    mine = [j for i, j in enumerate(j for g in groups for j in g) if i % shards == shard]
    order = {j: k for k, j in enumerate((m, t, s) for s in seeds for t in targets
                                        for m in ["original"] + methods)}
    return sorted(mine, key=order.__getitem__)


def parse_targets(model: str, text: str) -> list:
    """Targets erased one at a time (a sweep may mix styles and objects)."""
    from spare_core.cli_args import forget_targets

    return [forget_targets(model, t)[0] for t in text.split(",") if t.strip()]


def key(model: str, steps: int, label: str, target: str, seed: int) -> str:
    return f"{model}|{steps}|{label}|{target}|{seed}"


def make_row(model: str, steps: int, label: str, target, seed: int, values: dict) -> dict:
    """One rows-file line: a job's measured ``values`` under its key."""
    return {"key": key(model, steps, label, str(target), seed), "model": model, "steps": steps,
            "label": label, "target": str(target), "seed": seed, "values": values}


def load_rows(out: str) -> dict[str, dict]:
    rows = {}
    if not os.path.isdir(out):
        return rows
    for name in sorted(os.listdir(out)):
        if name.startswith("rows-") and name.endswith(".jsonl"):
            with open(os.path.join(out, name)) as f:
                for line in f:
                    line = line.strip()
                    if line:
                        r = json.loads(line)
                        rows[r["key"]] = r
    return rows


def run(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    from spare_core.bench import adapter_bytes, parse_methods, run_concept_method
    from spare_core.cli_args import CONCEPT_METHODS
    from spare_core.embedded import get

    bench = get(a.model)
    targets = parse_targets(a.model, a.forget)
    labels = [m.strip() for m in a.methods.split(",") if m.strip()]
    variants = {v.label: v for v in parse_methods(",".join(labels), CONCEPT_METHODS)}
    shard, shards = (int(x) for x in a.shard.split("/"))
    done = load_rows(a.out)
    checkpoints = a.checkpoint_list
    last = checkpoints[-1] if checkpoints else a.steps
    todo = [j for j in jobs(labels, targets, a.seed_list, shard, shards)
            if key(a.model, last, *j) not in done
            and not (checkpoints and j[0] == "original")]  # a curve has no original rows
    print(f"shard {shard}/{shards}: {len(todo)} jobs to run", flush=True)
    if not todo:
        return
    os.makedirs(a.out, exist_ok=True)
    den, clf = bench.load()
    steps_eval = bench.sample_steps
    path = os.path.join(a.out, f"rows-{shard}.jsonl")
    def write(row: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    for label, target, seed in todo:
        t0 = time.perf_counter()
        values = {}
        if checkpoints:
            for row in curve(bench, den, clf, variants[label], target, seed, checkpoints,
                             a.model, a.n, steps_eval):
                write(row)
                shown = "  ".join(f"{k}={v:.3f}" for k, v in row["values"].items())
                print(f"[{shard}] {label} {target} seed {seed} @{row['steps']}: {shown}",
                      flush=True)
            continue
        if label == "original":
            m = bench.measure(den, clf, [target], a.n, seed, steps_eval)
        else:
            v = variants[label]
            res = run_concept_method(v.name, den, [target], steps=a.steps, seed=seed,
                                     options=v.options, model=a.model)
            values.update(seconds=time.perf_counter() - t0,
                          trainable=res.adapter.num_trainable(),
                          adapter_kB=adapter_bytes(res.adapter) / 1024)
            with res.adapter.applied_to(den):
                m = bench.measure(den, clf, [target], a.n, seed, steps_eval)
        values.update({k: float(m[k]) for k in bench.metric_keys if k in m})
        row = make_row(a.model, a.steps, label, target, seed, values)
        write(row)
        shown = "  ".join(f"{k}={v:.3f}" for k, v in values.items() if isinstance(v, float))
        print(f"[{shard}] {label} {target} seed {seed}: {shown} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


def curve(bench, den, clf, variant, target, seed: int, checkpoints: list[int], model: str,
          n: int, steps_eval: int) -> list[dict]:
    """One run of ``variant`` for ``checkpoints[-1]`` steps, measured at every checkpoint
    with the adapter as trained so far: the rows a run of each checkpoint's length would give
    at the same (constant) learning rate, since nothing in the loop depends on the step count
    once ``lr`` is given. ``seconds`` is the wall time to the checkpoint (preparation and
    training), measurements excluded. Measuring runs without gradient and on a forked RNG, so
    the training it interrupts draws what it would have drawn."""
    import torch

    from spare_core.bench import run_concept_method

    if "lr" not in variant.options:
        raise SystemExit(f"--checkpoints needs an explicit lr in {variant.label!r} (a recipe "
                         "without one scales its lr to the step count)")
    rows, t0, paused = [], time.perf_counter(), 0.0
    wanted = set(checkpoints)

    def at_step(step: int, _total: int, loss: float) -> None:
        nonlocal paused
        if step not in wanted:
            return
        t1 = time.perf_counter()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            m = bench.measure(den, clf, [target], n, seed, steps_eval)
        values = {"seconds": t1 - t0 - paused, "loss": float(loss)}
        values.update({k: float(m[k]) for k in bench.metric_keys if k in m})
        rows.append(make_row(model, step, variant.label, target, seed, values))
        paused += time.perf_counter() - t1

    run_concept_method(variant.name, den, [target], steps=checkpoints[-1], seed=seed,
                       options={**variant.options, "progress": at_step}, model=model)
    return rows


def curve_report(a) -> str:
    """Markdown: per variant and checkpoint, the mean over targets and seeds of UA / IRA /
    CRA / UA_para / seconds, then each variant's first checkpoint whose mean UA reaches 0.95."""
    import statistics

    rows = [r for r in load_rows(a.out).values() if r["model"] == a.model]
    if a.methods:
        rows = [r for r in rows if r["label"] in [m.strip() for m in a.methods.split(",")]]
    if a.forget:
        targets = {str(t) for t in parse_targets(a.model, a.forget)}
        rows = [r for r in rows if r["target"] in targets]
    rows = [r for r in rows if r["seed"] in a.seed_list]
    cols = [c for c in ("UA", "RA", "IRA", "CRA", "UA_para", "UA_tmpl", "FD", "FD_retain", "seconds")
            if any(c in r["values"] for r in rows)]
    by: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        by.setdefault((r["label"], r["steps"]), []).append(r)
    out = ["| method | steps | runs | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    first: dict[str, str] = {}
    for (label, steps) in sorted(by, key=lambda k: (list(dict.fromkeys(
            r["label"] for r in rows)).index(k[0]), k[1])):
        rs = by[(label, steps)]
        mean = {c: statistics.fmean(r["values"][c] for r in rs if c in r["values"]) for c in cols}
        prec = {c: 1 if c.startswith("FD") or c == "seconds" else 3 for c in cols}
        out.append(f"| {label} | {steps} | {len(rs)} | "
                   + " | ".join(f"{mean[c]:.{prec[c]}f}" for c in cols) + " |")
        if label not in first and mean.get("UA", 0.0) >= 0.95:
            first[label] = f"{steps} steps, {mean['seconds']:.0f} s"
    labels = list(dict.fromkeys(r["label"] for r in rows))
    out += ["", "| method | first checkpoint with mean UA >= 0.95 |", "|---|---|"]
    out += [f"| {label} | {first.get(label, 'not reached')} |" for label in labels]
    return "\n".join(out)


def report(a) -> str:
    """Markdown: per (variant, target) mean ± std over seeds, then per variant the mean over
    targets (of the per-target means), for the rows of this model and step count."""
    import statistics

    rows = [r for r in load_rows(a.out).values()
            if r["model"] == a.model and r["steps"] == a.steps]
    if a.methods:
        wanted = ["original"] + [m.strip() for m in a.methods.split(",") if m.strip()]
        rows = [r for r in rows if r["label"] in wanted]
    else:
        wanted = list(dict.fromkeys(r["label"] for r in rows))
    targets = ([str(t) for t in parse_targets(a.model, a.forget)] if a.forget
               else list(dict.fromkeys(r["target"] for r in rows)))
    cols = ["UA", "RA", "IRA", "CRA", "UA_para", "UA_tmpl", "to_surrogate", "FD", "FD_forget", "FD_retain",
            "seconds", "trainable"]
    cols = [c for c in cols if any(c in r["values"] for r in rows)]
    by = {}
    for r in rows:
        if r["target"] in targets and r["seed"] in a.seed_list:
            by.setdefault((r["label"], r["target"]), []).append(r["values"])

    def cell(vals: list[dict], c: str) -> tuple[str, float | None]:
        xs = [v[c] for v in vals if c in v]
        if not xs:
            return "", None
        mean = statistics.fmean(xs)
        prec = 0 if c == "trainable" else 1 if c in ("seconds",) or c.startswith("FD") else 3
        txt = f"{mean:.{prec}f}"
        if len(xs) > 1 and c != "trainable":
            txt += f" ± {statistics.stdev(xs):.{prec}f}"
        return txt, mean

    out = ["| method | target | seeds | " + " | ".join(cols) + " |",
           "|" + "---|" * (len(cols) + 3)]
    means: dict[str, dict[str, list[float]]] = {}
    for t in targets:
        for label in wanted:
            vals = by.get((label, t))
            if not vals:
                continue
            cells = []
            for c in cols:
                txt, mean = cell(vals, c)
                cells.append(txt)
                if mean is not None:
                    means.setdefault(label, {}).setdefault(c, []).append(mean)
            out.append(f"| {label} | {t} | {len(vals)} | " + " | ".join(cells) + " |")
    summary = [c for c in ("UA", "RA", "IRA", "CRA", "UA_para", "UA_tmpl", "FD", "seconds", "trainable")
               if c in cols]
    out += ["", f"Mean over targets ({', '.join(targets)}); 'min UA' is the lowest target's mean:",
            "", "| method | targets | " + " | ".join(summary) + " | min UA |",
            "|" + "---|" * (len(summary) + 3)]
    for label in wanted:
        if label not in means:
            continue
        m = means[label]
        n_t = len(m.get(summary[0], []))
        vals = []
        for c in summary:
            xs = m.get(c, [])
            prec = 0 if c == "trainable" else 1 if c in ("seconds", "FD") else 3
            vals.append(f"{statistics.fmean(xs):.{prec}f}" if xs else "")
        low = f"{min(m['UA']):.3f}" if m.get("UA") else ""
        out.append(f"| {label} | {n_t} | " + " | ".join(vals) + f" | {low} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="canvas")
    p.add_argument("--methods", default="")
    p.add_argument("--forget", default="")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--n", type=int, default=2, help="samples per prompt (bench --n)")
    p.add_argument("--out", required=True, help="folder of the rows files")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th job from the i-th")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoints", default="",
                   help="budget curve: train for the largest of these step counts and measure "
                        "at each (e.g. 25,50,100,200,400); the variant must give lr")
    p.add_argument("--report", action="store_true", help="print the tables and exit")
    a = p.parse_args(argv)
    a.seed_list = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.checkpoint_list = sorted({int(s) for s in a.checkpoints.split(",") if s.strip()})
    if a.report:
        print(curve_report(a) if a.checkpoint_list else report(a))
        return 0
    if not a.methods or not a.forget:
        p.error("--methods and --forget are needed to run jobs")
    run(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
