"""Adapter files round-trip exactly, bad files get clear errors, exports reproduce the update."""
import os

import pytest
import torch

from spare_core import (AdapterFileError, ModelMismatchError, init_masked_full, init_sparse_lora,
                        load_adapter, save_adapter, to_comfy_lora, to_diffusers_lora)
from spare_core.saliency import adaptable_modules
from tiny_models import tiny_denoiser

LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "down_blocks.0.resnets.0.conv1"


def _adapter(den, masked: bool, full: bool = False, dense: bool = False):
    mods = adaptable_modules(den.unet)
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(mods[n].weight.shape, generator=g) < (1.1 if dense else 0.3)
             for n in (LINEAR, CONV)}
    if full:
        ad = init_masked_full(den.unet, masks)
    else:
        ad = init_sparse_lora(den.unet, [LINEAR, CONV, "mid_block.resnets.0.conv2"], rank=3, alpha=6,
                              masks=masks if masked else None)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ad.meta.update(method="spare", concept="a cat")
    return ad


def _out(den):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, *den.latent_shape, generator=g)
    with torch.no_grad():
        return den.eps(x, torch.tensor([100, 700]), den.encode(["a cat", "a dog"]))


@pytest.mark.parametrize("masked,full,dense", [(False, False, False), (True, False, False),
                                               (False, True, False), (False, True, True)])
def test_save_load_round_trip_is_exact(den, tmp_path, masked, full, dense):
    ad = _adapter(den, masked, full, dense)
    if dense:  # all-True masks store weight-shaped values and no index
        assert all(ad[n].index is None for n in ad.names)
    path = str(tmp_path / "a.safetensors")
    save_adapter(ad, path, unet=den.unet, surrogate="a dog")
    back = load_adapter(path, unet=den.unet)
    assert back.names == ad.names and back.meta["concept"] == "a cat" and back.meta["surrogate"] == "a dog"
    assert back.meta["base_model_fingerprint"] and back.meta["spare_core_version"]
    m1, m2 = ad.merged(), back.merged()
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    with ad.applied(den.unet):
        a = _out(den)
    with back.applied(den.unet):
        b = _out(den)
    assert torch.equal(a, b)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_truncated_and_corrupt_files(den, tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_adapter(_adapter(den, False), path, unet=den.unet)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="truncated"):
        load_adapter(str(cut))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file at all")
    with pytest.raises(AdapterFileError, match="truncated or not a safetensors"):
        load_adapter(str(junk))
    with pytest.raises(AdapterFileError, match="no file"):
        load_adapter(str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file
    other = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(AdapterFileError, match="not a SPARE adapter"):
        load_adapter(str(other))


def test_adapter_for_a_different_model(den, tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_adapter(_adapter(den, False), path, unet=den.unet)
    other = tiny_denoiser(seed=1)  # same layers, other weights
    with pytest.raises(ModelMismatchError, match="different model"):
        load_adapter(path, unet=other.unet)
    assert load_adapter(path, unet=other.unet, strict=False).names  # explicit override works
    from diffusers import UNet2DConditionModel
    wider = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    with pytest.raises(ModelMismatchError, match="different layer sizes"):
        load_adapter(path, unet=wider)


def test_refuses_non_safetensors_path(den, tmp_path):
    with pytest.raises(ValueError, match=".safetensors"):
        save_adapter(_adapter(den, False), str(tmp_path / "a.pt"))


def _apply_comfy_lora(unet, sd):
    """ComfyUI's LoRA math (comfy/weight_adapter/lora.py): W += up @ down * alpha / rank, or
    W += diff, for each key; reproduced here to check the export without the host."""
    mods = adaptable_modules(unet)
    with torch.no_grad():
        for n, m in mods.items():
            key = "lora_unet_" + n.replace(".", "_")
            if f"{key}.diff" in sd:
                m.weight += sd[f"{key}.diff"]
            elif f"{key}.lora_up.weight" in sd:
                up, down = sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"]
                scale = float(sd[f"{key}.alpha"]) / down.shape[0]
                m.weight += (up.flatten(1) @ down.flatten(1)).reshape(m.weight.shape) * scale


@pytest.mark.parametrize("masked", [False, True])
def test_comfy_lora_export_reproduces_adapter(masked):
    den = tiny_denoiser()
    ad = _adapter(den, masked)
    ad.strength = 0.7
    with ad.applied(den.unet):
        ref = _out(den)
    sd = to_comfy_lora(ad)
    kinds = {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in sd}
    assert ("diff" in kinds) == masked
    _apply_comfy_lora(den.unet, sd)
    assert torch.allclose(_out(den), ref, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_diffusers_lora_export_loads_with_peft(masked):
    den = tiny_denoiser()
    ad = _adapter(den, masked)
    with ad.applied(den.unet):
        ref = _out(den)
    den.unet.load_lora_adapter(to_diffusers_lora(ad), prefix="unet", adapter_name="spare")
    assert torch.allclose(_out(den), ref, atol=1e-4), float((_out(den) - ref).abs().max())
