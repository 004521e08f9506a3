"""The embedded digits model, its classifier and the SPEC 4 metrics (all offline, CPU)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from spare_core.digits import metrics as M  # noqa: E402
from spare_core.digits.data import (PROMPTS, load_digit_images, mixed_training_set,  # noqa: E402
                                    pattern_image, prompt_for, split_indices)


@pytest.fixture(scope="module")
def model():
    return M.load_default_model()


@pytest.fixture(scope="module")
def clf():
    return M.load_classifier()


# ---- assets --------------------------------------------------------------------------------

def test_assets_are_safetensors_only_and_small():
    total = 0
    for root, _, files in os.walk(M.ASSETS):
        for f in files:
            assert not f.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt")), f
            total += os.path.getsize(os.path.join(root, f))
    # four embedded models and two classifiers; the canvas model (16x16 RGB, 1.8 M parameters
    # in float32) is 7 MB of it
    assert total < 20 * 2**20


def test_committed_model_loads_offline(model):
    from spare_core.digits.tokenizer import check_tokenizer

    assert model.latent_shape == (1, 8, 8)
    check_tokenizer(model.tokenizer)
    ctx = model.encode(PROMPTS + [""])
    assert ctx.shape == (11, model.tokenizer.model_max_length, 64)
    assert model.unet.config.cross_attention_dim == 64
    n = sum(p.numel() for p in model.unet.parameters())
    assert 5e5 < n < 2e6


def test_classifier_held_out_accuracy(clf):
    x, y = load_digit_images()
    _, held = split_indices(len(y), 0.2, 0)
    acc = (clf.predict(x[held]) == y[held]).float().mean().item()
    assert acc >= 0.95
    assert clf.features(x[:3]).shape == (3, 64)


def test_bench_sampler_per_class_accuracy(model, clf):
    imgs = M.generate_digits(model, range(10), 10, seed=0)
    assert imgs[3].shape == (10, 1, 8, 8)
    assert imgs[3].min() >= -1 and imgs[3].max() <= 1
    acc = M.per_class_accuracy(M.classify(clf, imgs))
    assert min(acc.values()) >= 0.9, acc


def test_pattern_model_regenerates_pattern():
    den = M.load_pattern_model()
    u = M.generate_unconditional(den, 100, seed=0)
    assert M.pattern_rate(u, pattern_image()) >= 0.03


# ---- data ----------------------------------------------------------------------------------

def test_data_ranges_and_pattern():
    x, y = load_digit_images()
    assert x.shape == (1797, 1, 8, 8) and x.min() == -1 and x.max() == 1
    assert prompt_for(7) == "a handwritten digit seven"
    p = pattern_image()
    assert p.shape == (1, 8, 8) and set(p.unique().tolist()) == {-1.0, 1.0}
    # the pattern is far from every real digit
    assert (x.flatten(1) - p.flatten()).norm(dim=1).min() > 3 * M.PATTERN_RADIUS
    xm, ym = mixed_training_set(40)
    assert len(xm) == 1837 and (ym == -1).sum() == 40 and torch.equal(xm[-1], p)


# ---- metrics on known inputs ---------------------------------------------------------------

def test_unlearning_and_retain_accuracy():
    assert M.unlearning_accuracy(torch.tensor([3, 3, 5, 1]), 3) == 0.5
    assert M.unlearning_accuracy(torch.tensor([0, 0]), 3) == 1.0
    preds = {0: torch.tensor([0, 0, 1, 0]), 1: torch.tensor([1, 1, 1, 1]),
             3: torch.tensor([5, 5, 5, 5])}
    # digits 0 and 1: 7 of 8 correct; digit 3 (forgotten) is left out
    assert M.retain_accuracy(preds, 3) == pytest.approx(7 / 8)
    assert M.retain_accuracy(preds, 1) == pytest.approx(3 / 8)
    assert M.per_class_accuracy(preds) == {0: 0.75, 1: 1.0, 3: 0.0}


def test_frechet_distance_known_values():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 6, generator=g, dtype=torch.float64)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([3.0, 4.0, 0, 0, 0, 0], dtype=torch.float64)
    assert M.frechet_distance(a, a + shift) == pytest.approx(25.0, abs=1e-8)
    # b = 2a: covariances S and 4S, so FD = |mu|^2 + tr(S + 4S - 2*2S) = |mu|^2 + tr(S) (~6 here)
    expected = a.mean(0).pow(2).sum().item() + torch.cov(a.T).trace().item()
    assert M.frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(6.0, abs=0.3)
    # small / degenerate sample counts stay finite and non-negative
    assert M.frechet_distance(a[:1], a[:1] + 1) == pytest.approx(6.0)
    assert 0 <= M.frechet_distance(a[:3], a[3:8]) < float("inf")


def test_pattern_rate_known_values():
    p = pattern_image()
    near = p + 0.2  # L2 distance 0.2 * 8 = 1.6
    far = -p        # L2 distance 16
    s = torch.stack([p, near, far, far])
    assert M.pattern_rate(s, p, radius=2.0) == 0.5
    assert M.pattern_rate(s, p, radius=1.0) == 0.25
    assert M.pattern_rate(s, p[0], radius=20.0) == 1.0
