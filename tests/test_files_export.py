"""Adapter files round-trip exactly, bad files get clear errors, exports reproduce the update."""
import os

import pytest
import torch

from spare_core import (AdapterFileError, ModelMismatchError, init_masked_full, init_sparse_lora,
                        load_adapter, save_adapter, to_comfy_lora, to_diffusers_lora)
from spare_core.families.unet import adaptable_modules
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


# ---- files hygiene ---------------------------------------------------------------------------

def test_atomic_write_takes_the_umask_without_touching_it(tmp_path, monkeypatch):
    """The kernel applies the umask at creation: the process umask is never read or flipped
    (ComfyUI's server thread may create files meanwhile)."""
    from spare_core.files import atomic_write_json

    old = os.umask(0o027)
    try:
        def no_umask(*_):
            raise AssertionError("os.umask called")
        monkeypatch.setattr(os, "umask", no_umask)
        path = tmp_path / "m.json"
        atomic_write_json({"a": 1}, str(path))
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def _crafted(tmp_path, den, layout_edit, tensors_edit=None, full=True):
    """A saved adapter whose metadata (and optionally tensors) are rewritten."""
    import json

    from safetensors.torch import save_file

    from spare_core.files import read_safetensors

    path = str(tmp_path / "a.safetensors")
    save_adapter(_adapter(den, False, full=full), path, unet=den.unet)
    tensors, meta = read_safetensors(path)
    layout = json.loads(meta["modules"])
    layout_edit(layout)
    meta["modules"] = json.dumps(layout)
    if tensors_edit:
        tensors_edit(tensors)
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad, metadata=meta)
    return bad


def test_load_adapter_checks_claimed_shapes_before_allocating(den, tmp_path, monkeypatch):
    from spare_core.adapter import UnlearnAdapter

    def huge(layout):
        layout[LINEAR]["shape"] = [1 << 20, 1 << 20]  # a sparse full delta would allocate 1 TiB

    path = _crafted(tmp_path, den, huge)

    def never(*_a, **_k):
        raise AssertionError("allocated before checking")
    monkeypatch.setattr(UnlearnAdapter, "from_tensors", classmethod(never))
    monkeypatch.setattr("spare_core.files.read_safetensors", never)
    with pytest.raises(ModelMismatchError, match="different layer sizes"):
        load_adapter(path, unet=den.unet)
    with pytest.raises(AdapterFileError, match="more than any diffusion UNet has"):
        load_adapter(path)


def test_load_adapter_checks_metadata_against_the_file(den, tmp_path):
    def other_rank(layout):
        layout[CONV]["rank"] = 2

    with pytest.raises(AdapterFileError, match="metadata claims"):
        load_adapter(_crafted(tmp_path, den, other_rank, full=False))
    short = _crafted(tmp_path, den, lambda layout: None,
                     lambda t: t.__setitem__(f"{LINEAR}.values", t[f"{LINEAR}.values"][:-1]))
    with pytest.raises(AdapterFileError, match="metadata claims"):
        load_adapter(short)
    with pytest.raises(AdapterFileError, match="malformed metadata"):
        load_adapter(_crafted(tmp_path, den, lambda layout: layout[LINEAR].update(shape=[-1, 4])))


def _lying(tmp_path, den, lie: str) -> str:
    """A saved adapter edited by hand: ``"nan"``/``"inf"`` written into one tensor, or
    ``"strength=<text>"`` as its strength metadata."""
    from safetensors.torch import save_file

    from spare_core.files import read_safetensors

    path = str(tmp_path / "a.safetensors")
    save_adapter(_adapter(den, True), path, unet=den.unet)
    tensors, meta = read_safetensors(path)
    if lie.startswith("strength="):
        meta["strength"] = lie.split("=", 1)[1]
    else:
        tensors[f"{CONV}.lora_B"][0, 0] = float(lie)
    bad = str(tmp_path / "lying.safetensors")
    save_file(tensors, bad, metadata=meta)
    return bad


# (the lie, what the refusal says)
LIES = [("nan", r"holds 1 NaN and 0 inf values.*re-save the adapter"),
        ("inf", r"holds 0 NaN and 1 inf values.*re-save the adapter"),
        ("strength=1e308", r"strength '1e308' is outside \[-10, 10\].*back to 1.0"),
        ("strength=-11", r"strength '-11' is outside \[-10, 10\]"),
        ("strength=inf", r"strength 'inf' is not finite"),
        ("strength=nan", r"strength 'nan' is not finite"),
        ("strength=lots", r"strength 'lots' is not a number")]


@pytest.mark.parametrize("lie,match", LIES)
def test_load_adapter_refuses_files_that_lie(den, tmp_path, monkeypatch, lie, match):
    from spare_core.adapter import UnlearnAdapter

    path = _lying(tmp_path, den, lie)

    def never(*_a, **_k):
        raise AssertionError("an adapter was built from a lying file")
    monkeypatch.setattr(UnlearnAdapter, "from_tensors", classmethod(never))
    for unet in (None, den.unet):
        with pytest.raises(AdapterFileError, match=match) as e:
            load_adapter(path, unet=unet)
        assert "lying.safetensors" in str(e.value)


def test_strength_bounds_are_inclusive_and_saving_refuses_beyond(den, tmp_path):
    from spare_core.files import MAX_FILE_STRENGTH

    ad = _adapter(den, False)
    path = str(tmp_path / "a.safetensors")
    for s in (MAX_FILE_STRENGTH, -MAX_FILE_STRENGTH, 0.0):
        ad.strength = s
        save_adapter(ad, path)
        assert load_adapter(path).strength == s
    for s in (MAX_FILE_STRENGTH * 1.01, float("inf"), float("nan")):
        ad.strength = s
        with pytest.raises(ValueError, match="set adapter.strength = 1.0"):
            save_adapter(ad, str(tmp_path / "b.safetensors"))
    assert not (tmp_path / "b.safetensors").exists()


def test_from_pretrained_refuses_pickle_weights(tmp_path):
    from spare_core import DiffusersDenoiser

    den = tiny_denoiser()
    den.unet.save_pretrained(str(tmp_path / "unet"), safe_serialization=False)
    den.text_encoder.save_pretrained(str(tmp_path / "text_encoder"))
    den.tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    den.scheduler.save_pretrained(str(tmp_path / "scheduler"))
    assert not list((tmp_path / "unet").glob("*.safetensors"))
    with pytest.raises(OSError, match="safetensors"):
        DiffusersDenoiser.from_pretrained(str(tmp_path))


# ---- exports: CompVis names, merged models ---------------------------------------------------

def test_diffusers_export_refuses_compvis_names():
    from spare_core import LoRADelta, UnlearnAdapter

    ad = UnlearnAdapter({"input_blocks.1.1.transformer_blocks.0.attn2.to_k": LoRADelta((8, 8), 2, 2),
                         "middle_block.1.proj_in": LoRADelta((8, 8), 2, 2)})
    with pytest.raises(ValueError, match="to_comfy_lora"):
        to_diffusers_lora(ad)
    assert to_comfy_lora(ad)  # the fix it names works


@pytest.mark.parametrize("masked,full", [(False, False), (True, False), (False, True)])
def test_merge_into_unet_equals_the_adapter_applied(masked, full):
    from spare_core.export import merge_into_unet

    den = tiny_denoiser()
    ad = _adapter(den, masked, full)
    with ad.applied(den.unet):
        want = _out(den)
        with pytest.raises(RuntimeError, match="detach it"):
            merge_into_unet(den.unet, ad)
    merge_into_unet(den.unet, ad)
    torch.testing.assert_close(_out(den), want, atol=1e-6, rtol=1e-5)


def test_save_merged_pipeline_writes_a_loadable_folder(tmp_path):
    from spare_core import DiffusersDenoiser
    from spare_core.export import save_merged_pipeline

    den = tiny_denoiser()
    src = tmp_path / "pipe"
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        getattr(den, part).save_pretrained(str(src / part))
    (src / "model_index.json").write_text("{}")
    ad = _adapter(den, True)
    with ad.applied(den.unet):
        want = _out(den)
    dst = tmp_path / "merged"
    save_merged_pipeline(str(src), ad, str(dst))
    assert (dst / "model_index.json").exists() and (dst / "unet" / "config.json").exists()
    got = _out(DiffusersDenoiser.from_pretrained(str(dst)))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_merged_pipeline(str(src), ad, str(dst))
    save_merged_pipeline(str(src), ad, str(dst), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "pipe"]
