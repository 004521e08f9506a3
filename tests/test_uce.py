"""UCE: the closed-form cross-attention edit maps the concept's keys/values to the guide's,
keeps preserved prompts', erases several concepts in one solve, and runs as an engine method."""
from __future__ import annotations

import pytest
import torch

from spare_core import run_method
from spare_core.conditioning import text_sequence
from spare_core.families import adaptable_modules
from spare_core.tasks import concept_pairs
from spare_core.uce import _pair, uce_edit, uce_modules
from tiny_models import tiny_denoiser


@pytest.fixture(scope="module")
def den():
    return tiny_denoiser()


def _kv(den, adapter, names, prompt_or_tokens):
    """Outputs ``{module: [n, out]}`` of the K/V projections on token embeddings."""
    mods = adaptable_modules(den.unet)
    x = prompt_or_tokens.float()
    out = {}
    for n in names:
        w = mods[n].weight.detach().float()
        if adapter is not None:
            w = w + adapter[n].delta().float()
        out[n] = x @ w.T
    return out


def test_edit_maps_concept_to_guide_and_keeps_preserved(den):
    names = uce_modules(den.unet)
    assert names and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in names)
    ad = uce_edit(den, [("a cat", "a dog")], ["a bird", "a red car"])
    assert sorted(ad.names) == sorted(names)
    c, g = _pair(den, "a cat", "a dog")
    keep = text_sequence(den.encode(["a bird"]))[0].double()
    after, want = _kv(den, ad, names, c), _kv(den, None, names, g)
    before = _kv(den, None, names, c)
    kept, orig = _kv(den, ad, names, keep), _kv(den, None, names, keep)
    for n in names:
        moved = (after[n] - want[n]).norm() / (before[n] - want[n]).norm()
        assert moved < 0.3, (n, float(moved))          # the concept now reads as the guide
        drift = (kept[n] - orig[n]).norm() / orig[n].norm()
        assert drift < 0.05, (n, float(drift))          # the preserved prompt barely moves


def test_prediction_on_the_concept_moves_to_the_guide(den):
    ad = uce_edit(den, [("a cat", "a dog")], ["a bird"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *den.latent_shape, generator=g)
    t = torch.tensor([300, 700])
    with torch.no_grad():
        guide = den.eps(x, t, den.encode(["a dog"] * 2))
        before = den.eps(x, t, den.encode(["a cat"] * 2))
        with ad.applied(den.unet):
            after = den.eps(x, t, den.encode(["a cat"] * 2))
    assert (after - guide).norm() < 0.5 * (before - guide).norm()


def test_several_concepts_in_one_solve(den):
    names = uce_modules(den.unet)
    ad = uce_edit(den, [("a cat", "a dog"), ("a red car", "a blue car")], ["a bird"])
    for concept, guide in (("a cat", "a dog"), ("a red car", "a blue car")):
        c, gd = _pair(den, concept, guide)
        after, want = _kv(den, ad, names, c), _kv(den, None, names, gd)
        before = _kv(den, None, names, c)
        for n in names:
            assert (after[n] - want[n]).norm() < 0.5 * (before[n] - want[n]).norm(), (concept, n)


def test_bad_inputs_are_refused_before_any_work(den):
    with pytest.raises(ValueError, match="at least one"):
        uce_edit(den, [])
    with pytest.raises(ValueError, match="guide equals the concept"):
        uce_edit(den, [("a cat", "A cat ")])
    with pytest.raises(ValueError, match="also listed as a preserved"):
        uce_edit(den, [("a cat", "a dog")], ["a cat"])
    from tiny_families import tiny_family_denoiser
    _, flux = tiny_family_denoiser("flux")
    with pytest.raises(ValueError, match="not to SD3/Flux"):
        uce_edit(flux, [("a cat", "a dog")])


def test_uce_as_an_engine_method(den, tmp_path):
    """run_method('uce', ...): several concepts one per line, an adapter that saves, loads and
    exports like any other, and a history without training steps."""
    from spare_core import load_adapter, save_adapter, to_comfy_lora

    res = run_method("uce", den, concept="a cat\na red car", surrogate="a dog\na blue car",
                     preserve=["a bird"], lamb=0.5)
    assert res.history["method"] == "uce" and res.history["loss"] == []
    assert res.adapter.meta["concept"] == "a cat; a red car"
    p = tmp_path / "uce.safetensors"
    save_adapter(res.adapter, str(p), unet=den.unet)
    back = load_adapter(str(p), unet=den.unet)
    for n in res.adapter.names:
        torch.testing.assert_close(back[n].delta(), res.adapter[n].delta())
    assert all(k.endswith(".diff") for k in to_comfy_lora(res.adapter))
    with pytest.raises(ValueError, match="does not take"):
        run_method("uce", den, concept="a cat", surrogate="a dog", eta=1.0)


def test_concept_pairs_parse_one_per_line():
    assert concept_pairs("a cat\n\na dog", "a painting") == [("a cat", "a painting"),
                                                            ("a dog", "a painting")]
    assert concept_pairs("a cat\na dog", "x\ny") == [("a cat", "x"), ("a dog", "y")]
    assert concept_pairs("a cat", "") == [("a cat", "")]
    with pytest.raises(ValueError, match="2 concepts but 3 guides"):
        concept_pairs("a\nb", "x\ny\nz")
