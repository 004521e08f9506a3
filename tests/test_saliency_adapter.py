"""Saliency localizes; adapters touch only what they should and come off without a trace."""
import pytest
import torch

from conftest import assert_state_equal, unet_state
from spare_core import (compute_saliency, init_masked_full, init_sparse_lora, load_saliency,
                        save_saliency, sparse_lora_from_saliency)
from spare_core.families.unet import adaptable_modules
from spare_core.sparse_lora import IO_CONVS

PLANT = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"


def _eps(den, prompt="a cat", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *den.latent_shape, generator=g)
    t = torch.tensor([10, 400, 900])
    with torch.no_grad():
        return den.eps(x, t, den.encode([prompt] * 3))


def test_saliency_ranks_planted_layer_first(den):
    # Plant: the text reaches the image only through one cross-attention block (every other
    # block's value and output projections are zero, so no gradient flows through them, and its own
    # output projection is 20x stronger), and the
    # context is 50x larger than any other layer's input: the concept lives in that block.
    block = PLANT.rsplit(".", 1)[0]
    with torch.no_grad():
        for name, m in den.unet.named_modules():
            if name.rsplit(".", 1)[-1] in ("to_v", "0") and ".attn2." in name \
                    and not name.startswith(block + "."):
                m.weight.zero_()
        den.unet.get_submodule(block + ".to_out.0").weight.mul_(20)
    den.text_encoder.final_layer_norm.weight.data.mul_(50)
    lat = torch.randn(6, *den.latent_shape, generator=torch.Generator().manual_seed(0))
    sal = compute_saliency(den, "a cat", lat)
    # conv_in/conv_out carry every denoising gradient; adapters skip them (sparse_lora.IO_CONVS)
    top = sal.top_modules(count=1, reduce="mean", exclude=IO_CONVS)
    assert top == [PLANT], sal.top_modules(count=5)
    # and the same layer in an unplanted block scores far lower
    other = PLANT.replace("up_blocks.1.attentions.0", "up_blocks.1.attentions.1")
    assert sal.module_scores()[PLANT] > 10 * sal.module_scores()[other]
    assert sal.scores[PLANT].shape == adaptable_modules(den.unet)[PLANT].weight.shape


def test_saliency_masks_and_module_scores(den, tmp_path):
    lat = torch.randn(4, *den.latent_shape, generator=torch.Generator().manual_seed(0))
    sal = compute_saliency(den, "a cat", lat)
    total = sal.total_elements()
    kept = sum(int(m.sum()) for m in sal.mask(fraction=0.1).values())
    assert abs(kept - 0.1 * total) <= 0.01 * total
    per_layer = sal.mask(fraction=0.5, scope="layer")
    for n, m in per_layer.items():
        assert 0.45 <= m.float().mean() <= 0.6 or m.numel() < 20, n
    thr = sal.mask(threshold=float(torch.cat([s.flatten() for s in sal.scores.values()]).median()))
    assert abs(sum(int(m.sum()) for m in thr.values()) - total / 2) <= 0.01 * total
    ms = sal.module_scores("max")
    assert set(ms) == set(sal.scores) and all(v >= 0 for v in ms.values())
    with pytest.raises(ValueError, match="fraction"):
        sal.mask(fraction=0.0)
    path = str(tmp_path / "sal.safetensors")
    save_saliency(sal, path)
    back = load_saliency(path)
    assert back.concept == "a cat" and all(torch.equal(back.scores[k], v) for k, v in sal.scores.items())


def test_saliency_leaves_model_untouched(den):
    saved = unet_state(den.unet)
    flags = [p.requires_grad for p in den.unet.parameters()]
    compute_saliency(den, "a cat", torch.randn(2, *den.latent_shape))
    assert_state_equal(den.unet, saved)
    assert flags == [p.requires_grad for p in den.unet.parameters()]


def _randomize(adapter):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_sparse_lora_touches_only_masked_elements_and_modules(den):
    lat = torch.randn(4, *den.latent_shape, generator=torch.Generator().manual_seed(0))
    sal = compute_saliency(den, "a cat", lat)
    adapter = sparse_lora_from_saliency(den.unet, sal, rank=2, module_fraction=0.2, mask_fraction=0.3)
    _randomize(adapter)
    mods = adaptable_modules(den.unet)
    before = {n: m.weight.detach().clone() for n, m in mods.items()}
    masks = sal.mask(fraction=0.3, scope="layer", modules=adapter.names)
    with adapter.applied(den.unet, mode="merged"):  # merged: the weights themselves show the delta
        for n, m in mods.items():
            diff = m.weight.detach() - before[n]
            if n in adapter.names:
                assert torch.all(diff[~masks[n]] == 0), n
                assert diff[masks[n]].abs().sum() > 0, n
            else:
                assert torch.equal(m.weight, before[n]), n
    n_params = sum(p.numel() for p in den.unet.parameters())
    assert adapter.num_trainable() < 0.1 * n_params


def test_random_module_selection_is_a_seeded_control_of_the_same_size(den):
    """The ablation control adapts as many modules as saliency would, drawn at random (seeded),
    never the excluded input/output convolutions."""
    from spare_core.sparse_lora import IO_CONVS

    lat = torch.randn(4, *den.latent_shape, generator=torch.Generator().manual_seed(0))
    sal = compute_saliency(den, "a cat", lat)
    top = sparse_lora_from_saliency(den.unet, sal, rank=2, module_fraction=0.3)
    picks = [sparse_lora_from_saliency(den.unet, sal, rank=2, module_fraction=0.3,
                                       selection="random", seed=s).names for s in (0, 0, 1)]
    assert len(picks[0]) == len(top.names) and picks[0] == picks[1] and picks[0] != picks[2]
    assert set(picks[0]) != set(top.names) and not set(picks[0]) & set(IO_CONVS)
    with pytest.raises(ValueError, match="module selection must be one of"):
        sparse_lora_from_saliency(den.unet, sal, selection="largest")


def test_adapter_removal_restores_bit_identical_outputs(den):
    ref = _eps(den)
    saved = unet_state(den.unet)
    names = list(adaptable_modules(den.unet))[:10]
    adapter = init_sparse_lora(den.unet, names, rank=2)
    _randomize(adapter)
    adapter.attach(den.unet)
    assert not torch.equal(_eps(den), ref)
    with adapter.disabled():
        assert torch.equal(_eps(den), ref)
    adapter.detach(den.unet)
    assert torch.equal(_eps(den), ref)
    assert_state_equal(den.unet, saved)
    assert type(adaptable_modules(den.unet)[names[0]]).__name__ in ("Linear", "Conv2d", "LoRACompatibleConv")


def test_masked_full_delta_changes_only_masked_weights(den):
    mods = adaptable_modules(den.unet)
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(m.weight.shape, generator=g) < 0.5 for n, m in list(mods.items())[:6]}
    adapter = init_masked_full(den.unet, masks)
    _randomize(adapter)
    merged = adapter.merged()
    for n, m in masks.items():
        w = mods[n].weight.detach()
        assert torch.equal((w + merged[n])[~m], w[~m])
        assert (merged[n][m] != 0).all()


@pytest.mark.parametrize("rank", [0, -1, 10_000])
def test_bad_rank(den, rank):
    with pytest.raises(ValueError, match="rank"):
        init_sparse_lora(den.unet, ["conv_in"], rank=rank)


def test_double_attach_is_refused_and_two_adapters_stack(den):
    a = init_sparse_lora(den.unet, ["conv_in"], rank=1)
    b = init_sparse_lora(den.unet, ["conv_in"], rank=1)
    _randomize(a)
    _randomize(b)
    x = torch.randn(2, *den.latent_shape, generator=torch.Generator().manual_seed(0))
    conv = den.unet.conv_in
    with torch.no_grad():
        ref = conv(x)
        with a.applied(den.unet):
            with pytest.raises(RuntimeError, match="already attached"):
                a.attach(den.unet)
            only_a = conv(x)
            with b.applied(den.unet):  # unmerged adapters add up
                both = conv(x)
        with b.applied(den.unet):
            only_b = conv(x)
        torch.testing.assert_close(both - ref, (only_a - ref) + (only_b - ref), atol=1e-5, rtol=1e-4)
        assert torch.equal(conv(x), ref)


def test_lora_on_every_layer_clamps_rank_to_small_layers(den):
    """DataUnlearn's LoRA adapts every Linear/Conv2d; SD's output convolution has 4 output
    channels, so a rank-8 request gives it rank 4 (full rank) instead of failing, while an
    explicit module list still refuses a rank that does not fit."""
    from spare_core.esd import init_module_adapter

    ad = init_module_adapter(den.unet, None, "lora", rank=8)
    assert ad["conv_out"].rank == 4 and ad["conv_out"].scale == 1.0
    assert max(ad[n].rank for n in ad.names) == 8
    with pytest.raises(ValueError, match="rank 8 is larger than layer conv_out"):
        init_sparse_lora(den.unet, ["conv_out"], rank=8)
