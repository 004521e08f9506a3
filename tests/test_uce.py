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


# ------------------------------------------------------------------ one method on every backend
def _diffusers_twin(model, clip):
    """A DiffusersDenoiser over copies of the double's UNet, CLIP text encoder and tokenizer:
    the same weights and the same token sequences as the ComfyUI backend reads."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from spare_core import DiffusersDenoiser

    comfy_unet = model.model.diffusion_model
    unet = UNet2DConditionModel(**{k: v for k, v in comfy_unet.config.items()
                                   if not k.startswith("_")})
    unet.load_state_dict(comfy_unet.state_dict())
    te = CLIPTextModel(clip.encoder.config)
    te.load_state_dict(clip.encoder.state_dict())
    tok = getattr(clip.tokenizer, clip.tokenizer.clip).tokenizer
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    return DiffusersDenoiser(unet.eval(), te.eval(), tok, sched)


class _FromStart:
    """A backend that pairs whole sequences from position 0 (what the ComfyUI backend did
    before it could count tokens)."""

    def __init__(self, den):
        self.unet, self.encode = den.unet, den.encode

    def last_word_index(self, prompt):
        return 0


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    """The ComfyUI test double's host, the pack's nodes and bridge, an SD1.x checkpoint."""
    import sys

    from comfy_double import Host, load_pack

    host = Host(str(tmp_path)).install(monkeypatch)
    pack = load_pack()
    model, clip = host.load_checkpoint(seed=0)
    return dict(host=host, nodes=pack.NODE_CLASS_MAPPINGS, model=model, clip=clip,
                bridge=sys.modules[f"{pack.__name__}.nodes.comfy_bridge"])


def test_uce_is_the_same_edit_through_comfyui_and_diffusers(comfy):
    """The UCEErase node on the double's checkpoint and uce_edit on a diffusers denoiser with
    the same weights give the same deltas for a concept and guide of different token counts
    ("a cat": 4 tokens, "a big red dog": 10): both pair from each prompt's last word. Pairing
    from position 0 (the ComfyUI backend's old edit) differs by far more than the tolerance."""
    concept, guide, keep = "a cat", "a big red dog", ["a bird", "a red car"]
    twin = _diffusers_twin(comfy["model"], comfy["clip"])
    assert twin.last_word_index(concept) == 4 and twin.last_word_index(guide) == 10
    (ad,) = comfy["host"].run(comfy["nodes"]["UCEErase"], model=comfy["model"],
                              clip=comfy["clip"], concepts=concept, guides=guide,
                              preserve="\n".join(keep), preserve_scale=1.0, lamb=0.5)
    want = uce_edit(twin, [(concept, guide)], keep, preserve_scale=1.0, lamb=0.5)
    old = uce_edit(_FromStart(twin), [(concept, guide)], keep, preserve_scale=1.0, lamb=0.5)
    assert sorted(ad.names) == sorted(want.names)
    for n in want.names:
        got, ref = ad[n].delta().float(), want[n].delta().float()
        # bit-identical on this CPU; the tolerance leaves room for float32 kernel reorderings
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
        assert (old[n].delta() - ref).abs().max() > 1e-2 * ref.abs().max(), n


def test_comfy_last_word_is_counted_in_the_last_repetition(comfy):
    """A prompt longer than one CLIP chunk makes the run's context two chunks long, every
    one-chunk sequence repeated: the last word is placed in the last repetition, so the pair is
    the same tail as without the long prompt."""
    bridge, model, clip = comfy["bridge"], comfy["model"], comfy["clip"]
    long = " ".join(["a cat"] * 8)  # 32 tokens: chunks of 30 + 2 (and start, end, padding)
    short = bridge.ComfyDenoiser(model, clip, 64, 64, prompts=["a cat", "a big red dog"])
    both = bridge.ComfyDenoiser(model, clip, 64, 64, prompts=["a cat", "a big red dog", long])
    assert short.context_length == 32 and both.context_length == 64
    assert short.last_word_index("a cat") == 4 and both.last_word_index("a cat") == 32 + 4
    assert short.last_word_index("") == 0 and both.last_word_index(long) == 32 + 2
    for a, b in zip(_pair(short, "a cat", "a big red dog"), _pair(both, "a cat", "a big red dog")):
        torch.testing.assert_close(a, b)


def test_sdxl_clip_keys_share_positions(comfy):
    """SDXL's CLIP tokenizes for two encoders (keys ``g`` and ``l``, joined along features):
    both place the last word alike; encoders that disagree are refused naming the fix."""
    host, bridge = comfy["host"], comfy["bridge"]
    model, clip = host.load_family("sdxl", seed=0)
    plain = clip.tokenize

    def two(text, return_word_ids=False, **kw):
        rows = plain(text, return_word_ids, **kw)[clip.key]
        return {"g": rows, "l": rows}

    clip.tokenize = two
    den = bridge.ComfyDenoiser(model, clip, 64, 64, prompts=["a cat", "a big red dog"])
    assert den.last_word_index("a big red dog") == 10
    ad = uce_edit(den, [("a cat", "a big red dog")], ["a bird"])
    assert ad.names and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in ad.names)

    def skewed(text, return_word_ids=False, **kw):
        out = two(text, return_word_ids, **kw)
        out["g"] = [[out["g"][0][0], *out["g"][0]][:len(out["g"][0])]]  # one position later
        return out

    clip.tokenize = skewed
    with pytest.raises(ValueError, match="different positions.*same checkpoint"):
        den.last_word_index("a cat")


def test_a_backend_that_cannot_count_tokens_is_refused_before_encoding(den):
    class NoCount:
        def __init__(self):
            self.unet, self.calls = den.unet, 0

        def encode(self, prompts):
            self.calls += 1
            return den.encode(prompts)

    blind = NoCount()
    with pytest.raises(ValueError, match="last_word_index"):
        uce_edit(blind, [("a cat", "a dog")])
    assert blind.calls == 0


def test_sdxl_diffusers_counts_with_its_tokenizer():
    """SDXLDenoiser.from_pipeline keeps a tokenizer to place the last word (its two encoders
    share positions); one built without a tokenizer is refused, naming the fix."""
    from spare_core import SDXLDenoiser
    from tiny_families import tiny_family_denoiser

    _, sdxl = tiny_family_denoiser("sdxl")
    assert sdxl.last_word_index("a cat") == 4 and sdxl.last_word_index("a big red dog") == 10
    assert uce_edit(sdxl, [("a cat", "a big red dog")], ["a bird"]).names
    blind = SDXLDenoiser(sdxl.unet, sdxl._encode_prompts, sdxl.scheduler)
    with pytest.raises(ValueError, match="SDXLDenoiser: pass tokenizer="):
        uce_edit(blind, [("a cat", "a dog")])
