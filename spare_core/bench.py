"""``spare bench``: run unlearning methods on the embedded models and print a table.

Concept unlearning (default), on any embedded model (:mod:`spare_core.embedded`): for each
``--forget`` target (or all of them at once with ``--together``), the original model and each
method's adapter generate ``n`` images per prompt with the bench sampler (fixed seeds, paired
noise) and the model's committed classifier scores them. Digits: UA (share of the forgotten
digit's images not labelled as it), RA (share of every other digit's images labelled correctly)
and FD (Frechet distance of classifier features to the real digits: the forgotten class, and the
mean over the others). Canvas: UnlearnCanvas's UA / IRA / CRA, paraphrase UA and FD
(:mod:`spare_core.canvas.metrics`).

Data unlearning (``--data-unlearning``): on the pattern model, the forget set is the memorized
pattern, the keep set the real digits; the metric is the share of unconditional samples within
``PATTERN_RADIUS`` of the pattern, plus FD of the other samples to the real digits.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field

from . import cli_args as A
from .cli_args import CONCEPT_METHODS, DATA_METHODS, EMBEDDED_NAMES
from .recipes import RECIPES

# torch, the models and the metrics are imported inside the functions: ``spare bench --help`` and
# argument errors need none of them.
SAMPLE_STEPS = 50  # == spare_core.digits.metrics.SAMPLE_STEPS (tests/test_demo_bench.py checks)
CONCEPT_STEPS = RECIPES["spare"].steps  # the concept recipes' budget (all 100)


@dataclass
class Row:
    method: str
    target: str
    values: dict = field(default_factory=dict)


def run_concept_method(name: str, den, forget, *, steps: int, seed: int, surrogate=None,
                       options: dict | None = None, bars=None, model: str = "digits"):
    """Train method ``name`` to forget ``forget`` (a target of embedded ``model``, or a list of
    targets erased together) on ``den``: ``run_method`` with the model's request and bench
    settings (:class:`~spare_core.embedded.EmbeddedBench`), then ``options`` on top; returns its
    UnlearnResult. ``bars`` (a :class:`~spare_core.progress.PhaseBars`) draws its phases and
    training."""
    from .embedded import get
    from .methods import run_method

    bench = get(model)
    targets = list(forget) if isinstance(forget, (list, tuple)) else [forget]
    surrogates = None if surrogate is None else (
        list(surrogate) if isinstance(surrogate, (list, tuple)) else [surrogate])
    kw = {**bench.settings(name, steps, seed), **(options or {})}
    if bars is not None:
        kw.update(progress=bars.train, phase_progress=bars.phase)
    return run_method(name, den, **bench.request(targets, surrogates), **kw)


# what a bench variant (``name:key=value``) may set besides the method's own hyperparameters
RUN_OPTIONS = ("timestep_sampler", "lr", "batch_size", "num_samples")


@dataclass(frozen=True)
class MethodVariant:
    """One entry of ``--methods``: a method and the options that make the variant.

    ``spare:timestep_sampler=uniform:module_selection=random`` is SPARE with two options
    changed (ablations); its label in the table is the text as given."""

    label: str
    name: str
    options: dict = field(default_factory=dict)


def parse_methods(text: str, allowed: tuple[str, ...]) -> list[MethodVariant]:
    """``"spare,spare:timestep_sampler=uniform,esd"`` -> variants; ValueError naming the fix for
    an unknown method or option (before any sampling or training)."""
    from .methods import METHODS, parse_options

    out = []
    for label in (x.strip() for x in text.split(",")):
        name, *items = label.split(":")
        if name not in allowed:
            raise ValueError(f"unknown method {name!r}; choose from {list(allowed)}")
        options = parse_options(items, f"method {name!r} option", METHODS[name].hparams)
        known = set(METHODS[name].hparams) | set(RUN_OPTIONS)
        bad = sorted(set(options) - known)
        if bad:
            raise ValueError(f"{name} has no option {bad}; its options are {sorted(known)}")
        out.append(MethodVariant(label, name, options))
    return out


def adapter_bytes(adapter) -> int:
    """Size of the adapter's native .safetensors file."""
    from .files import save_adapter
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "a.safetensors")
        save_adapter(adapter, p)
        return os.path.getsize(p)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bars(bars, label: str):
    """``bars`` relabelled, or a disabled set of bars when the caller asked for none."""
    from .progress import PhaseBars

    if bars is None:
        return PhaseBars(label, disable=True)
    bars.close()
    bars.label = label
    return bars


def bench_concepts(methods, targets, *, n: int, steps: int, seed: int, sample_steps: int,
                   log=print, bars=None, model: str = "digits", together: bool = False,
                   probe=None) -> list[Row]:
    """Rows of the concept bench on embedded ``model`` (:data:`spare_core.embedded.EMBEDDED`):
    one group per target, or one group of all ``targets`` erased in one adapter when
    ``together``; ``bars`` (a PhaseBars) draws every phase's progress. ``probe`` (an
    :class:`~spare_core.probe.attack.AttackConfig`) adds the model's ``probe_keys``: ASR of the
    prompt attack on every method's model (paraphrase UA on the original's row too)."""
    from .embedded import get
    from .threads import apply as apply_threads

    bench = get(model)
    den, clf = bench.load()
    apply_threads(den)
    keys = bench.metric_keys
    rows = []
    for group in ([list(targets)] if together else [[t] for t in targets]):
        label = "+".join(bench.label(t) for t in group)
        b = _bars(bars, f"original, {label}")
        base = bench.measure(den, clf, group, n, seed, sample_steps, callback=b.sampler("evaluate"))
        b.close()
        rows.append(Row("original", label, {k: base[k] for k in keys if k in base}))
        if probe is not None:
            rows[-1].values.update(bench.probe(den, clf, group, base, n, seed, sample_steps))
        log(format_row(rows[-1]))
        for v in methods:
            b = _bars(bars, f"{v.label}, {label}")
            t0 = time.perf_counter()
            res = run_concept_method(v.name, den, group, steps=steps, seed=seed,
                                     options=v.options, bars=b, model=model)
            secs = time.perf_counter() - t0
            with res.adapter.applied_to(den):  # the UNet, or the text encoder it edits
                m = bench.measure(den, clf, group, n, seed, sample_steps,
                                  callback=b.sampler("evaluate after"))
                if probe is not None:
                    b.close()
                    m.update(bench.probe(den, clf, group, base, n, seed, sample_steps, probe))
                    log(f"  {v.label} {label} attack prompts: {m['attack_prompts']}")
            b.close()
            rows.append(Row(v.label, label, {
                **{k: m[k] for k in keys + getattr(bench, "probe_keys", ()) if k in m},
                "seconds": secs, "trainable": res.adapter.num_trainable(),
                "adapter_kB": adapter_bytes(res.adapter) / 1024, "peak_rss_MB": peak_rss_mb()}))
            log(format_row(rows[-1]))
    return rows


def bench_data(methods, *, n: int, steps: int | None, seed: int, sample_steps: int, log=print,
               bars=None) -> list[Row]:
    """Rows of the data-unlearning bench; ``steps`` None runs each method's recipe (its early
    stop included: the ``steps`` column is the count it trained); ``bars`` (a PhaseBars) draws
    every phase's progress."""
    import torch

    from .digits import metrics as M
    from .digits.data import load_digit_images, pattern_image
    from .methods import run_method
    from .threads import apply as apply_threads

    den, clf = M.load_pattern_model(), M.load_classifier()
    apply_threads(den)
    pattern = pattern_image()
    real, _ = load_digit_images()
    g = torch.Generator().manual_seed(seed)
    keep = real[torch.randperm(real.shape[0], generator=g)[:256]]
    forget = pattern.unsqueeze(0).expand(16, -1, -1, -1).clone()

    def measure(b, what: str) -> dict:
        x = M.generate_unconditional(den, n, seed=seed, steps=sample_steps,
                                     callback=b.sampler(what))
        b.close()
        rate = M.pattern_rate(x, pattern)
        near = (x.flatten(1) - pattern.reshape(1, -1)).norm(dim=1) <= M.PATTERN_RADIUS
        rest = x[~near]
        with torch.no_grad():
            fd = M.frechet_distance(clf.features(rest), clf.features(real)) if len(rest) > 1 else float("nan")
        return {"pattern_rate": rate, "FD_rest": fd}

    rows = [Row("original", "pattern", measure(_bars(bars, "original"), "evaluate"))]
    log(format_row(rows[-1]))
    for v in methods:
        b = _bars(bars, v.label)
        t0 = time.perf_counter()
        res = run_method(v.name, den, forget=forget, keep=keep, steps=steps, seed=seed,
                         progress=b.train, phase_progress=b.phase, **v.options)
        secs = time.perf_counter() - t0
        with res.adapter.applied_to(den):
            m = measure(b, "evaluate after")
        m.update(steps=float(len(res.history["loss"])), seconds=secs,  # float: mean ± std
                 trainable=res.adapter.num_trainable(),
                 adapter_kB=adapter_bytes(res.adapter) / 1024, peak_rss_MB=peak_rss_mb())
        rows.append(Row(v.label, "pattern", m))
        log(format_row(rows[-1]))
    return rows


COLUMNS = ["UA", "RA", "IRA", "CRA", "RA_style", "RA_object", "UA_para", "UA_tmpl", "ASR", "ASR_found", "to_surrogate", "FD", "FD_forget", "FD_retain",
           "pattern_rate", "FD_rest", "steps", "seconds", "trainable", "adapter_kB", "peak_rss_MB"]


def mean_over_seeds(runs: list[list[Row]]) -> list[Row]:
    """One row per (method, target): the mean of each value over the seeds' runs, with its
    standard deviation in ``values[k + "_std"]`` when there is more than one seed (counts such as
    trainable parameters get the rounded mean and no deviation)."""
    import torch

    out = []
    for rows in zip(*runs):
        vals = {}
        for k in rows[0].values:
            xs = torch.tensor([float(r.values[k]) for r in rows], dtype=torch.float64)
            mean = xs.mean().item()
            is_count = isinstance(rows[0].values[k], int)
            vals[k] = int(round(mean)) if is_count else mean
            if len(rows) > 1 and not is_count:
                vals[k + "_std"] = xs.std().item()
        out.append(Row(rows[0].method, rows[0].target, vals))
    return out


def _cell(r: Row, c: str) -> str:
    v = r.values[c]
    prec = 1 if c in ("steps", "seconds", "adapter_kB", "peak_rss_MB") or c.startswith("FD") else 3
    txt = f"{v:.{prec}f}" if isinstance(v, float) else str(v)
    if c + "_std" in r.values:
        txt += f" ± {r.values[c + '_std']:.{prec}f}"
    return txt


def format_row(r: Row) -> str:
    cells = [f"{r.method:<15}", f"{r.target:<8}"]
    cells += [f"{c}={_cell(r, c)}" for c in COLUMNS if c in r.values]
    return "  ".join(cells)


def markdown_table(rows: list[Row]) -> str:
    cols = [c for c in COLUMNS if any(c in r.values for r in rows)]
    head = "| method | target | " + " | ".join(cols) + " |"
    sep = "|" + "---|" * (len(cols) + 2)
    lines = [head, sep]
    for r in rows:
        vals = [_cell(r, c) if c in r.values else "" for c in cols]
        lines.append(f"| {r.method} | {r.target} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def add_command(sub) -> None:
    p = sub.add_parser("bench", help="compare unlearning methods on the embedded models",
                       description="Compare unlearning methods on the embedded models (digits, "
                                   "digits-dit, canvas) at an equal step budget and print a "
                                   "Markdown table.",
                       formatter_class=A.HelpFormatter)
    p.add_argument("--methods", default=None,
                   help=f"comma list; concept: {','.join(CONCEPT_METHODS)} (default spare); data: "
                        f"{','.join(DATA_METHODS)} (default all four); a variant sets options "
                        "after colons, e.g. spare:timestep_sampler=uniform:module_selection=random")
    p.add_argument("--forget", default=None,
                   help="comma list of what to forget (concept bench): digits 0..9 (default 3), "
                        "or canvas styles / objects (default stripes; with --together a list of "
                        "both is measured per domain)")
    p.add_argument("--together", action="store_true",
                   help="erase every --forget target at once, in one adapter (multi-concept "
                        "erasure; canvas model)")
    p.add_argument("--data-unlearning", action="store_true", help="run the pattern-model bench")
    p.add_argument("--model", choices=EMBEDDED_NAMES, default="digits",
                   help="embedded model of the concept bench: digits (SD-structured UNet, DDPM), "
                        "its flow-matching DiT twin, or canvas (styles x objects, "
                        "UnlearnCanvas's UA / IRA / CRA)")
    p.add_argument("--n", type=A.positive_int, default=20,
                   help="samples per prompt: per digit, per canvas (style, object) prompt "
                        "(or unconditional samples x10)")
    p.add_argument("--steps", type=A.positive_int, default=None,
                   help="training steps of every method (equal budget; default: the recipes', "
                        "100 for the concept methods; each data method its own, its early stop "
                        "on)")
    p.add_argument("--sample-steps", type=A.positive_int, default=None,
                   help="ancestral DDPM steps of the evaluation sampler (default: the model's, "
                        "50 for digits, 25 for canvas)")
    p.add_argument("--seeds", default="0",
                   help="comma list of seeds (training and sampling); the table shows mean ± std")
    p.add_argument("--probe", action="store_true",
                   help="does the erasure hold: add the attack success rate (ASR) of the "
                        "UnlearnDiffAtk-style prompt attack on every method's model, and "
                        "paraphrase UA (digits, canvas), as columns")
    p.add_argument("--attack-steps", type=A.positive_int, default=40,
                   help="optimisation steps of the prompt attack (with --probe)")
    p.add_argument("--attack-tokens", type=A.positive_int, default=5,
                   help="prefix tokens the attack optimises (with --probe)")
    p.add_argument("--markdown", default=None,
                   help="also append the command and the table to this Markdown file")
    p.set_defaults(func=cmd_bench, check=check_bench_args)


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers, got {text!r}") from None
    if not seeds:
        raise ValueError("--seeds is empty: give at least one seed, e.g. --seeds 0,1,2")
    if any(sd < 0 for sd in seeds):
        raise ValueError(f"--seeds must be >= 0, got {text!r}")
    return seeds


def _method_names(text: str, allowed: tuple[str, ...]) -> None:
    """Unknown method names and malformed ``:key=value`` items, refused before torch loads (the
    option keys are checked by :func:`parse_methods` once the engine is imported)."""
    for label in (x.strip() for x in text.split(",")):
        name, *items = label.split(":")
        if name not in allowed:
            raise ValueError(f"unknown method {name!r}; choose from {list(allowed)}")
        for item in items:
            if not A.is_key_value(item):
                raise ValueError(f"method {name!r} option takes KEY=VALUE, got {item!r}")


def check_bench_args(a: argparse.Namespace) -> None:
    """Every check that needs no torch; sets ``a.seed_list`` and ``a.targets``."""
    allowed = DATA_METHODS if a.data_unlearning else CONCEPT_METHODS
    if a.methods is not None:
        _method_names(a.methods, allowed)
    if a.data_unlearning and a.model != "digits":
        raise ValueError("--data-unlearning runs on the digits pattern model (a UNet); leave "
                         "--model at digits")
    a.seed_list = _parse_seeds(a.seeds)
    default = "stripes" if a.model == "canvas" else "3"
    # one at a time, any target goes; together, a list of styles and objects gets the mixed
    # metrics (retention per domain), but the attack probe measures one domain
    a.targets = A.forget_targets(a.model, a.forget if a.forget is not None else default,
                                 mixed=not (a.together and a.probe))
    if a.together and a.model != "canvas":
        raise ValueError("--together erases several concepts at once on the canvas model; add "
                         "--model canvas")
    if a.probe and (a.data_unlearning or a.model == "digits-dit"):
        raise ValueError("--probe attacks concept erasures on models with one CLIP text "
                         "encoder: use --model digits or --model canvas, without "
                         "--data-unlearning")
    if a.markdown and os.path.isdir(a.markdown):
        raise ValueError(f"--markdown {a.markdown!r} is a folder; give a .md file to append to")


def cmd_bench(a: argparse.Namespace) -> int:
    from .embedded import get
    from .progress import PhaseBars, quiet_libraries

    quiet_libraries()
    with PhaseBars() as bars:
        if a.data_unlearning:
            methods = parse_methods(a.methods or ",".join(DATA_METHODS), DATA_METHODS)
            runs = [bench_data(methods, n=a.n * 10, steps=a.steps, seed=sd,  # None: recipe
                               sample_steps=a.sample_steps or SAMPLE_STEPS, bars=bars, log=bars_print(bars))
                    for sd in a.seed_list]
        else:
            methods = parse_methods(a.methods or "spare", CONCEPT_METHODS)
            from .probe import AttackConfig
            runs = [bench_concepts(methods, a.targets, n=a.n, seed=sd,
                                   steps=a.steps or CONCEPT_STEPS,
                                   sample_steps=a.sample_steps or get(a.model).sample_steps, bars=bars, log=bars_print(bars),
                                   model=a.model, together=a.together,
                                   probe=AttackConfig(tokens=a.attack_tokens, steps=a.attack_steps,
                                                      seed=sd) if a.probe else None)
                    for sd in a.seed_list]
    table = markdown_table(mean_over_seeds(runs))
    print()
    print(table)
    if a.markdown:  # appended (several runs build one report), with the command that made it
        with open(a.markdown, "a") as f:
            f.write(f"\n```\nspare {' '.join(a.argv)}\n```\n\n{table}\n")
    return 0


def bars_print(bars):
    """``print`` that first closes the current bar, so a table row never lands inside a bar."""
    def log(line: str) -> None:
        bars.close()
        print(line, flush=True)
    return log
