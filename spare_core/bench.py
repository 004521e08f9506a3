"""``spare bench``: run unlearning methods on the embedded digits models and print a table.

Concept unlearning (default): for each forget digit, the original model and each method's
adapter generate ``n`` images per digit with the bench sampler (fixed seeds, paired noise);
the committed classifier gives UA (share of the forgotten digit's images not labelled as it),
RA (share of every other digit's images labelled correctly) and FD (Frechet distance of
classifier features to the real digits: the forgotten class, and the mean over the others).

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

# torch, the models and the metrics are imported inside the functions: ``spare bench --help`` and
# argument errors need none of them.
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SAMPLE_STEPS = 50  # == spare_core.digits.metrics.SAMPLE_STEPS (tests/test_demo_bench.py checks)


@dataclass
class Row:
    method: str
    target: str
    values: dict = field(default_factory=dict)


def default_surrogate(forget: int) -> int:
    """The digit a forgotten digit is overwritten with by default: the next one (mod 10)."""
    return (int(forget) + 1) % 10


def run_concept_method(name: str, den, forget: int, *, steps: int, seed: int,
                       surrogate: int | None = None, options: dict | None = None, bars=None):
    """Train method ``name`` to forget digit ``forget`` on ``den`` (``run_method`` with the
    digits settings: :func:`bench_settings`, then ``options`` on top); returns its UnlearnResult.
    ``bars`` (a :class:`~spare_core.progress.PhaseBars`) draws its phases and training."""
    from .digits.data import prompt_for
    from .methods import run_method

    sur = default_surrogate(forget) if surrogate is None else surrogate
    keep = [prompt_for(d) for d in range(10) if d != forget]
    kw = {**bench_settings(name, steps, seed), **(options or {})}
    if bars is not None:
        kw.update(progress=bars.train, phase_progress=bars.phase)
    return run_method(name, den, concept=prompt_for(forget), surrogate=prompt_for(sur),
                      preserve=keep, **kw)


def bench_settings(name: str, steps: int, seed: int) -> dict:
    """``run_method`` settings of concept method ``name`` on the digits model: every method gets
    the same concept pool, sampler, batch and step budget; SPARE also its digits LoRA settings
    (:func:`spare_digits_defaults`); the others keep their own defaults."""
    spare = spare_digits_defaults(steps, seed)
    if name == "spare":
        return spare
    shared = ("num_samples", "sample_steps", "guidance", "clip_x0", "batch_size", "steps", "seed")
    return {k: spare[k] for k in shared}


# what a bench variant (``name:key=value``) may set besides the method's own hyperparameters
RUN_OPTIONS = ("timestep_sampler", "lr", "batch_size")


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
        options = parse_options(items, f"method {name!r} option")
        known = set(METHODS[name].hparams) | set(RUN_OPTIONS)
        bad = sorted(set(options) - known)
        if bad:
            raise ValueError(f"{name} has no option {bad}; its options are {sorted(known)}")
        out.append(MethodVariant(label, name, options))
    return out


def spare_digits_defaults(steps: int, seed: int) -> dict:
    """SPARE settings for the 8x8 digits model (pixel space: predicted x0 clipped to [-1, 1]).

    Measured (forget 3 -> 4, 100 steps, 20 images per digit): module_fraction 0.25 gave UA 0.95
    but only 5% of the images became the surrogate; 0.5 gave UA 1.0, RA 1.0, 100% surrogate."""
    from .digits import metrics as M

    return dict(num_samples=32, sample_steps=25, guidance=M.SAMPLE_GUIDANCE, clip_x0=1.0, rank=4,
                module_fraction=0.5, steps=steps, lr=3e-3, batch_size=8, seed=seed)


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


def digit_metrics(den, classifier, forget: int, n: int, seed: int, steps: int,
                  surrogate: int | None = None, callback=None) -> dict:
    """UA/RA/FD of ``den`` for ``forget``, from ``n`` samples per digit; ``to_surrogate`` is the
    share of the forgotten prompt's images labelled as the surrogate digit (default: the next).
    ``callback(i, n)`` reports the sampler's steps."""
    from .digits import metrics as M

    sur = default_surrogate(forget) if surrogate is None else surrogate
    imgs = M.generate_digits(den, range(10), n, seed=seed, steps=steps, callback=callback)
    preds = M.classify(classifier, imgs)
    fd = M.fd_per_class(classifier, imgs)
    return {"UA": M.unlearning_accuracy(preds[forget], forget),
            "to_surrogate": int((preds[forget] == sur).sum()) / preds[forget].numel(),
            "RA": M.retain_accuracy(preds, forget),
            "FD_forget": fd[forget],
            "FD_retain": sum(v for d, v in fd.items() if d != forget) / 9,
            "per_class_acc": M.per_class_accuracy(preds), "images": imgs}


def _bars(bars, label: str):
    """``bars`` relabelled, or a disabled set of bars when the caller asked for none."""
    from .progress import PhaseBars

    if bars is None:
        return PhaseBars(label, disable=True)
    bars.close()
    bars.label = label
    return bars


def bench_concepts(methods, digits, *, n: int, steps: int, seed: int, sample_steps: int,
                   log=print, bars=None, model: str = "digits") -> list[Row]:
    """Rows of the concept bench on embedded ``model`` (``digits`` or ``digits-dit``);
    ``bars`` (a PhaseBars) draws every phase's progress."""
    from .digits import metrics as M
    from .threads import apply as apply_threads

    den, clf = M.load_default_model(name=model), M.load_classifier()
    apply_threads(den)
    rows = []
    for d in digits:
        b = _bars(bars, f"original, {NAMES[d]}")
        base = digit_metrics(den, clf, d, n, seed, sample_steps, callback=b.sampler("evaluate"))
        b.close()
        rows.append(Row("original", NAMES[d], {k: base[k] for k in CONCEPT_METRICS}))
        log(format_row(rows[-1]))
        for v in methods:
            b = _bars(bars, f"{v.label}, {NAMES[d]}")
            t0 = time.perf_counter()
            res = run_concept_method(v.name, den, d, steps=steps, seed=seed, options=v.options,
                                     bars=b)
            secs = time.perf_counter() - t0
            with res.adapter.applied(den.unet):
                m = digit_metrics(den, clf, d, n, seed, sample_steps,
                                  callback=b.sampler("evaluate after"))
            b.close()
            rows.append(Row(v.label, NAMES[d], {
                **{k: m[k] for k in CONCEPT_METRICS},
                "seconds": secs, "trainable": res.adapter.num_trainable(),
                "adapter_kB": adapter_bytes(res.adapter) / 1024, "peak_rss_MB": peak_rss_mb()}))
            log(format_row(rows[-1]))
    return rows


def bench_data(methods, *, n: int, steps: int, seed: int, sample_steps: int, log=print,
               bars=None) -> list[Row]:
    """Rows of the data-unlearning bench; ``bars`` (a PhaseBars) draws every phase's progress."""
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
        with res.adapter.applied(den.unet):
            m = measure(b, "evaluate after")
        m.update(seconds=secs, trainable=res.adapter.num_trainable(),
                 adapter_kB=adapter_bytes(res.adapter) / 1024, peak_rss_MB=peak_rss_mb())
        rows.append(Row(v.label, "pattern", m))
        log(format_row(rows[-1]))
    return rows


CONCEPT_METRICS = ("UA", "RA", "to_surrogate", "FD_forget", "FD_retain")
COLUMNS = ["UA", "RA", "to_surrogate", "FD_forget", "FD_retain", "pattern_rate", "FD_rest", "seconds", "trainable",
           "adapter_kB", "peak_rss_MB"]


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
    prec = 1 if c in ("seconds", "adapter_kB", "peak_rss_MB") or c.startswith("FD") else 3
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
    p = sub.add_parser("bench", help="compare unlearning methods on the embedded digits models",
                       description="Compare unlearning methods on the embedded digits models at "
                                   "an equal step budget and print a Markdown table.",
                       formatter_class=A.HelpFormatter)
    p.add_argument("--methods", default=None,
                   help=f"comma list; concept: {','.join(CONCEPT_METHODS)} (default spare); data: "
                        f"{','.join(DATA_METHODS)} (default all four); a variant sets options "
                        "after colons, e.g. spare:timestep_sampler=uniform:module_selection=random")
    p.add_argument("--forget", default="3", help="comma list of digits to forget (concept bench)")
    p.add_argument("--data-unlearning", action="store_true", help="run the pattern-model bench")
    p.add_argument("--model", choices=EMBEDDED_NAMES, default="digits",
                   help="embedded model of the concept bench: the SD-structured UNet (DDPM) or "
                        "its flow-matching DiT twin")
    p.add_argument("--n", type=A.positive_int, default=20,
                   help="samples per digit (or unconditional samples x10)")
    p.add_argument("--steps", type=A.positive_int, default=100,
                   help="training steps of every method (equal budget)")
    p.add_argument("--sample-steps", type=A.positive_int, default=SAMPLE_STEPS,
                   help="ancestral DDPM steps of the evaluation sampler")
    p.add_argument("--seeds", default="0",
                   help="comma list of seeds (training and sampling); the table shows mean ± std")
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
    """Every check that needs no torch; sets ``a.seed_list`` and ``a.digits``."""
    allowed = DATA_METHODS if a.data_unlearning else CONCEPT_METHODS
    if a.methods is not None:
        _method_names(a.methods, allowed)
    if a.data_unlearning and a.model != "digits":
        raise ValueError("--data-unlearning runs on the digits pattern model (a UNet); leave "
                         "--model at digits")
    a.seed_list = _parse_seeds(a.seeds)
    a.digits = A.digit_list(a.forget)
    if a.markdown and os.path.isdir(a.markdown):
        raise ValueError(f"--markdown {a.markdown!r} is a folder; give a .md file to append to")


def cmd_bench(a: argparse.Namespace) -> int:
    from .progress import PhaseBars, quiet_libraries

    quiet_libraries()
    with PhaseBars() as bars:
        if a.data_unlearning:
            methods = parse_methods(a.methods or ",".join(DATA_METHODS), DATA_METHODS)
            runs = [bench_data(methods, n=a.n * 10, steps=a.steps, seed=sd,
                               sample_steps=a.sample_steps, bars=bars, log=bars_print(bars))
                    for sd in a.seed_list]
        else:
            methods = parse_methods(a.methods or "spare", CONCEPT_METHODS)
            runs = [bench_concepts(methods, a.digits, n=a.n, steps=a.steps, seed=sd,
                                   sample_steps=a.sample_steps, bars=bars, log=bars_print(bars),
                                   model=a.model)
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
