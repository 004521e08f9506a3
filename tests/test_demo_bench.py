"""SPARE on the committed digits model: the digit is forgotten, the others kept; the demo and
bench commands write what they promise."""
import json
import os

import pytest

from spare_core.digits import metrics as M

pytestmark = pytest.mark.skipif(not os.path.isdir(M.DEFAULT_MODEL),
                                reason=f"embedded model missing at {M.DEFAULT_MODEL}")

FORGET = 3
SAMPLE_STEPS = 25  # measured: per-class accuracy 1.0 on the committed model at 25 DDPM steps


@pytest.fixture(scope="module")
def spare_run():
    from spare_core.digits.bench import default_surrogate, digit_metrics, spare_digits_defaults
    from spare_core.digits.data import prompt_for
    from spare_core.spare import spare_unlearn

    den, clf = M.load_default_model(), M.load_classifier()
    res = spare_unlearn(den, prompt_for(FORGET), prompt_for(default_surrogate(FORGET)),
                        [prompt_for(d) for d in range(10) if d != FORGET],
                        **dict(spare_digits_defaults(100, 0), num_samples=16))
    with res.adapter.applied(den.unet):
        after = digit_metrics(den, clf, FORGET, 10, 1, SAMPLE_STEPS)
    return res, after


def test_spare_forgets_the_digit_and_keeps_the_rest(spare_run):
    res, after = spare_run
    assert after["UA"] >= 0.9, after["per_class_acc"]
    assert after["RA"] >= 0.85, after["per_class_acc"]
    n_unet = sum(1 for _ in res.adapter.names)
    assert 0 < n_unet and res.adapter.num_trainable() < 0.05 * 878_657


def test_demo_writes_grid_and_metrics(tmp_path, capsys):
    from spare_core.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "3", "--steps", "5",
                 "--sample-steps", str(SAMPLE_STEPS)]) == 0
    out_text, err = capsys.readouterr()
    for phase in ("evaluate before", "SPARE: concept samples", "SPARE: preserve pool 9",
                  "SPARE: timestep gaps", "SPARE: training", "evaluate after"):
        assert phase in err, phase
    assert "SPARE: saliency" not in err  # the recipe's selection ranks no modules
    assert "Loading weights" not in err
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["before"]) == {"UA", "RA", "FD_forget", "FD_retain"} and m["forget"] == FORGET
    assert m["before"]["UA"] <= 0.34  # the original model draws the digit
    from PIL import Image
    assert Image.open(out / "grid.png").size[1] >= 10 * 40
    assert "UA" in out_text
    before = (out / "metrics.json").read_bytes()
    assert main(["demo", "--out", str(out), "--steps", "5"]) == 2  # its files exist
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before


def test_cli_constants_match_the_embedded_models():
    from spare_core import bench
    from spare_core.cli_args import EMBEDDED_NAMES
    from spare_core.embedded import EMBEDDED

    assert bench.SAMPLE_STEPS == M.SAMPLE_STEPS
    assert EMBEDDED_NAMES == tuple(EMBEDDED)
    assert set(M.EMBEDDED_MODELS) < set(EMBEDDED)  # the digits pair, plus canvas
    from spare_core.canvas import metrics as C
    from spare_core.embedded import get
    assert get("digits").sample_steps == M.SAMPLE_STEPS
    assert get("canvas").sample_steps == C.SAMPLE_STEPS


def test_demo_and_bench_run_on_the_flow_twin(tmp_path, capsys):
    """``--model digits-dit``: the same commands on the SD3-transformer twin (Euler sampler);
    the data bench, which needs the pattern UNet, refuses it before loading anything."""
    from spare_core.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--model", "digits-dit", "--out", str(out), "--n", "2", "--steps", "3",
                 "--sample-steps", "10"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "digits-dit" and m["before"]["RA"] >= 0.8
    assert "embedded digits-dit model" in capsys.readouterr().out
    assert main(["bench", "--model", "digits-dit", "--data-unlearning"]) == 2
    assert "leave --model at digits" in capsys.readouterr().err


def test_bench_prints_a_table(tmp_path, capsys):
    from spare_core.cli import main

    md = tmp_path / "results.md"
    args = ["bench", "--methods", "spare", "--forget", "7", "--n", "2", "--steps", "3",
            "--sample-steps", "10", "--markdown", str(md)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| spare | seven |" in out and "| original | seven |" in out
    report = md.read_text()
    assert f"spare {' '.join(args)}" in report and "| spare | seven |" in report


def test_bench_rejects_unknown_method(capsys):
    from spare_core.cli import main

    assert main(["bench", "--methods", "spare,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["bench", "--methods", "spare:sampler=uniform"]) == 2
    assert "spare has no option ['sampler']" in capsys.readouterr().err
    assert main(["bench", "--data-unlearning", "--methods", "siss:lambda_"]) == 2
    assert "takes KEY=VALUE" in capsys.readouterr().err


def test_bench_variants_change_the_run_and_label_the_row(capsys):
    from spare_core.bench import parse_methods, run_concept_method
    from spare_core.cli import main
    from spare_core.methods import CONCEPT_METHODS

    (base, abl) = parse_methods("spare,spare:timestep_sampler=uniform:rank=4", CONCEPT_METHODS)
    assert base.options == {} and abl.name == "spare"
    assert abl.options == {"timestep_sampler": "uniform", "rank": 4}  # the recipe's is 2
    den = M.load_default_model()
    runs = [run_concept_method("spare", den, 7, steps=1, seed=0, options=v.options)
            for v in (base, abl)]
    assert runs[0].history["timestep_probs"] != runs[1].history["timestep_probs"]
    assert runs[1].adapter.num_trainable() > runs[0].adapter.num_trainable()
    assert main(["bench", "--methods", "esd:eta=2.0", "--forget", "7", "--n", "1",
                 "--steps", "2", "--sample-steps", "5"]) == 0
    assert "| esd:eta=2.0 | seven |" in capsys.readouterr().out


def test_mean_over_seeds_gives_mean_and_std():
    from spare_core.bench import Row, markdown_table, mean_over_seeds

    runs = [[Row("spare", "three", {"UA": 1.0, "trainable": 12})],
            [Row("spare", "three", {"UA": 0.8, "trainable": 12})]]
    (row,) = mean_over_seeds(runs)
    assert row.values["UA"] == pytest.approx(0.9) and row.values["UA_std"] == pytest.approx(0.1414, abs=1e-4)
    assert row.values["trainable"] == 12
    assert "| spare | three | 0.900 ± 0.141 | 12 |" in markdown_table([row])
    (single,) = mean_over_seeds(runs[:1])
    assert "UA_std" not in single.values


def test_bench_rejects_bad_seeds(capsys):
    from spare_core.cli import main

    assert main(["bench", "--seeds", "0,x"]) == 2
    assert "--seeds must be a comma list of integers" in capsys.readouterr().err
