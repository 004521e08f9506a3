"""The ``text_encoder`` localisation (spare_core.text_encoder): a LoRA on the first block of the
CLIP text encoder, trained by re-encoding the student's prompts while the frozen teacher keeps
the original encodings; files, the ComfyUI / kohya and diffusers exports, and the refusals of
backends without a CLIP text encoder.

The check against the real ComfyUI key map runs when ``COMFYUI_ROOT`` points at a checkout and
this module runs with that ComfyUI's Python (as tests/test_comfy_real.py)::

    COMFYUI_ROOT=/work/comfy/ComfyUI /work/comfy/venv/bin/python -m pytest \
        tests/test_text_encoder_localization.py
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_state_equal, unet_state
from spare_core.adapter import LoRADelta, UnlearnAdapter, init_sparse_lora
from spare_core.export import to_comfy_lora, to_diffusers_lora
from spare_core.files import ModelMismatchError, load_adapter, save_adapter
from spare_core.localize import network_for, select_modules
from spare_core.objectives import SelfDistill
from spare_core.spare import spare_unlearn
from spare_core.tasks import ConceptTask, PoolConfig
from spare_core.text_encoder import (BLOCK_LINEARS, PromptReencoder, check_text_encoder,
                                     text_transformer)
from tiny_models import tiny_denoiser

FIRST = [f"encoder.layers.0.{x}" for x in BLOCK_LINEARS]
# ComfyUI's comfy/lora.py LORA_CLIP_MAP: the kohya names of a CLIP block's linear layers
KOHYA = {"self_attn.q_proj": "self_attn_q_proj", "self_attn.k_proj": "self_attn_k_proj",
         "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj",
         "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2"}
RUN = dict(num_samples=4, sample_steps=2, batch_size=2, timestep_sampler="uniform")


def text_adapter(den, seed: int = 0, scale: float = 0.3) -> UnlearnAdapter:
    """A text-encoder adapter on ``den``'s first CLIP block with a non-zero update (alpha 1 at
    rank 2: scale 1/2, so an export that drops alpha shows)."""
    net = network_for(den, "text_encoder")
    ad = init_sparse_lora(net, select_modules(net, "text_encoder"), rank=2, alpha=1.0,
                          seed=seed, meta={"root": "text_encoder"})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in ad.names:
            ad[n].lora_B.copy_(torch.randn(ad[n].lora_B.shape, generator=g) * scale)
    return ad


def te_state(den):
    return {k: v.detach().clone() for k, v in den.text_encoder.state_dict().items()}


def test_selection_is_the_first_blocks_linear_layers(den):
    net = network_for(den, "text_encoder")
    assert net is text_transformer(den.text_encoder)
    assert select_modules(net, "text_encoder") == FIRST
    with pytest.raises(ValueError, match="give the denoiser's text encoder, not its UNet"):
        select_modules(den.unet, "text_encoder")
    assert network_for(den, "all") is den.unet


def test_budget_sizes_the_text_encoder_lora(den):
    """A budget picks the rank whose LoRA on the six layers comes closest (here 448 per rank:
    4 x (32 + 32) + 2 x (64 + 32)), as for the UNet's selections."""
    from spare_core.localize import lora_size

    res = spare_unlearn(den, "a cat", "a dog", steps=1, module_selection="text_encoder",
                        budget=1000, **RUN)
    net = network_for(den, "text_encoder")
    assert lora_size(net, FIRST, 1) == 448
    assert res.adapter.num_trainable() == 896 and res.adapter.meta["rank"] == "2"


def test_adapter_lands_only_on_the_first_block_and_leaves_weights_untouched(den):
    """Trained through spare_unlearn: the adapter holds the six linear layers of block 0, hooks
    exactly them while applied (no UNet module, no other text-encoder layer), and training
    writes no weight of the UNet or the text encoder."""
    unet0, te0 = unet_state(den.unet), te_state(den)
    res = spare_unlearn(den, "a cat", "a dog", ["the sea"], steps=3, lr=1e-2,
                        module_selection="text_encoder", **RUN)
    ad = res.adapter
    assert ad.names == FIRST and ad.root == "text_encoder" and res.saliency is None
    assert ad.meta["module_selection"] == "text_encoder"
    assert ad.num_trainable() == sum(2 * sum(ad[n].weight_shape) for n in FIRST)
    assert any(float(ad[n].lora_B.abs().sum()) > 0 for n in FIRST)  # it trained
    assert_state_equal(den.unet, unet0)
    assert_state_equal(den.text_encoder, te0)
    net = text_transformer(den.text_encoder)
    with ad.applied_to(den):
        hooked = {n for n, m in net.named_modules() if m._forward_hooks}
        assert hooked == set(FIRST)
        assert not any(m._forward_hooks for m in den.unet.modules())
    assert not any(m._forward_hooks for m in net.modules())  # detached after
    with pytest.raises(ValueError, match="attach it to denoiser.text_encoder"):
        ad.attach(den.unet)


def test_training_moves_the_concept_toward_the_surrogate_and_keeps_the_teacher_frozen(den):
    """The loop's teacher reads only the contexts encoded before training (every context it is
    given is a frozen encoding of a task prompt), the text encoder's weights do not change, and
    the student's concept prediction (its prompt through the adapted encoder) ends far closer
    to the frozen surrogate prediction than it started."""
    from spare_core.loop import UnlearnConfig, unlearn
    from spare_core.sampling import sample

    prompts = ["a cat", "a dog", "", "the sea"]
    frozen = torch.cat([den.encode([p]) for p in prompts])  # one at a time, as the task does
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, *den.latent_shape, generator=g), torch.tensor([100, 300, 500, 800])

    def gap(ad) -> float:
        with torch.no_grad():
            target = den.eps(x, t, frozen[1:2].expand(4, -1, -1))
            with ad.applied_to(den):
                ctx = den.encode(["a cat"] * 4)
            return float(((den.eps(x, t, ctx) - target) ** 2).mean())

    seen = []

    class Recording(SelfDistill):
        def __call__(self, student, teacher, batch):
            def watched(x_, t_, c):
                seen.append(c.detach().clone())
                return teacher(x_, t_, c)
            return super().__call__(student, watched, batch)

    ad = text_adapter(den, scale=0.0)  # B = 0: starts as the identity
    before = gap(ad)
    latents = sample(den, ["a cat"] * 4, steps=2, guidance=3.0, method="ddim",
                     generator=torch.Generator().manual_seed(0))
    task = ConceptTask("a cat", "a dog", ["the sea"], concept_latents=latents,
                       pool=PoolConfig(size=2, steps=2))
    te0 = te_state(den)
    res = unlearn(den, ad, task, Recording(), UnlearnConfig(steps=40, lr=1e-2, batch_size=2,
                                                            timestep_sampler="uniform"))
    after = gap(res.adapter)
    assert after < 0.3 * before, (before, after)
    assert_state_equal(den.text_encoder, te0)
    assert torch.equal(torch.cat([den.encode([p]) for p in prompts]), frozen)  # unchanged
    rows = torch.cat([c.flatten(0, -3) for c in seen])
    assert rows.shape[0] == 40 * 4  # surrogate and preserve rows of every step
    assert all(any(torch.equal(r, f) for f in frozen) for r in rows)
    assert res.history["loss"][-1] < res.history["loss"][0]


def test_reencoder_maps_rows_to_their_prompts_with_gradient(den):
    prompts = ["a cat", "a dog", "", "the sea"]
    frozen = den.encode(prompts)
    enc = PromptReencoder(den, prompts, frozen)
    c = frozen[[3, 0, 0, 1]]
    assert enc.index(c).tolist() == [3, 0, 0, 1]
    torch.testing.assert_close(enc(c), c, rtol=1e-5, atol=1e-5)  # adapter off: the same
    ad = text_adapter(den)
    with ad.applied(den.text_encoder):
        out = enc(c)
        assert float((out - c).abs().max()) > 1e-3
        out.pow(2).mean().backward()
    assert all(ad[n].lora_A.grad is not None and float(ad[n].lora_A.grad.abs().sum()) > 0
               for n in FIRST)
    with pytest.raises(ValueError, match="none of the task's encoded prompts"):
        enc(c + 1e-3)


def test_native_file_round_trips(den, tmp_path):
    ad = text_adapter(den)
    path = str(tmp_path / "te.safetensors")
    save_adapter(ad, path, unet=den)  # the denoiser: its text encoder is fingerprinted
    with safe_open(path, "pt") as f:
        assert f.metadata()["root"] == "text_encoder"
    for model in (den, den.text_encoder, None):
        back = load_adapter(path, model)
        assert back.root == "text_encoder" and back.names == ad.names
        for n in ad.names:
            assert torch.equal(back[n].lora_A, ad[n].lora_A)
            assert torch.equal(back[n].lora_B, ad[n].lora_B)
    with torch.no_grad(), ad.applied_to(den):
        want = den.encode(["a cat"])
    with torch.no_grad(), back.applied_to(den):
        torch.testing.assert_close(den.encode(["a cat"]), want, rtol=0, atol=0)
    with pytest.raises(ModelMismatchError, match="pass the text encoder, or the denoiser"):
        load_adapter(path, den.unet)
    # a UNet adapter writes no root and reads as a UNet adapter, as every older file
    unet_ad = init_sparse_lora(den.unet, select_modules(den.unet, "text_kv"), rank=2)
    save_adapter(unet_ad, str(tmp_path / "unet.safetensors"), unet=den.unet)
    with safe_open(str(tmp_path / "unet.safetensors"), "pt") as f:
        assert "root" not in f.metadata()
    assert load_adapter(str(tmp_path / "unet.safetensors"), den.unet).root == "unet"


def test_comfy_lora_has_the_kohya_clip_keys_and_the_same_update(den):
    """``lora_te_text_model_encoder_layers_0_<module>.lora_down.weight / .lora_up.weight /
    .alpha``: the keys ComfyUI's model_lora_keys_clip gives SD1.x's clip_l (LORA_CLIP_MAP), and
    up @ down * alpha / rank is the adapter's update."""
    ad = text_adapter(den)
    ad.strength = 0.5
    sd = to_comfy_lora(ad)
    bases = {f"lora_te_text_model_encoder_layers_0_{k}" for k in KOHYA.values()}
    assert set(sd) == {b + s for b in bases for s in (".lora_down.weight", ".lora_up.weight",
                                                      ".alpha")}
    merged = ad.merged()
    for n in FIRST:
        b = "lora_te_text_model_encoder_layers_0_" + KOHYA[n.split(".", 3)[3]]
        down, up, alpha = sd[b + ".lora_down.weight"], sd[b + ".lora_up.weight"], sd[b + ".alpha"]
        torch.testing.assert_close(up @ down * (float(alpha) / down.shape[0]), merged[n])


def test_diffusers_lora_loads_into_the_text_encoder_with_load_lora_weights(den):
    """The ``text_encoder.text_model.*`` file goes through diffusers' own
    ``pipe.load_lora_weights`` (peft) into a pipeline's text encoder and gives the encoding the
    adapter gives."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    ad = text_adapter(den)
    sd = to_diffusers_lora(ad)
    assert set(sd) == {f"text_encoder.text_model.{n}.lora_{x}.weight" for n in FIRST
                       for x in "AB"}
    prompts = ["a cat", "the sea"]
    with torch.no_grad():
        base = den.encode(prompts)
        with ad.applied_to(den):
            want = den.encode(prompts)
    other = tiny_denoiser(0)  # the same weights (seeded), so the LoRA is injected elsewhere
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=other.text_encoder,
                                   tokenizer=other.tokenizer, unet=other.unet,
                                   scheduler=other.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(sd)
    with torch.no_grad():
        got = other.encode(prompts)
    assert float((want - base).abs().max()) > 1e-2  # the adapter changes the encoding
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_backends_without_a_clip_text_encoder_are_refused_up_front(family, monkeypatch):
    from tiny_families import tiny_family_denoiser

    import spare_core.spare as S

    _, fam = tiny_family_denoiser(family)
    monkeypatch.setattr(S, "sample", lambda *a, **k: pytest.fail("sampled before refusing"))
    msg = "module_selection 'text_encoder' needs a diffusers SD1.x/2.x denoiser with a CLIP"
    with pytest.raises(ValueError, match=msg):
        spare_unlearn(fam, "a cat", "a dog", module_selection="text_encoder", **RUN)
    with pytest.raises(ValueError, match=msg):
        text_adapter(tiny_denoiser(0)).root_of(fam)


def test_unsupported_combinations_are_refused_up_front(den, monkeypatch):
    import spare_core.spare as S

    monkeypatch.setattr(S, "sample", lambda *a, **k: pytest.fail("sampled before refusing"))
    with pytest.raises(ValueError, match="element mask ranks UNet weights"):
        spare_unlearn(den, "a cat", "a dog", module_selection="text_encoder", mask_fraction=0.5,
                      **RUN)
    with pytest.raises(ValueError, match="switch adversarial off"):
        spare_unlearn(den, "a cat", "a dog", module_selection="text_encoder", adversarial=True,
                      **RUN)
    with pytest.raises(ValueError, match="rank 100 is larger than layer"):
        spare_unlearn(den, "a cat", "a dog", module_selection="text_encoder", rank=100, **RUN)


def test_comfyui_bridge_and_nodes_refuse_the_text_encoder(tmp_path):
    """The ComfyUI bridge has no HF text encoder: it is refused; SparseLoRAInit offers no
    ``text_encoder`` and refuses it by name; ApplyUnlearnAdapter refuses a text-encoder
    adapter (it cannot patch CLIP), naming the stock LoraLoader."""
    from comfy_double import Host, load_pack

    mp = pytest.MonkeyPatch()
    try:
        host = Host(str(tmp_path)).install(mp)
        pack = load_pack()
        nodes = pack.NODE_CLASS_MAPPINGS
        bridge = sys.modules[f"{pack.__name__}.nodes.comfy_bridge"]
        model, clip = host.load_checkpoint(seed=0)
        den = bridge.ComfyDenoiser(model, clip, 64, 64, prompts=["a cat", "a dog"])
        with pytest.raises(ValueError, match="needs a diffusers SD1.x/2.x denoiser with a CLIP"):
            check_text_encoder(den)
        combo = nodes["SparseLoRAInit"].INPUT_TYPES()["required"]["module_selection"][0]
        assert "text_encoder" not in combo and "all" in combo
        # ComfyUI validates combos (the double too), so only a direct call can pass it
        with pytest.raises(ValueError, match="the nodes do not carry into an adapter yet"):
            nodes["SparseLoRAInit"]().init(model, "text_encoder", module_fraction=0.5, rank=2,
                                           alpha=0.0, mask_fraction=1.0, seed=0)
        with pytest.raises(ValueError, match="cannot patch .*stock LoraLoader"):
            host.run(nodes["ApplyUnlearnAdapter"], model=model,
                     adapter=text_adapter(tiny_denoiser(0)), strength=1.0)
    finally:
        mp.undo()


def test_cli_trains_exports_and_merges_the_text_encoder(tmp_path):
    """``spare unlearn --module-selection text_encoder`` on a pipeline folder: the native file
    is a text-encoder adapter fingerprinted on the text encoder, and ``--merged-out`` bakes it
    into ``text_encoder/`` (the UNet copied unchanged), encoding as the adapter does."""
    from spare_core import DiffusersDenoiser
    from spare_core.cli import main

    d = tmp_path / "pipe"
    src = tiny_denoiser(0)
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        getattr(src, sub).save_pretrained(str(d / sub))
    out, merged = str(tmp_path / "te.safetensors"), str(tmp_path / "merged")
    args = ["unlearn", "--model", str(d), "--concept", "a cat", "--surrogate", "a dog",
            "--out", out, "--steps", "3", "--num-samples", "2", "--sample-steps", "2",
            "--module-selection", "text_encoder", "--lr", "0.01", "--merged-out", merged]
    assert main(args) == 0
    den = DiffusersDenoiser.from_pretrained(str(d))
    ad = load_adapter(out, den)  # strict: the fingerprint is the text encoder's
    assert ad.root == "text_encoder" and ad.names == FIRST
    with torch.no_grad(), ad.applied_to(den):
        want = den.encode(["a cat"])
    baked = DiffusersDenoiser.from_pretrained(merged)
    with torch.no_grad():
        torch.testing.assert_close(baked.encode(["a cat"]), want, rtol=1e-4, atol=1e-5)
        assert float((baked.encode(["a cat"]) - den.encode(["a cat"])).abs().max()) > 0
    assert_state_equal(baked.unet, unet_state(den.unet))
    assert main(args[:-2] + ["--format", "comfy", "--out", str(tmp_path / "c.safetensors")]) == 0
    assert all(k.startswith("lora_te_text_model_encoder_layers_0_")
               for k in load_file(str(tmp_path / "c.safetensors")))


# ------------------------------------------------------------------ the real ComfyUI key map
ROOT = os.environ.get("COMFYUI_ROOT")

KEYMAP = r"""
import logging, sys, torch
from comfy.cli_args import args
args.cpu = True
import comfy.lora, comfy.sd1_clip
from safetensors.torch import load_file, save_file

lora = load_file(sys.argv[1])
with torch.device("meta"):
    clip = comfy.sd1_clip.SD1ClipModel(device="meta")  # SD1.x's CLIP (clip_l), no weights
shapes = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
missed = []
logging.getLogger().addHandler(type("H", (logging.Handler,), {
    "emit": lambda self, r: missed.append(r.getMessage())})())
patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_clip(clip, {}))
assert not [m for m in missed if "not loaded" in m], missed
out = {}
for key, patch in patches.items():
    w = torch.zeros(shapes[key])
    out[key] = patch.calculate_weight(w, key, 1.0, 1.0, None, lambda a: a)
save_file(out, sys.argv[2])
"""


@pytest.mark.skipif(not ROOT, reason="COMFYUI_ROOT is not set: run with ComfyUI's Python and "
                                     "COMFYUI_ROOT=<checkout> (module docstring)")
def test_comfy_lora_loads_onto_clip_l_in_the_real_comfyui(tmp_path):
    """Through the real ComfyUI (its SD1 CLIP model, ``model_lora_keys_clip`` and ``load_lora``):
    every key of the export loads (no "lora key not loaded"), onto
    ``clip_l.transformer.text_model.encoder.layers.0.<module>.weight``, and the weight update
    ComfyUI computes is the adapter's."""
    shapes = {"self_attn.q_proj": (768, 768), "self_attn.k_proj": (768, 768),
              "self_attn.v_proj": (768, 768), "self_attn.out_proj": (768, 768),
              "mlp.fc1": (3072, 768), "mlp.fc2": (768, 3072)}
    g = torch.Generator().manual_seed(0)
    deltas = {}
    for m, shape in shapes.items():
        d = LoRADelta(shape, 2, 1.0, generator=g)
        with torch.no_grad():
            d.lora_B.copy_(torch.randn(d.lora_B.shape, generator=g))
        deltas[f"encoder.layers.0.{m}"] = d
    ad = UnlearnAdapter(deltas, {"root": "text_encoder"})
    lora, got = str(tmp_path / "lora.safetensors"), str(tmp_path / "got.safetensors")
    save_file(to_comfy_lora(ad), lora)
    out = subprocess.run([sys.executable, "-c", KEYMAP, lora, got], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=600,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    weights = load_file(got)
    want = {f"clip_l.transformer.text_model.{n}.weight": d for n, d in ad.merged().items()}
    assert set(weights) == set(want)
    for k, d in want.items():
        torch.testing.assert_close(weights[k], d, rtol=1e-5, atol=1e-6)
