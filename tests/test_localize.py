"""Localisation (spare_core.localize): each module selection lands on the modules it names, the
objective's saliency is the gradient of SPARE's first step, and budgets size adapters equally."""
import pytest
import torch

from spare_core import compute_saliency
from spare_core.families import IO_LAYERS, adaptable_modules, is_text_projection
from spare_core.localize import (contrast, lora_size, rank_for_budget, ranking_saliency,
                                 select_modules)
from spare_core.recipes import UNET_LOCALIZATIONS
from spare_core.spare import spare_unlearn


def _latents(den, n=4):
    return torch.randn(n, *den.latent_shape, generator=torch.Generator().manual_seed(0))


def test_fixed_selections_land_on_the_modules_they_name(den):
    mods = adaptable_modules(den.unet)
    kv = select_modules(den.unet, "text_kv")
    assert kv and all(".attn2." in n and n.rsplit(".", 1)[1] in ("to_k", "to_v") for n in kv)
    assert len(kv) == sum(".attn2.to_" in n and n[-1] in "kv" for n in mods)
    every = select_modules(den.unet, "all")
    assert every == [n for n in mods if n not in IO_LAYERS] and "conv_in" not in every
    picks = [select_modules(den.unet, "random", fraction=0.3, seed=s) for s in (0, 0, 1)]
    assert picks[0] == picks[1] != picks[2]
    assert len(picks[0]) == round(0.3 * len(every)) and not set(picks[0]) & set(IO_LAYERS)
    with pytest.raises(ValueError, match="module selection must be one of"):
        select_modules(den.unet, "largest")
    with pytest.raises(ValueError, match="ranks modules by saliency"):
        select_modules(den.unet, "saliency")


def test_text_projection_names_in_every_family():
    """The projections that read the text, in diffusers' and ComfyUI's names (UNet, SD3, Flux);
    queries, outputs and the image stream are not among them."""
    yes = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
           "input_blocks.1.1.transformer_blocks.0.attn2.to_v",
           "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.3.attn.add_v_proj",
           "double_blocks.0.txt_attn.qkv", "joint_blocks.0.context_block.attn.qkv"]
    no = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
          "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
          "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_q_proj",
          "double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj",
          "joint_blocks.0.x_block.attn.qkv"]
    assert all(is_text_projection(n) for n in yes)
    assert not any(is_text_projection(n) for n in no)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_text_kv_in_the_other_families(family):
    """SDXL: its cross-attention to_k/to_v; SD3 and Flux: the joint blocks' text-stream key/value
    projections (add_k_proj / add_v_proj), one pair per joint block."""
    from tiny_families import tiny_family_denoiser

    _, den = tiny_family_denoiser(family)
    kv = select_modules(den.unet, "text_kv")
    ends = ("to_k", "to_v") if family == "sdxl" else ("add_k_proj", "add_v_proj")
    assert kv and all(n.rsplit(".", 1)[1] in ends for n in kv)
    if family != "sdxl":
        assert len(kv) == 2 * len(den.unet.transformer_blocks)


def test_objective_saliency_is_the_gradient_of_the_first_self_distillation_step(den):
    """target_prompts: |sum grad| of sum_n MSE(pred(x_t, concept), stopgrad pred(x_t, surrogate))
    on the same draws as the plain map, computed here by hand; and it ranks differently."""
    lat = _latents(den)
    sal = compute_saliency(den, "a cat", lat, target_prompts="a dog", seed=3)
    plain = compute_saliency(den, "a cat", lat, seed=3)
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, den.alphas_cumprod.shape[0], (4,), generator=gen)
    noise = torch.randn(lat.shape, generator=gen)
    a = den.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * lat + (1 - a).sqrt() * noise
    with torch.no_grad():
        target = den.eps(x_t, t, den.encode(["a dog"]).expand(4, -1, -1))
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    w = den.unet.get_submodule(name).weight
    w.requires_grad_(True)
    loss = ((den.eps(x_t, t, den.encode(["a cat"]).expand(4, -1, -1)) - target) ** 2
            ).mean(dim=(1, 2, 3)).sum()
    (g,) = torch.autograd.grad(loss, [w])
    w.requires_grad_(False)
    assert torch.allclose(sal.scores[name], g.abs(), rtol=1e-4, atol=1e-8)
    order = lambda s: s.top_modules(exclude=IO_LAYERS)  # noqa: E731
    assert order(sal) != order(plain)


def test_contrastive_ranks_by_concept_over_preserve(den):
    lat = _latents(den)
    sal = ranking_saliency(den, "contrastive", ["a cat"] * 4, lat, preserve=["the sea"], seed=1)
    c = compute_saliency(den, "a cat", lat, seed=1, element_scores=False)
    p = compute_saliency(den, "the sea", lat, seed=1, element_scores=False)
    want = contrast(c, p).module_scores()
    got = sal.module_scores()
    for n in want:
        assert got[n] == pytest.approx(want[n], rel=1e-6)
    ratio = c.module_scores()["conv_in"] / p.module_scores()["conv_in"]
    assert got["conv_in"] == pytest.approx(ratio, rel=1e-3)
    with pytest.raises(ValueError, match="give at least one preserve prompt"):
        ranking_saliency(den, "contrastive", ["a cat"] * 4, lat, preserve=[])
    with pytest.raises(ValueError, match="cannot mask weight elements"):  # refused up front
        ranking_saliency(den, "contrastive", ["a cat"] * 4, lat[:0], preserve=["the sea"],
                         element_scores=True)


def test_budget_picks_the_closest_size(den):
    for how in ("text_kv", "all"):
        mods = select_modules(den.unet, how)
        for budget in (500, 3000, 20000):
            r = rank_for_budget(den.unet, mods, budget)
            gap = abs(lora_size(den.unet, mods, r) - budget)
            assert all(gap <= abs(lora_size(den.unet, mods, q) - budget) for q in range(1, 40))


@pytest.mark.parametrize("how", UNET_LOCALIZATIONS)
def test_spare_trains_on_the_selection_and_computes_saliency_only_to_rank(den, how, monkeypatch):
    """spare_unlearn with each localisation of the UNet: the adapter sits on select_modules' set
    (the ranked ones on the map it computed), a budget sizes it, and saliency is computed only
    for the rankings (once; contrastive twice: concept and preserved prompts). The text
    encoder's: tests/test_text_encoder_localization.py."""
    import spare_core.saliency as S

    calls = []
    real = S.compute_saliency
    monkeypatch.setattr(S, "compute_saliency", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = spare_unlearn(den, "a cat", "a dog", ["the sea"], num_samples=4, sample_steps=2,
                        steps=2, batch_size=2, module_selection=how, module_fraction=0.3,
                        budget=4000, timestep_sampler="uniform")
    names = res.adapter.names
    assert len(calls) == {"saliency": 1, "objective": 1, "contrastive": 2}.get(how, 0)
    assert (res.saliency is None) == (how in ("text_kv", "random", "all"))
    expect = select_modules(den.unet, how, saliency=res.saliency, fraction=0.3, seed=0)
    assert names == expect
    size = res.adapter.num_trainable()
    best = min(abs(lora_size(den.unet, names, r) - 4000) for r in range(1, 40))
    assert abs(size - 4000) == best
    assert res.adapter.meta["module_selection"] == how
    assert any(float(res.adapter[n].lora_B.detach().abs().sum()) > 0 for n in names)
