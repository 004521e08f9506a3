"""One config of defaults (spare_core.recipes): the API, the CLI, the ComfyUI nodes and the bench
run the same recipe, and the README's defaults table is printed from it. A front end whose
default drifts from the recipe fails here."""
import inspect
import os

import pytest

from spare_core.recipes import RECIPES, defaults_table, pool_guidance

SPARE = RECIPES["spare"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_holds_the_table_printed_from_the_recipes():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert defaults_table() in readme, ("README's defaults table differs from "
                                        "spare_core.recipes.defaults_table(): paste its output")


def test_api_defaults_are_the_recipe(monkeypatch):
    """spare_unlearn's signature and run_method's resolution of every unset setting."""
    from spare_core import methods
    from spare_core.spare import spare_unlearn

    sig = inspect.signature(spare_unlearn).parameters
    want = {**SPARE.run(), "lr": SPARE.lr,
            **{k: SPARE.hparams[k] for k in ("rank", "alpha", "module_fraction", "mask_fraction",
                                             "module_selection", "forget_weight",
                                             "preserve_weight")}}
    assert {k: sig[k].default for k in want} == want
    seen = {}

    def fake_spare(*args, **kw):
        seen.update(dict(zip(["denoiser", "concept", "surrogate", "preserve", "config", "hp",
                              "num_samples", "sample_steps", "guidance"], args)))
        raise StopIteration

    monkeypatch.setattr(methods, "_run_spare", fake_spare)

    class Flux:
        family = "flux"
    with pytest.raises(StopIteration):
        methods.run_method("spare", Flux(), concept="a cat", surrogate="a dog")
    cfg = seen["config"]
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.timestep_sampler) == (
        SPARE.steps, SPARE.lr, SPARE.batch_size, SPARE.timestep_sampler)
    assert (seen["num_samples"], seen["sample_steps"]) == (SPARE.num_samples, SPARE.sample_steps)
    assert seen["guidance"] == pool_guidance("flux") == 1.0
    assert dict(seen["hp"]) == dict(SPARE.hparams)


def test_cli_leaves_every_default_to_the_recipe():
    """Unset flags stay None, so run_method fills them from the recipe; the help prints the
    recipe's values."""
    from spare_core.cli import build_parser, method_hparams

    p = build_parser()
    a = p.parse_args(["unlearn", "--model", "m", "--concept", "a cat"])
    for k in ("steps", "lr", "batch_size", "num_samples", "sample_steps", "guidance",
              "timestep_sampler", "rank", "module_fraction", "module_selection", "mask_fraction"):
        assert getattr(a, k) is None, k
    assert method_hparams(a) == {}
    sub = next(x for x in p._actions if x.dest == "cmd").choices["unlearn"]
    text = " ".join(sub.format_help().split())
    assert f"spare {SPARE.steps})" in text and f"default {SPARE.hparams['module_selection']})" in text
    demo = p.parse_args(["demo"])  # the demo trains the recipe's steps too
    assert demo.steps == SPARE.steps


def test_node_defaults_are_the_recipe(tmp_path):
    from comfy_double import Host, load_pack

    mp = pytest.MonkeyPatch()
    Host(str(tmp_path)).install(mp)
    try:
        nodes = load_pack().NODE_CLASS_MAPPINGS
    finally:
        mp.undo()

    def defaults(name):
        spec = nodes[name].INPUT_TYPES()
        return {k: v[1].get("default") for part in spec.values() for k, v in part.items()
                if len(v) > 1 and isinstance(v[1], dict)}

    train = defaults("SelfDistillUnlearn")
    assert (train["steps"], train["lr"], train["batch_size"], train["pool_size"],
            train["pool_steps"], train["timestep_sampler"]) == (
        SPARE.steps, SPARE.lr, SPARE.batch_size, SPARE.num_samples, SPARE.sample_steps,
        SPARE.timestep_sampler)
    assert train["cfg"] == -1.0  # the family's rule
    init = defaults("SparseLoRAInit")
    assert (init["module_selection"], init["module_fraction"], init["rank"]) == (
        SPARE.hparams["module_selection"], SPARE.hparams["module_fraction"], SPARE.hparams["rank"])
    assert init["alpha"] == 0.0 and init["mask_fraction"] == 1.0  # = rank; dense (recipe: None)
    sal = defaults("ComputeSaliency")
    assert (sal["samples"], sal["sample_steps"], sal["cfg"]) == (
        SPARE.num_samples, SPARE.sample_steps, -1.0)
    uce = defaults("UCEErase")
    assert (uce["preserve_scale"], uce["lamb"]) == (
        RECIPES["uce"].hparams["preserve_scale"], RECIPES["uce"].hparams["lamb"])


@pytest.mark.parametrize("model", ["digits", "canvas"])
def test_bench_adds_only_the_model_rules(model):
    """spare bench and spare demo run the recipe: the embedded model adds its sampler's
    guidance, the x0 clip of pixel space, the step budget and the seed, nothing else."""
    from spare_core.embedded import get

    for method in ("spare", "salun", "esd", "esd_u"):
        assert set(get(model).settings(method, 100, 0)) == {"guidance", "clip_x0", "steps", "seed"}
