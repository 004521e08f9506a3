"""The embedded canvas model (8 styles x 8 objects, UnlearnCanvas's set-up at toy scale): its
renderer, prompts and tokenizer, the committed classifier and model, the UnlearnCanvas metrics,
and multi-concept erasure, the bench and the demo on it."""
import json
import os

import pytest
import torch

from spare_core.canvas import metrics as M
from spare_core.canvas.data import draw_prompt_index, random_labels, render, render_grid_of_all
from spare_core.canvas.names import (OBJECT_NAMES, OBJECTS, STYLE_NAMES, STYLES, all_words,
                                     training_prompts)


@pytest.fixture(scope="module")
def model():
    return M.load_model()


@pytest.fixture(scope="module")
def clf():
    return M.load_classifier()


def test_renders_are_rgb_in_range_and_seeded():
    x, s, o = render_grid_of_all(2, seed=0)
    assert x.shape == (128, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(render_grid_of_all(2, seed=0)[0], x)
    assert not torch.equal(render_grid_of_all(2, seed=1)[0], x)
    # each (style, object) pair is its own picture: no two pairs' mean images coincide
    means = x.view(64, 2, -1).mean(1)
    assert torch.cdist(means, means).add(torch.eye(64) * 1e3).min() > 0.1


def test_training_prompts_name_their_labels():
    prompts = training_prompts()
    g = torch.Generator().manual_seed(0)
    s, o = random_labels(512, g)
    idx = draw_prompt_index(s, o, g)
    kinds = {"full": 0, "style": 0, "object": 0, "empty": 0}
    for si, oi, i in zip(s.tolist(), o.tolist(), idx.tolist()):
        words = set(prompts[i].replace(",", " ").split())
        has_s = bool(words & set(STYLE_NAMES[STYLES[si]]))
        has_o = bool(words & set(OBJECT_NAMES[OBJECTS[oi]]))
        kinds["full" if has_s and has_o else "style" if has_s else "object" if has_o else "empty"] += 1
        assert not (words & {n for k, v in STYLE_NAMES.items() if k != STYLES[si] for n in v})
        assert not (words & {n for k, v in OBJECT_NAMES.items() if k != OBJECTS[oi] for n in v})
    assert kinds["full"] > 300 and min(kinds.values()) > 20, kinds


def test_committed_tokenizer_gives_every_prompt_its_own_ids(model):
    from spare_core.digits.tokenizer import check_tokenizer

    assert model.latent_shape == (3, 16, 16)
    check_tokenizer(model.tokenizer, all_words(), training_prompts())


def test_committed_classifier_held_out_accuracy(clf):
    from spare_core.canvas.classifier import held_out_accuracy

    style, obj = held_out_accuracy(clf, n=1024)
    assert style >= 0.98 and obj >= 0.98, (style, obj)


def test_eval_json_records_the_model_on_every_prompt():
    """Before any unlearning, at the bench's sampler settings, the classifier recognises style
    and object on at least 9 of 10 of the model's own samples for every one of the 64 prompts,
    in both wordings (the issue's floor), over at least 50 samples per prompt."""
    with open(os.path.join(M.CANVAS_MODEL, "eval.json")) as f:
        ev = json.load(f)
    assert ev["n_per_prompt"] >= 50 and ev["guidance"] == M.SAMPLE_GUIDANCE
    for wording in ("wording0", "wording1"):
        row = ev["steps"][str(M.SAMPLE_STEPS)][wording]
        assert len(row["style_acc"]) == 64 and len(row["object_acc"]) == 64
        assert row["mean_style_acc"] >= 0.98 and row["mean_object_acc"] >= 0.98
        assert row["min_style_acc"] >= 0.9 and row["min_object_acc"] >= 0.9


def test_classifier_reads_loose_dots_as_dots(clf):
    """The classifier was trained with loose dot lattices (dots missing, strays), as the model
    draws them, and reads them as dots (the first classifier, trained on exact lattices, gave
    dots to 0.94 of these)."""
    s = torch.full((256,), STYLES.index("dots"))
    o = torch.arange(256) % len(OBJECTS)
    loose = render(s, o, torch.Generator().manual_seed(3), loose_dots=True)
    assert not torch.equal(loose, render(s, o, torch.Generator().manual_seed(3)))
    ps, po = clf.predict(loose)
    assert (ps == STYLES.index("dots")).float().mean() >= 0.95
    assert (po == o).float().mean() >= 0.95


def test_model_draws_style_and_object_of_fresh_prompts(model, clf):
    pairs = [(STYLES[i], OBJECTS[(3 * i + 1) % 8]) for i in range(8)]
    imgs = M.generate(model, pairs, 3, seed=5, steps=M.SAMPLE_STEPS)
    preds = M.predictions(clf, imgs, pairs, 3)
    style = sum(int((preds[p][0] == STYLES.index(p[0])).sum()) for p in pairs) / 24
    obj = sum(int((preds[p][1] == OBJECTS.index(p[1])).sum()) for p in pairs) / 24
    assert style >= 0.85 and obj >= 0.85, (style, obj)


def _preds(style_of, object_of, pairs, n=2):
    """Predictions where each pair's images get ``style_of(pair)`` / ``object_of(pair)``."""
    return {p: (torch.full((n,), STYLES.index(style_of(p))), torch.full((n,), OBJECTS.index(object_of(p))))
            for p in pairs}


def test_scores_follow_unlearn_canvas_definitions():
    """Erase stripes: its images drawn plain, one other style (dots) misread as checker, objects
    kept everywhere but in neon's images."""
    erased = ["stripes"]
    preds = _preds(lambda p: "plain" if p[0] == "stripes" else "checker" if p[0] == "dots" else p[0],
                   lambda p: "circle" if p[0] == "neon" else p[1], M.PAIRS)
    para_pairs = [p for p in M.PAIRS if p[0] == "stripes"]
    para = _preds(lambda p: "stripes" if p[1] in OBJECTS[:2] else "plain", lambda p: p[1], para_pairs)
    tmpl = _preds(lambda p: "stripes" if p[1] == OBJECTS[0] else "plain", lambda p: p[1], para_pairs)
    got = M.scores(preds, para, erased, surrogate="plain", preds_template=tmpl)
    assert got["UA"] == 1.0 and got["to_surrogate"] == 1.0
    assert got["IRA"] == pytest.approx(48 / 56)           # 6 of the 7 other styles right
    assert got["CRA"] == pytest.approx((56 - 7) / 56)     # neon's 7 non-circles wrong
    assert got["UA_para"] == pytest.approx(6 / 8)         # 2 of 8 objects still striped
    assert got["UA_tmpl"] == pytest.approx(7 / 8)         # 1 of 8 in the other template
    assert "UA_tmpl" not in M.scores(preds, para, erased)
    with pytest.raises(ValueError, match="one domain at a time"):
        M.check_erased(["stripes", "circle"])


def test_scores_of_a_mixed_list_measure_each_concept_in_its_domain_and_retention_per_domain():
    """Stripes and circle erased together: UA counts stripes by style and circle by object;
    RA_style is the style accuracy on the prompts whose style is kept, RA_object the object
    accuracy on the prompts whose object is kept (whatever the other half of the prompt)."""
    erased = ["stripes", "circle"]
    # stripes images come out plain; circles come out as squares; neon-square loses its style
    style = lambda p: "plain" if p[0] == "stripes" else ("plain" if p == ("neon", "square") else p[0])
    obj = lambda p: "square" if p[1] == "circle" else p[1]
    preds = _preds(style, obj, M.PAIRS)
    para_pairs = [p for p in M.PAIRS if p[0] in erased or p[1] in erased]
    para = _preds(lambda p: p[0], obj, para_pairs)     # paraphrased stripes keep their style
    got = M.scores(preds, para, erased)
    assert got["UA"] == 1.0
    assert got["UA_para"] == pytest.approx((0 + 1) / 2)   # stripes 0, circle 1
    assert got["RA_style"] == pytest.approx(55 / 56)      # 7 kept styles x 8 objects, one wrong
    assert got["RA_object"] == pytest.approx(1.0)         # 7 kept objects x 8 styles, all right
    assert "IRA" not in got and "CRA" not in got and "to_surrogate" not in got


def test_spare_erases_two_styles_in_one_adapter_and_keeps_the_rest(model, clf):
    """k = 2: one adapter forgets stripes and dots (UnlearnCanvas's UA at most 0.15 before, at
    least 0.7 after 100 steps, 2 images per prompt) while the other styles and every object stay
    recognisable (IRA and CRA within 0.1)."""
    from spare_core.bench import bench_concepts, parse_methods
    from spare_core.methods import CONCEPT_METHODS

    rows = bench_concepts(parse_methods("spare", CONCEPT_METHODS), ["stripes", "dots"], n=2,
                          steps=100, seed=0, sample_steps=M.SAMPLE_STEPS, model="canvas",
                          together=True, log=lambda *_: None)
    before, after = (r.values for r in rows)
    assert rows[1].target == "stripes+dots"
    assert before["UA"] <= 0.15 and after["UA"] >= 0.7, (before, after)
    assert after["IRA"] >= before["IRA"] - 0.1 and after["CRA"] >= before["CRA"] - 0.1, (before, after)


def test_demo_on_canvas_writes_a_style_grid(tmp_path, capsys):
    from PIL import Image

    from spare_core.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--model", "canvas", "--out", str(out), "--n", "1", "--steps", "2",
                 "--sample-steps", "5"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["forget"] == "stripes" and m["surrogate"] == "plain"
    assert set(m["before"]) == {"UA", "IRA", "CRA", "UA_para", "FD"}
    assert Image.open(out / "grid.png").size[1] >= 8 * 40  # a row per style
    assert "'stripes style' -> 'plain style'" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["bench", "--model", "canvas", "--forget", "stripes,circle", "--together", "--probe"],
     "mixes styles and objects"),
    (["bench", "--model", "canvas", "--forget", "zigzag"], "comma list of styles"),
    (["bench", "--forget", "3,5", "--together"], "add --model canvas"),
    (["demo", "--model", "canvas", "--forget", "stripes", "--surrogate", "circle"],
     "concept of the same domain"),
])
def test_canvas_arguments_are_refused_before_loading(argv, message, capsys):
    from spare_core.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_request_of_a_mixed_list_keeps_both_domains_and_picks_kept_surrogates():
    """A list of styles and objects: each concept turns into a kept concept of its own domain
    (every object of a list into one: the next object that is not erased after the list's
    first), and every concept left of both domains is preserved."""
    from spare_core.canvas.bench import CanvasBench

    b = CanvasBench()
    req = b.request(["stripes", "circle", "square"])
    assert req["concept"].splitlines() == ["stripes style", "a circle", "a square"]
    assert req["surrogate"].splitlines() == ["plain style", "a triangle", "a triangle"]
    assert "a triangle" in req["preserve"] and "plain style" in req["preserve"]
    assert not {"stripes style", "a circle", "a square"} & set(req["preserve"])
    assert len(req["preserve"]) == 16 - 3
    assert b.request(["circle"])["surrogate"] == "a square"   # one object: the next, as before
    objects = b.request(["heart", "circle", "hourglass"])["surrogate"].splitlines()
    assert objects == ["a square"] * 3  # after heart: hourglass and circle are erased too
    with pytest.raises(ValueError, match="its target's domain"):
        b.request(["stripes", "circle"], ["plain", "plain"])


def test_bench_takes_a_mixed_list_together_without_the_probe():
    from spare_core.bench import check_bench_args
    from spare_core.cli import build_parser

    a = build_parser().parse_args(["bench", "--model", "canvas", "--forget", "stripes,circle",
                                   "--together"])
    check_bench_args(a)
    assert a.targets == ["stripes", "circle"]
