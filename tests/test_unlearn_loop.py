"""SPARE end to end on a tiny model: the concept moves to the surrogate, the rest stays put, the
input model is never written, and bad input is refused before any work."""
import math

import pytest
import torch

from conftest import assert_state_equal, unet_state
from spare_core import (ConceptSampler, ConceptTask, NonFiniteLoss, UnlearnCancelled,
                        UnlearnConfig, init_sparse_lora, spare_unlearn, unlearn)
from spare_core.objectives import SelfDistill
from spare_core.saliency import adaptable_modules

CONCEPT, SURROGATE, KEEP = "a cat", "a dog", ["green hills", "the ocean"]
FAST = dict(num_samples=8, sample_steps=8, steps=60, lr=3e-3, batch_size=4)


def _probe(den, prompt, seed=5, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *den.latent_shape, generator=g)
    t = torch.linspace(50, 950, n).long()
    with torch.no_grad():
        return den.eps(x, t, den.encode([prompt] * n))


def test_spare_forgets_concept_and_keeps_others(den):
    before_c, before_s = _probe(den, CONCEPT), _probe(den, SURROGATE)
    before_keep = {p: _probe(den, p) for p in KEEP}
    saved = unet_state(den.unet)
    res = spare_unlearn(den, CONCEPT, SURROGATE, KEEP, **FAST)
    assert_state_equal(den.unet, saved)  # the input model is never written
    gap_before = (before_c - before_s).pow(2).mean()
    with res.adapter.applied(den.unet):
        after_c = _probe(den, CONCEPT)
        after_keep = {p: _probe(den, p) for p in KEEP}
    gap_after = (after_c - before_s).pow(2).mean()
    # the concept's prediction moved most of the way to the surrogate's
    assert gap_after < 0.2 * gap_before, (float(gap_after), float(gap_before))
    # preserved prompts drift by a small fraction of the concept edit's size: the edit is local
    for p in KEEP:
        drift = (after_keep[p] - before_keep[p]).pow(2).mean()
        assert drift < 0.1 * gap_before, (p, float(drift), float(gap_before))
    h = res.history
    assert len(h["loss"]) == FAST["steps"] and h["seconds"] > 0
    assert h["trainable_params"] == res.adapter.num_trainable() > 0
    assert math.isclose(sum(h["timestep_probs"]), 1.0, rel_tol=1e-4)


def test_runs_are_deterministic(den):
    kw = dict(FAST, steps=5)
    a = spare_unlearn(den, CONCEPT, SURROGATE, KEEP, **kw).adapter.merged()
    b = spare_unlearn(den, CONCEPT, SURROGATE, KEEP, **kw).adapter.merged()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_concept_sampler_follows_gap_with_floor():
    s = ConceptSampler(torch.tensor([0.0, 0.0, 8.0, 0.0]), 1000, floor=0.2)
    p = s.probs()
    assert float(p.min()) > 0
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-5)
    t = s(20000, torch.Generator().manual_seed(0))
    share = ((t >= 500) & (t < 750)).float().mean()
    assert abs(float(share) - (0.8 + 0.05)) < 0.02
    assert int(t.min()) >= 0 and int(t.max()) <= 999


def _adapter(den):
    return init_sparse_lora(den.unet, list(adaptable_modules(den.unet))[5:9], rank=2)


class _Counting:
    """Wraps a denoiser and counts UNet calls, to prove errors come before any work."""

    def __init__(self, den):
        self.inner, self.calls = den, 0
        self.unet, self.alphas_cumprod, self.latent_shape = den.unet, den.alphas_cumprod, den.latent_shape

    def eps(self, *a):
        self.calls += 1
        return self.inner.eps(*a)

    def encode(self, prompts):
        self.calls += 1
        return self.inner.encode(prompts)


@pytest.mark.parametrize("kwargs,match", [
    (dict(concept=""), "concept prompt is empty"),
    (dict(concept="   "), "concept prompt is empty"),
    (dict(surrogate="A  Cat"), "surrogate equals the concept"),
    (dict(rank=0), "rank"),
    (dict(rank=100_000), "rank"),
    (dict(mask_fraction=0.0), "sparsity"),
    (dict(mask_fraction=1.5), "sparsity"),
    (dict(steps=0), "steps"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr=float("inf")), "lr"),
    (dict(timestep_sampler="cosine"), "timestep sampler"),
    (dict(module_selection="largest"), "module selection"),
])
def test_bad_input_is_refused_before_any_work(den, kwargs, match):
    counting = _Counting(den)
    args = dict(concept=CONCEPT, surrogate=SURROGATE, preserve=KEEP, **FAST)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        spare_unlearn(counting, **args)
    assert counting.calls == 0


def test_nan_loss_stops_with_clear_error_and_model_untouched(den):
    class NaNAfterTwo(SelfDistill):
        calls = 0

        def __call__(self, s, t, b):
            loss, logs = super().__call__(s, t, b)
            NaNAfterTwo.calls += 1
            return (loss * float("nan") if NaNAfterTwo.calls > 2 else loss), logs

    saved = unet_state(den.unet)
    ad = _adapter(den)
    with pytest.raises(NonFiniteLoss, match="lower lr"):
        unlearn(den, ad, ConceptTask(CONCEPT, SURROGATE), NaNAfterTwo(), UnlearnConfig(steps=10))
    assert_state_equal(den.unet, saved)
    assert all(torch.isfinite(p).all() for p in ad.parameters())


def test_cancel_detaches_and_leaves_model_untouched(den):
    saved = unet_state(den.unet)
    ref = _probe(den, CONCEPT)
    seen = []
    with pytest.raises(UnlearnCancelled):
        unlearn(den, _adapter(den), ConceptTask(CONCEPT, SURROGATE), config=UnlearnConfig(steps=50),
                progress=lambda i, n, loss: seen.append(i), should_stop=lambda: len(seen) >= 3)
    assert seen == [1, 2, 3]
    assert_state_equal(den.unet, saved)
    assert torch.equal(_probe(den, CONCEPT), ref)
