"""Data unlearning that stops when the forget set is gone (issue 27): the early stop's probe, its
place in the engine and every front end, the recipes the front picked, and the front script."""
import importlib.util
import json
import os

import pytest
import torch

from spare_core.data_task import PROBE_IMAGES, DataTask
from spare_core.methods import DATA_METHODS, run_method
from spare_core.recipes import RECIPES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sets(seed: int = 0, n_keep: int = 256):
    """The pattern bench's sets: 16 copies of the pattern, ``n_keep`` real digits."""
    from spare_core.digits.data import load_digit_images, pattern_image

    real, _ = load_digit_images()
    g = torch.Generator().manual_seed(seed)
    keep = real[torch.randperm(real.shape[0], generator=g)[:n_keep]]
    return pattern_image().unsqueeze(0).expand(16, -1, -1, -1).clone(), keep


@pytest.fixture(scope="module")
def pattern_model():
    from spare_core.digits import metrics as M

    if not os.path.isdir(os.path.join(M.PATTERN_MODEL, "unet")):
        pytest.skip("pattern model asset not present")
    return M.load_pattern_model()


# ---- the probe -------------------------------------------------------------------------------
def test_probe_holds_out_keep_images_and_sees_the_memorised_pattern(pattern_model):
    from spare_core.denoiser import prediction

    forget, keep = _sets()
    task = DataTask(forget, keep)
    task.validate(pattern_model)
    task.prepare(pattern_model, "uniform", seed=0)
    assert task.probe_held_out and task.keep_set.shape[0] == 256 - PROBE_IMAGES
    held = task._probe[2]
    # no held-out image is among the training keep images
    d = (held.flatten(1)[:, None] - task.keep_set.flatten(1)[None]).abs().sum(-1)
    assert bool((d > 0).all())
    r = task.stop_probe(pattern_model, lambda x, t, c: prediction(pattern_model, x, t, c))
    # measured 0.11: the memorised pattern is denoised ~9x better than unseen digits
    assert r["ratio"] < 0.3 and not r["gone"], r
    # deterministic: the same inputs every call, nothing drawn from the global generator
    state = torch.random.get_rng_state()
    again = task.stop_probe(pattern_model, lambda x, t, c: prediction(pattern_model, x, t, c))
    assert again == r and torch.equal(torch.random.get_rng_state(), state)


def test_a_small_keep_set_is_shared_with_the_probe(den):
    keep = torch.randn(3 * PROBE_IMAGES, *den.latent_shape)
    task = DataTask(torch.randn(2, *den.latent_shape), keep)
    task.prepare(den, "uniform", seed=0)
    assert not task.probe_held_out and torch.equal(task.keep_set, keep)
    with pytest.raises(ValueError, match="stop_ratio"):
        DataTask(keep[:1], keep, stop_ratio=0).validate(den)


# ---- the engine ------------------------------------------------------------------------------
def test_early_stop_ends_a_run_whose_forget_set_is_already_gone():
    """The digits model never saw the pattern: at the recipe's defaults (early stop on) SISS stops
    at the first check, before any step, and returns an adapter that changes nothing."""
    from spare_core.digits import metrics as M

    den = M.load_default_model()
    forget, keep = _sets()
    res = run_method("siss", den, forget=forget, keep=keep, seed=0)
    h = res.history
    assert h["stopped_at"] == 0 and h["loss"] == [], h
    (check,) = h["probe"]
    assert check["step"] == 0 and check["ratio"] > 3  # measured 9.7: the pattern is unseen data
    assert check["keep"] > 0  # the keep loss is reported beside it
    assert all(float(d.abs().max()) == 0.0 for d in res.adapter.merged().values())


def test_early_stop_ends_a_run_on_an_already_unlearned_model(pattern_model):
    """Unlearn until the probe says gone (a fast setting: full weights at lr 1.5e-4, stopped at
    step 65 in the front), merge the adapter, run the recipe again: nothing left to do."""
    import copy

    forget, keep = _sets()
    first = run_method("siss", pattern_model, forget=forget, keep=keep, seed=0, steps=300,
                       lr=1.5e-4, parameterization="full")
    assert first.history["stopped_at"] is not None
    den = copy.deepcopy(pattern_model)
    with torch.no_grad():
        for name, delta in first.adapter.merged().items():
            w = den.unet.get_submodule(name).weight
            w.add_(delta.to(w.dtype))
    again = run_method("siss", den, forget=forget, keep=keep, seed=0)  # same held-out images
    assert again.history["stopped_at"] == 0 and again.history["loss"] == []


def test_early_stop_on_the_pattern_stops_before_the_budget_once_the_pattern_is_gone(pattern_model):
    from spare_core.digits import metrics as M
    from spare_core.digits.data import pattern_image

    forget, keep = _sets()
    budget = 300  # full weights at lr 1.5e-4: the probe fires at step 65 in the front (seed 0)
    res = run_method("siss", pattern_model, forget=forget, keep=keep, steps=budget, seed=0,
                     lr=1.5e-4, parameterization="full")
    h = res.history
    assert h["stopped_at"] is not None and 0 < h["stopped_at"] < budget, h["probe"]
    assert len(h["loss"]) == h["stopped_at"]
    last = h["probe"][-1]
    assert last["step"] == h["stopped_at"] and last["ratio"] >= RECIPES["siss"].hparams["stop_ratio"]
    assert all(c["ratio"] < last["ratio"] for c in h["probe"][:1])  # it started memorised
    with res.adapter.applied(pattern_model.unet):
        x = M.generate_unconditional(pattern_model, 200, seed=0, steps=50)
    assert M.pattern_rate(x, pattern_image()) <= 0.02  # original 0.14


def test_the_stopped_adapter_is_the_one_trained_so_far(pattern_model):
    """The probe draws nothing: a run stopped at step s equals a run of s steps without it."""
    forget, keep = _sets()
    fast = dict(lr=1.5e-4, parameterization="full")  # the probe's ratio passes 0.4 by step ~20
    stopped = run_method("siss", pattern_model, forget=forget, keep=keep, steps=200, seed=1,
                         stop_ratio=0.4, **fast)
    s = stopped.history["stopped_at"]
    assert s is not None and 0 < s < 200
    plain = run_method("siss", pattern_model, forget=forget, keep=keep, steps=s, seed=1,
                       early_stop_every=0, **fast)
    assert "stopped_at" not in plain.history
    a, b = stopped.adapter.state_dict(), plain.adapter.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stop_without_a_keep_set_is_off_and_a_concept_task_refuses_it(den):
    res = run_method("neggrad", den, forget=torch.randn(2, *den.latent_shape), steps=2,
                     batch_size=2)
    assert len(res.history["loss"]) == 2 and "stopped_at" not in res.history
    from spare_core.loop import UnlearnConfig, unlearn
    from spare_core.esd import init_module_adapter
    from spare_core.tasks import ConceptTask

    with pytest.raises(ValueError, match="stop probe"):
        unlearn(den, init_module_adapter(den.unet, None, "lora", 2), ConceptTask("a cat", ""),
                "esd", UnlearnConfig(steps=1, early_stop_every=5))
    with pytest.raises(ValueError, match="early_stop_every"):
        UnlearnConfig(early_stop_every=-1).validate()


# ---- front ends ------------------------------------------------------------------------------
def test_data_recipes_ship_the_early_stop_and_the_table_prints_them():
    from spare_core.recipes import defaults_table

    table = defaults_table()
    for name in DATA_METHODS:
        hp = RECIPES[name].hparams
        assert hp["early_stop_every"] > 0 and hp["stop_ratio"] == 1.0
        assert f"| {name} | {RECIPES[name].steps} |" in table
        assert "early_stop_every" in table


def test_cli_flag_reaches_the_method():
    from spare_core.cli import build_parser, method_hparams

    p = build_parser()
    a = p.parse_args(["unlearn", "--model", "m", "--method", "siss", "--forget-images", "f",
                      "--early-stop-every", "0"])
    assert method_hparams(a) == {"early_stop_every": 0}
    a = p.parse_args(["unlearn", "--model", "m", "--method", "siss", "--forget-images", "f"])
    assert a.early_stop_every is None and method_hparams(a) == {}  # the recipe decides
    sub = next(x for x in p._actions if x.dest == "cmd").choices["unlearn"]
    text = " ".join(sub.format_help().split())
    assert f"siss {RECIPES['siss'].hparams['early_stop_every']})" in text


@pytest.mark.parametrize("argv,match", [
    (["--method", "spare", "--concept", "a cat", "--early-stop-every", "5"], "data methods"),
    (["--method", "siss", "--forget-images", "F", "--early-stop-every", "-1"], ">= 0"),
])
def test_cli_refuses_a_bad_early_stop_before_loading(tmp_path, argv, match, capsys):
    from spare_core.cli import main

    pipe = tmp_path / "pipe"  # only the folder layout: the refusal comes before loading
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (pipe / sub).mkdir(parents=True)
    folder = tmp_path / "F"
    folder.mkdir()
    argv = [str(folder) if x == "F" else x for x in argv]
    assert main(["unlearn", "--model", str(pipe), *argv]) == 2
    assert match in capsys.readouterr().err


def test_data_node_defaults_are_the_recipe(tmp_path):
    from comfy_double import Host, load_pack

    mp = pytest.MonkeyPatch()
    Host(str(tmp_path)).install(mp)
    try:
        node = load_pack().NODE_CLASS_MAPPINGS["DataUnlearn"]
    finally:
        mp.undo()
    spec = node.INPUT_TYPES()
    d = {k: v[1].get("default") for part in spec.values() for k, v in part.items()
         if len(v) > 1 and isinstance(v[1], dict)}
    r = RECIPES[d["method"]]
    assert d["method"] == "siss"
    assert (d["steps"], d["batch_size"], d["parameterization"], d["rank"],
            d["early_stop_every"]) == (r.steps, r.batch_size, r.hparams["parameterization"],
                                       r.hparams["rank"], r.hparams["early_stop_every"])
    assert d["lr"] == 0.0  # = the recipe's


def test_bench_runs_the_data_recipes_unless_told_a_budget(monkeypatch):
    """``spare bench --data-unlearning`` without --steps leaves every method its recipe."""
    from spare_core import bench, methods
    from spare_core.cli import build_parser

    a = build_parser().parse_args(["bench", "--data-unlearning"])
    assert a.steps is None
    seen = {}

    def fake(name, den, **kw):
        seen.update(kw, name=name)
        raise StopIteration

    monkeypatch.setattr(methods, "run_method", fake)
    variants = bench.parse_methods("siss", DATA_METHODS)
    with pytest.raises(StopIteration):
        bench.bench_data(variants, n=2, steps=None, seed=0, sample_steps=2, log=lambda s: None)
    assert seen["name"] == "siss" and seen["steps"] is None


# ---- the front script ------------------------------------------------------------------------
def _front_module():
    spec = importlib.util.spec_from_file_location(
        "data_front", os.path.join(REPO, "benchmarks", "data_front.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows():
    rows = [{"run": f"original|{s}|{s}", "method": "original", "seed": s, "sample_seed": s,
             "pattern_rate": 0.15, "FD_rest": 20.0 + s} for s in (0, 1)]
    for s in (0, 1):
        for step, rate, fd, ratio in ((20, 0.05, 30.0, 0.3), (60, 0.0, 25.0, 1.1),
                                      (150, 0.0, 90.0, 1.5)):
            rows.append({"run": f"siss|full|0.0001|{s}", "method": "siss",
                         "parameterization": "full", "lr": 1e-4, "seed": s, "step": step,
                         "early_stop": step == 60, "ratio": ratio, "probe_forget": 0.1,
                         "probe_keep": 0.07, "train_seconds": step / 10, "pattern_rate": rate,
                         "FD_rest": fd + s})
        rows.append({"run": f"neggrad|full|0.0001|{s}", "method": "neggrad",
                     "parameterization": "full", "lr": 1e-4, "seed": s, "step": 150,
                     "early_stop": False, "ratio": 9.0, "probe_forget": 1.0, "probe_keep": 0.1,
                     "train_seconds": 9.0, "pattern_rate": 0.0, "FD_rest": 500.0})
        rows.append({"run": f"neggrad|full|0.0001|{s}", "method": "neggrad", "trace": []})
    return rows


def test_front_points_fronts_report_and_plot(tmp_path, capsys):
    F = _front_module()
    out = tmp_path / "front"
    out.mkdir()
    with open(out / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in _rows())
    ps = F.points(F.read_rows(str(out)))
    stop = [p for p in ps if p["method"] == "siss" and p["step"] == "stop"]
    assert len(stop) == 1 and stop[0]["stop_steps"] == [60, 60] and stop[0]["FD_rest"] == 25.5
    never = [p for p in ps if p["method"] == "neggrad" and p["step"] == "stop"]
    assert never[0]["stop_steps"] == [None, None]  # never stopped: its last checkpoint
    front = F.front(ps)
    assert {(p["method"], p["step"]) for p in front} >= {("siss", 60), ("siss", "stop")}
    assert not any(p["method"] == "neggrad" for p in front)  # beaten on both axes by siss@60
    assert F.main(["--out", str(out), "--report", "--plot", str(tmp_path / "f.png")]) == 0
    text = capsys.readouterr().out
    assert "| siss | full | 0.0001 | early stop (60, 60) | 2 |" in text
    assert "FD_rest 20.5" in text
    from PIL import Image
    with Image.open(tmp_path / "f.png") as im:
        assert im.size == (1100, 700)


def test_front_resumes_finished_runs():
    F = _front_module()
    keys = [F.run_key(*r) for r in F.runs([0, 1])]
    assert len(keys) == len(set(keys))
    assert all(k.split("|")[0] in F.VARIANTS for k in keys)
    assert not any(k.startswith("siss:normalize=none|lora") for k in keys)
