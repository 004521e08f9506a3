"""Fronts of the data-unlearning methods on the pattern model: pattern rate against FD_rest.

For each method variant, parameterization (full weights, the LoRA of the recipe's rank) and
learning rate, one run per seed trains for the largest budget at constant lr and is measured at
every checkpoint (``CHECKPOINTS``) and at the step where the engine's early stop would end it
(the first probe check, every ``EVERY`` steps, whose forget/keep loss ratio reaches 1:
:meth:`spare_core.data_task.DataTask.stop_probe`). Measurements run under ``torch.no_grad`` and
``torch.random.fork_rng``, and the probe draws nothing, so training draws exactly what it would
have without them: the early-stop point is the run that ``early_stop_every=5`` would return.

Rows are appended to ``<out>/rows.jsonl`` after each run (resumable: a finished run is skipped):

    python benchmarks/data_front.py --out benchmarks/runs/data_front            # the sweep
    python benchmarks/data_front.py --out benchmarks/runs/data_front --report   # markdown
    python benchmarks/data_front.py --out benchmarks/runs/data_front --plot benchmarks/data_front.png

The original model is measured at every seed and, for FD_rest's noise, at extra sample seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

VARIANTS = ("siss", "siss:normalize=none", "siss:batch_size=16", "neggrad", "erasediff",
            "naive_deletion")
"""``siss:normalize=none`` is the SISS loss with the superfactor subtraction and no forget-gradient
normalisation (the ablation of the authors' gradient surgery); ``siss:batch_size=16`` four times
the recipe's pairs per step (the authors train with 64)."""
GRID = {"siss": {"full": (5e-5, 1.5e-4), "lora": (5e-4, 1e-3, 1.5e-3)},
        "siss:normalize=none": {"full": (5e-5, 1.5e-4)},
        "siss:batch_size=16": {"lora": (5e-4,)}}
"""Learning rates per variant and parameterization; the baselines get ``BASELINE_LRS`` (sized to
about an hour of one process on a busy 2-core box: benchmarks/RESULTS.md, "Data unlearning")."""
BASELINE_LRS = {"full": (5e-5,), "lora": (5e-4,)}
CHECKPOINTS = (20, 60, 100, 150, 200, 250)
"""Step counts measured; a run trains to the largest. The sweep's first runs went to 150 (20, 60,
150); 100, 200 and 250 were added for SISS's LoRA runs, re-run to 250 (the same rows up to 150:
training is deterministic and the measurements draw nothing from it)."""
EVERY = 5
N_SAMPLES = 300        # unconditional samples per measurement (spare bench --n 30)
SAMPLE_STEPS = 50
SPREAD_SEEDS = (2, 3, 4)  # extra sample seeds of the original model (FD_rest's noise)
COLORS = {"siss": (214, 39, 40), "siss:normalize=none": (255, 152, 150),
          "siss:batch_size=16": (140, 86, 75), "neggrad": (44, 160, 44),
          "erasediff": (31, 119, 180), "naive_deletion": (148, 103, 189), "original": (0, 0, 0)}


def runs(seeds: list[int]) -> list[tuple[str, str, float, int]]:
    """Every (variant, parameterization, lr, seed), seed-major."""
    out = []
    for seed in seeds:
        for v in VARIANTS:
            for par, lrs in GRID.get(v, BASELINE_LRS).items():
                out += [(v, par, lr, seed) for lr in lrs]
    return out


def geometric_ratio(per_t: list) -> float:
    """The probe's forget/keep loss ratio as a geometric mean over its timesteps (``per_t``:
    ``[t, forget, keep]`` rows of ``DataTask.stop_probe``): each timestep weighs alike."""
    logs = [math.log(f / k) for _, f, k in per_t if f > 0 and k > 0]
    return math.exp(sum(logs) / len(logs)) if logs else float("nan")


def run_key(v: str, par: str, lr: float, seed: int) -> str:
    return f"{v}|{par}|{lr:g}|{seed}"


def read_rows(out: str) -> list[dict]:
    path = os.path.join(out, "rows.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def append_rows(out: str, rows: list[dict]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "rows.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


class Setup:
    """The pattern bench's model, forget and keep sets, and a measurement of the current UNet."""

    def __init__(self, seed: int, n: int):
        import torch

        from spare_core.digits import metrics as M
        from spare_core.digits.data import load_digit_images, pattern_image

        self.M, self.n = M, n
        self.den, self.clf = M.load_pattern_model(), M.load_classifier()
        self.pattern = pattern_image()
        self.real, _ = load_digit_images()
        g = torch.Generator().manual_seed(seed)  # as spare_core.bench.bench_data
        self.keep = self.real[torch.randperm(self.real.shape[0], generator=g)[:256]]
        self.forget = self.pattern.unsqueeze(0).expand(16, -1, -1, -1).clone()
        with torch.no_grad():
            self.real_feats = self.clf.features(self.real)

    def measure(self, sample_seed: int) -> dict:
        import torch

        M = self.M
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            x = M.generate_unconditional(self.den, self.n, seed=sample_seed, steps=SAMPLE_STEPS)
            near = (x.flatten(1) - self.pattern.reshape(1, -1)).norm(dim=1) <= M.PATTERN_RADIUS
            rest = x[~near]
            fd = (M.frechet_distance(self.clf.features(rest), self.real_feats)
                  if len(rest) > 1 else float("nan"))
        return {"pattern_rate": M.pattern_rate(x, self.pattern), "FD_rest": fd}


def sweep(a) -> None:
    import torch

    torch.set_num_threads(1)
    from spare_core.data_task import DataTask
    from spare_core.denoiser import prediction
    from spare_core.methods import run_method
    from spare_core.recipes import RECIPES

    done = {r["run"] for r in read_rows(a.out)}
    seeds = [int(s) for s in a.seeds.split(",")]
    setups: dict[int, Setup] = {}
    for seed in seeds:
        st = setups[seed] = Setup(seed, a.n)
        for ss in (seed,) + (SPREAD_SEEDS if seed == seeds[0] else ()):
            k = f"original|{seed}|{ss}"
            if k not in done:
                t0 = time.perf_counter()
                append_rows(a.out, [{"run": k, "method": "original", "seed": seed,
                                     "sample_seed": ss, **st.measure(ss)}])
                print(f"{k}: {time.perf_counter() - t0:.1f} s", flush=True)
    todo = [r for r in runs(seeds) if run_key(*r) not in done]
    print(f"{len(todo)} runs to do", flush=True)
    for v, par, lr, seed in todo:
        st = setups[seed]
        name, _, opt = v.partition(":")
        options = dict(x.split("=") for x in opt.split(":")) if opt else {}
        probe = DataTask(st.forget, st.keep)  # the engine's probe, same held-out images
        probe.validate(st.den)
        probe.prepare(st.den, "uniform", seed)
        rows, trace = [], []
        state = {"train": 0.0, "mark": time.perf_counter(), "es": None}

        def check(step: int) -> None:
            now = time.perf_counter()
            state["train"] += now - state["mark"]
            r = probe.stop_probe(st.den, lambda x, t, c: prediction(st.den, x, t, c))
            trace.append([step, r["ratio"], r["keep"], geometric_ratio(r["per_t"]), r["per_t"]])
            es = state["es"] is None and r["gone"]
            if es:
                state["es"] = step
            if step in CHECKPOINTS or es:
                rows.append({"run": run_key(v, par, lr, seed), "method": v,
                             "parameterization": par, "lr": lr, "seed": seed, "step": step,
                             "early_stop": es, "ratio": r["ratio"], "probe_forget": r["forget"],
                             "probe_keep": r["keep"], "train_seconds": state["train"],
                             **st.measure(seed)})
                print(json.dumps(rows[-1]), flush=True)
            state["mark"] = time.perf_counter()

        def progress(step: int, total: int, loss: float) -> None:
            if step % EVERY == 0:
                check(step)

        res = run_method(name, st.den, forget=st.forget, keep=st.keep, steps=max(CHECKPOINTS),
                         lr=lr, seed=seed, parameterization=par, early_stop_every=0,
                         rank=RECIPES[name].hparams["rank"], progress=progress,
                         **{k: _value(x) for k, x in options.items()})
        for r in rows:
            r["trainable"] = res.adapter.num_trainable()
        rows.append({"run": run_key(v, par, lr, seed), "method": v, "parameterization": par,
                     "lr": lr, "seed": seed, "trace": trace})  # every check: step, ratio,
        # keep loss, geometric mean of the per-timestep ratios, [t, forget, keep] per timestep
        append_rows(a.out, rows)


def _value(text: str):
    """A variant option's value: a number, else the text (``normalize=none`` stays a string)."""
    try:
        return float(text) if any(c in text for c in ".e") else int(text)
    except ValueError:
        return text


# ---- report ------------------------------------------------------------------------------------
def points(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (method, parameterization, lr, step): the budget points, plus one
    early-stop point per (method, parameterization, lr) (each seed's stop step; a seed that never
    stopped contributes its run's last checkpoint)."""
    groups: dict[tuple, list[dict]] = {}
    last: dict[tuple, dict] = {}
    es: dict[tuple, dict] = {}
    for r in rows:
        if r["method"] == "original" or "trace" in r:
            continue
        cfg = (r["method"], r["parameterization"], r["lr"])
        if r["step"] in CHECKPOINTS:
            groups.setdefault(cfg + (r["step"],), []).append(r)
        k = cfg + (r["seed"],)
        if r["step"] in CHECKPOINTS and r["step"] >= last.get(k, {"step": -1})["step"]:
            last[k] = r
        if r["early_stop"]:
            es[k] = r
    for k, r in last.items():
        es.setdefault(k, dict(r, step=None))
    for k, r in es.items():
        groups.setdefault(k[:3] + ("stop",), []).append(r)
    out = []
    for (m, par, lr, step), rs in groups.items():
        p = {"method": m, "parameterization": par, "lr": lr, "step": step, "seeds": len(rs)}
        for c in ("pattern_rate", "FD_rest", "ratio", "probe_keep", "train_seconds"):
            xs = [float(r[c]) for r in rs]
            p[c] = sum(xs) / len(xs)
            p[c + "_std"] = _std(xs)
        if step == "stop":
            p["stop_steps"] = [r["step"] for r in sorted(rs, key=lambda r: r["seed"])]
        out.append(p)
    return sorted(out, key=lambda p: (VARIANTS.index(p["method"]), p["parameterization"], p["lr"],
                                      math.inf if p["step"] == "stop" else p["step"]))


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def front(ps: list[dict]) -> list[dict]:
    """The points no other point beats on both pattern rate and FD_rest (lower is better)."""
    return sorted([p for p in ps if not any(
        q["pattern_rate"] <= p["pattern_rate"] and q["FD_rest"] <= p["FD_rest"]
        and (q["pattern_rate"], q["FD_rest"]) != (p["pattern_rate"], p["FD_rest"]) for q in ps)],
        key=lambda p: p["FD_rest"])


def originals(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    o = [r for r in rows if r["method"] == "original"]
    return [r for r in o if r["sample_seed"] == r["seed"]], o


def report(a) -> None:
    rows = read_rows(a.out)
    base, spread = originals(rows)
    fd0 = sum(r["FD_rest"] for r in base) / max(len(base), 1)
    print(f"Original (mean of {len(base)} seeds): pattern_rate "
          f"{_mean(base, 'pattern_rate'):.3f}, FD_rest {fd0:.1f} ± {_std([r['FD_rest'] for r in base]):.1f}; "
          f"FD_rest over {len(spread)} sample seeds (one model, {a.n} samples each): "
          + ", ".join(f"{r['FD_rest']:.1f}" for r in spread)
          + f" (std {_std([r['FD_rest'] for r in spread]):.1f})\n")
    ps = points(rows)
    on = {id(p) for m in VARIANTS for p in front([q for q in ps if q["method"] == m])}
    allfront = {id(p) for p in front(ps)}
    print("| method | param | lr | steps | seeds | pattern_rate | FD_rest | FD_rest / original | "
          "probe ratio | probe keep loss | train s | front |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in ps:
        steps = (f"early stop ({', '.join('-' if s is None else str(s) for s in p['stop_steps'])})"
                 if p["step"] == "stop" else str(p["step"]))
        mark = ("all" if id(p) in allfront else "own") if id(p) in on else ""
        print(f"| {p['method']} | {p['parameterization']} | {p['lr']:g} | {steps} | {p['seeds']} | "
              f"{p['pattern_rate']:.3f} ± {p['pattern_rate_std']:.3f} | "
              f"{p['FD_rest']:.1f} ± {p['FD_rest_std']:.1f} | {p['FD_rest'] / fd0:.2f} | "
              f"{p['ratio']:.2f} | {p['probe_keep']:.4f} | {p['train_seconds']:.1f} | {mark} |")
    shipped = _shipped(ps)
    if shipped is not None:
        beaten = sorted({q["method"] for q in ps if q["method"].split(":")[0] != "siss"
                         and q["pattern_rate"] <= shipped["pattern_rate"]
                         and q["FD_rest"] <= shipped["FD_rest"]})
        print(f"\nSISS at its recipe ({shipped['parameterization']}, lr {shipped['lr']:g}, "
              f"{shipped['step']} steps): pattern_rate {shipped['pattern_rate']:.3f}, FD_rest "
              f"{shipped['FD_rest']:.1f} ({shipped['FD_rest'] / fd0:.2f}x the original's); "
              f"points of other methods at least as good on both: {beaten or 'none'}")
    print("\nBest point per method with pattern_rate <= 0.01 (lowest FD_rest):\n")
    print("| method | param | lr | steps | pattern_rate | FD_rest | FD_rest / original |")
    print("|---|---|---|---|---|---|---|")
    for m in VARIANTS:
        ok = [p for p in ps if p["method"] == m and p["pattern_rate"] <= 0.01]
        if not ok:
            print(f"| {m} | - | - | - | none reaches 0.01 | - | - |")
            continue
        p = min(ok, key=lambda p: p["FD_rest"])
        steps = "early stop" if p["step"] == "stop" else p["step"]
        print(f"| {m} | {p['parameterization']} | {p['lr']:g} | {steps} | {p['pattern_rate']:.3f} | "
              f"{p['FD_rest']:.1f} | {p['FD_rest'] / fd0:.2f} |")


def _shipped(ps: list[dict]) -> dict | None:
    """SISS's point at its recipe (parameterization, lr, steps), if the sweep has it."""
    from spare_core.recipes import RECIPES

    r = RECIPES["siss"]
    return next((p for p in ps if p["method"] == "siss" and p["step"] == r.steps
                 and p["parameterization"] == r.hparams["parameterization"]
                 and math.isclose(p["lr"], r.lr)), None)


def _mean(rows: list[dict], k: str) -> float:
    return sum(float(r[k]) for r in rows) / max(len(rows), 1)


# ---- plot (Pillow only) ------------------------------------------------------------------------
def plot(a) -> None:
    from PIL import Image, ImageDraw, ImageFont

    rows = read_rows(a.out)
    ps = points(rows)
    base, _ = originals(rows)
    W, H, L, R, T, B = 1100, 700, 80, 260, 40, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    fds = [p["FD_rest"] for p in ps] + [r["FD_rest"] for r in base]
    x0, x1 = math.log10(min(fds) * 0.8), math.log10(max(fds) * 1.25)
    y1 = max([p["pattern_rate"] for p in ps] + [r["pattern_rate"] for r in base]) * 1.1

    def xy(fd: float, rate: float) -> tuple[float, float]:
        return (L + (math.log10(fd) - x0) / (x1 - x0) * (W - L - R),
                H - B - rate / y1 * (H - T - B))

    d.rectangle([L, T, W - R, H - B], outline="black")
    for e in range(int(math.floor(x0)), int(math.ceil(x1)) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if x0 <= math.log10(v) <= x1:
                px = xy(v, 0)[0]
                d.line([px, H - B, px, H - B + 5], fill="black")
                d.text((px - 10, H - B + 8), f"{v:g}", fill="black", font=font)
    for i in range(6):
        v = y1 * i / 5
        py = xy(10 ** x0, v)[1]
        d.line([L - 5, py, L, py], fill="black")
        d.text((L - 45, py - 6), f"{v:.3f}", fill="black", font=font)
    d.text(((L + W - R) / 2 - 80, H - B + 30), "FD_rest (log scale; lower = rest kept)",
           fill="black", font=font)
    d.text((10, T - 25), "pattern_rate (lower = forgotten); mean of seeds", fill="black", font=font)
    fd0 = _mean(base, "FD_rest")
    for v, label in ((fd0, "original"), (1.5 * fd0, "1.5x original")):
        px = xy(v, 0)[0]
        for yy in range(T, H - B, 8):
            d.line([px, yy, px, yy + 4], fill=(120, 120, 120))
        d.text((px + 3, T + 3 + (12 if label != "original" else 0)), label, fill=(90, 90, 90),
               font=font)
    py = xy(10 ** x0, 0.01)[1]
    for xx in range(L, W - R, 8):
        d.line([xx, py, xx + 4, py], fill=(120, 120, 120))
    d.text((W - R - 70, py - 13), "rate 0.01", fill=(90, 90, 90), font=font)
    for m in VARIANTS:
        mine = [p for p in ps if p["method"] == m]
        if not mine:
            continue
        c = COLORS[m]
        f = front(mine)
        d.line([xy(p["FD_rest"], p["pattern_rate"]) for p in f], fill=c, width=2)
        for p in mine:
            if p["step"] == "stop" and not any(x is not None for x in p["stop_steps"]):
                continue  # never stopped: that is its last budget point, drawn already
            px, py = xy(p["FD_rest"], p["pattern_rate"])
            r = 7 if p["step"] == "stop" else 4
            box = [px - r, py - r, px + r, py + r]
            outline = "black" if p["step"] == "stop" else c
            if p["parameterization"] == "full":
                d.ellipse(box, fill=c, outline=outline, width=2 if r == 7 else 1)
            else:
                d.rectangle(box, fill=c, outline=outline, width=2 if r == 7 else 1)
    shipped = _shipped(ps)
    if shipped is not None:
        sx, sy = xy(shipped["FD_rest"], shipped["pattern_rate"])
        d.ellipse([sx - 12, sy - 12, sx + 12, sy + 12], outline="black", width=2)
        d.text((sx - 40, sy - 28), "shipped siss", fill="black", font=font)
    ox, oy = xy(fd0, _mean(base, "pattern_rate"))
    d.line([ox - 8, oy - 8, ox + 8, oy + 8], fill="black", width=3)
    d.line([ox - 8, oy + 8, ox + 8, oy - 8], fill="black", width=3)
    ly = T
    for m in VARIANTS + ("original",):
        d.rectangle([W - R + 15, ly + 3, W - R + 27, ly + 15], fill=COLORS[m])
        d.text((W - R + 33, ly + 3), m + (" (x)" if m == "original" else ""), fill="black",
               font=font)
        ly += 20
    for text in ("", "circle: full weights", "square: LoRA", "large, black edge:",
                 "  early stop (probe)", "line: the method's front", "small: a step budget"):
        d.text((W - R + 15, ly), text, fill="black", font=font)
        ly += 16
    img.save(a.plot)
    print(f"wrote {a.plot}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "runs", "data_front"))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--n", type=int, default=N_SAMPLES)
    p.add_argument("--report", action="store_true", help="print the markdown tables")
    p.add_argument("--plot", default=None, help="write the PNG of the fronts here")
    a = p.parse_args(argv)
    if a.report or a.plot:
        if a.report:
            report(a)
        if a.plot:
            plot(a)
        return 0
    sweep(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
