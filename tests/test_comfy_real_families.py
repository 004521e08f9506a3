"""SDXL, SD3 and Flux MODELs through the pack inside a real ComfyUI: skipped unless
``COMFYUI_ROOT`` points to a checkout (run it as tests/test_comfy_real.py, with ComfyUI's own
Python)::

    COMFYUI_ROOT=/work/comfy/ComfyUI /work/comfy/venv/bin/python -m pytest tests/test_comfy_real_families.py -s

What it builds (random weights, from ComfyUI's own model classes, on the meta device first), in
a temporary base directory, checked against ``comfy.model_detection`` before ComfyUI starts:

- ``diffusion_models/tiny_sdxl.safetensors``: an SDXL-family UNet ComfyUI detects as KOALA_700M
  (model class ``SDXL``: model_channels 320, context_dim 2048, adm_in_channels 2816 and
  transformer_depth [0, 2, 5] are what detection matches; channel_mult [1, 1, 1], one ResBlock
  per level, no middle block and output blocks without transformers keep it at 50 M parameters);
- ``diffusion_models/tiny_sd3.safetensors``: an SD3 MMDiT of depth 2 (hidden 128: detection reads
  the depth from ``x_embedder``), 16 latent channels, context 4096, pooled 2048;
- ``diffusion_models/tiny_flux.safetensors``: a Flux-dev DiT with one double and one single block
  (detection fixes hidden 3072, context 4096 and 24 heads: 549 M parameters), guidance embedding,
  ``vec_in_dim`` 2048 (read from the weights);
- ``text_encoders/tiny_clip_l.safetensors`` and ``tiny_clip_g.safetensors``: full-size random
  CLIP-L (with its text projection, as ComfyUI's clip_l.safetensors) and CLIP-G (ComfyUI builds
  both from fixed configs);
- ``checkpoints/tiny_sdxl_ckpt.safetensors``: the tiny SDXL UNet, both CLIPs and a full-size
  random SDXL KL VAE (4 latent channels; ComfyUI's VAE detection fixes its widths) in one file,
  written by ComfyUI's own ``comfy.sd.save_checkpoint`` (what the stock CheckpointSave writes:
  the layout of sd_xl_base_1.0, ``model.diffusion_model.``, ``conditioner.embedders.0/1.``,
  ``first_stage_model.``), detected again as KOALA_700M;
- ``vae/tiny_flux_ae.safetensors``: a full-size random Flux autoencoder (ae.safetensors' keys and
  shapes: 16 latent channels, no quant convs; detection reads only the channels, the widths are
  ComfyUI's fixed config), detected as a 16-channel AutoencodingEngine.

Text encoders, all through stock loaders: SDXL gets DualCLIPLoader(type sdxl: CLIP-L + CLIP-G),
as SDXL ships. SD3 gets CLIPLoader(type sd3) on CLIP-L alone, a combination ComfyUI supports
(the sequence zero-padded to 4096, the pooled vector CLIP-L's + zeros for CLIP-G). Flux ships
with CLIP-L + T5-XXL (DualCLIPLoader type flux), but T5-XXL is a fixed 4.7 B-parameter config, too
large to build and run on a CPU test machine, so Flux gets the same SD3-type CLIP-L: a
4096-wide sequence and a 2048-wide pooled vector, which the tiny Flux (vec_in_dim 2048) takes.

For each family, through ComfyUI's HTTP/websocket API: ComputeSaliency (ranking objective) ->
SparseLoRAInit (module_selection objective) -> SelfDistillUnlearn (concept left empty: the
saliency's) -> SaveUnlearnAdapter; then the saved LoRA in the stock LoraLoaderModelOnly
(no "lora key not loaded" in ComfyUI's log) samples, with the stock KSampler, the same latents as
LoadUnlearnAdapter -> ApplyUnlearnAdapter, and different ones from the unpatched model.

For each family also an adapter with diffusers module names (what the diffusers backend trains),
the names and shapes read from ComfyUI's own key maps for the tiny model (``unet_to_diffusers``,
``mmdit_to_diffusers``, ``flux_to_diffusers``; SD3's and Flux's q/k/v and proj_mlp are slices of
fused weights), four random LoRAs and one masked full delta, exported by
``spare_core.export.to_comfy_lora`` (``lora_unet_`` for SDXL, ``lora_transformer_`` for SD3 and
Flux; ``.diff`` for the masked one): every key loads in the stock LoraLoaderModelOnly and the
latents change; the same adapter under the other prefix is reported "lora key not loaded" key by
key.

For each family also the diffusion model loaded by UNETLoader at weight_dtype fp8_e4m3fn:
ComputeSaliency (ranking saliency) -> SparseLoRAInit (saliency) -> SelfDistillUnlearn ->
ApplyUnlearnAdapter, which moves the fp8 model's samples.

The shipped SDXL and Flux workflows (workflows/api/spare_erase_concept_{sdxl,flux}.api.json) are
queued headless with their nodes, links and settings as shipped (SparseLoRAInit's shipped
selection, no saliency map: the concept is typed once, in SelfDistillUnlearn); TINY_RUN lists
what the copy changes: file names, 64x64 px, step counts (KSampler 3; SelfDistillUnlearn 3 steps
at lr 1e-2, batch 1, pools of 1 latent of 2 steps). SDXL:
CheckpointLoaderSimple on tiny_sdxl_ckpt. Flux: UNETLoader on tiny_flux, VAELoader on
tiny_flux_ae, and one substitution: the DualCLIPLoader(clip_l, t5xxl, type flux) node keeps its
class but loads (tiny_clip_l, tiny_clip_g, type sd3): CLIP-L's and CLIP-G's sequences side by
side, zero-padded to 4096 wide (where T5's 4096-wide sequence goes), and a 2048-wide pooled vector
(CLIP-L's + CLIP-G's), which the tiny Flux (vec_in_dim 2048) takes; FluxGuidance, cfg 1 and the
rest are as shipped. No smaller T5 can stand in under type flux:
ComfyUI builds Flux's T5 from the fixed comfy/text_encoders/t5_config_xxl.json (d_model 4096, 24
blocks, d_ff 10240, 4.76 B parameters) whatever the file holds: a narrower T5 file fails with
"size mismatch", a shallower one loads with the other blocks reported "clip missing" and left
uninitialised, and one T5-XXL encode (256 tokens, about 2.4 TFLOP) takes about half a minute on a
CPU thread, with 9.5 GB of fp16 weights. The test asserts: the run succeeds with no "clip
missing" or "lora key not loaded" in the log, the Before/After images (and no other) are written,
the After image differs from the Before one, and the LoRA (``lora_unet_`` keys) and the native
adapter (with SelfDistillUnlearn's concept) are in models/loras.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from comfy_double import REPO, validate_api_prompt
from test_comfy_real import RAND_INIT, node_of, progress_by_node, running_comfy

ROOT = os.environ.get("COMFYUI_ROOT")
pytestmark = pytest.mark.skipif(
    not ROOT, reason="COMFYUI_ROOT is not set: point it at a ComfyUI checkout and run this test "
                     "with that ComfyUI's Python (see the module docstring)")

BUILD = r'''
import sys, os, time, torch
from comfy.cli_args import args
args.cpu = True
import comfy.ops
from safetensors.torch import save_file

out = sys.argv[1]
which = sys.argv[2].split(",")
''' + RAND_INIT + r'''
def save(module, path, dtype=torch.float16, prefix=""):
    sd = {prefix + k: rand(k, v.shape).to(dtype) for k, v in module.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return sd
ops = comfy.ops.disable_weight_init
os.makedirs(os.path.join(out, "diffusion_models"), exist_ok=True)
os.makedirs(os.path.join(out, "text_encoders"), exist_ok=True)
import comfy.model_detection as md
def check(sd, want):
    cfg = md.model_config_from_unet(sd, "")
    name = type(cfg).__name__ if cfg is not None else None
    assert name == want, (name, want)
    print("detected", name, flush=True)
t = time.time()
if "clip_l" in which or "clip_g" in which:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
if "clip_l" in which:
    with torch.device("meta"):
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12,
                                          max_position_embeddings=77))
    sd = {k: (torch.randn(v.shape, generator=g) * 0.02 if "embedding" in k else rand(k, v.shape)).half()
          for k, v in te.state_dict().items()}
    # transformers 5 names CLIPTextModel's tensors without "text_model."; ComfyUI reads them with
    sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
          for k, v in sd.items()}
    # clip_l.safetensors as ComfyUI's users have it carries the projection (unused by SDXL,
    # SD3 and Flux, which take CLIP-L's unprojected pooled output)
    sd["text_projection.weight"] = rand("text_projection.weight", (768, 768)).half()
    save_file(sd, os.path.join(out, "text_encoders", "tiny_clip_l.safetensors"))
if "clip_g" in which:
    with torch.device("meta"):
        te = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, max_position_embeddings=77, projection_dim=1280,
            hidden_act="gelu"))
    sd = {k: (torch.randn(v.shape, generator=g) * 0.02 if "embedding" in k else rand(k, v.shape)).half()
          for k, v in te.state_dict().items()}
    save_file(sd, os.path.join(out, "text_encoders", "tiny_clip_g.safetensors"))
if "sdxl" in which:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                     num_res_blocks=[1, 1, 1], channel_mult=[1, 1, 1], transformer_depth=[0, 2, 5],
                     transformer_depth_output=[0, 0, 0, 0, 0, 0], transformer_depth_middle=-2,
                     context_dim=2048, num_heads=-1, num_head_channels=64,
                     use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
                     use_spatial_transformer=True, legacy=False, use_temporal_resblock=False,
                     use_temporal_attention=False, dtype=torch.float32, device="meta", operations=ops)
    sd = save(unet, os.path.join(out, "diffusion_models", "tiny_sdxl.safetensors"))
    check(sd, "KOALA_700M")
if "sd3" in which:
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    net = OpenAISignatureMMDITWrapper(
        in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
        pos_embed_max_size=16, num_patches=256, input_size=None, pos_embed_scaling_factor=None,
        dtype=torch.float32, device="meta", operations=ops)
    sd = save(net, os.path.join(out, "diffusion_models", "tiny_sd3.safetensors"))
    check(sd, "SD3")
if "flux" in which:
    from comfy.ldm.flux.model import Flux
    net = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=2048,
               context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1,
               depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True,
               guidance_embed=True, patch_size=2, dtype=torch.float32, device="meta", operations=ops)
    sd = save(net, os.path.join(out, "diffusion_models", "tiny_flux.safetensors"))
    check(sd, "Flux")
VAE_CFG = {"double_z": True, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
           "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
if "sdxl_ckpt" in which:  # UNet, CLIP-L + CLIP-G, KL VAE in one file, as CheckpointSave writes it
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import load_file
    with torch.device("meta"):
        kl = AutoencoderKL(ddconfig={**VAE_CFG, "z_channels": 4}, embed_dim=4)
    vae = comfy.sd.VAE(sd={k: rand(k, v.shape) for k, v in kl.state_dict().items()})
    assert vae.latent_channels == 4 and type(vae.first_stage_model) is AutoencoderKL
    unet = comfy.sd.load_diffusion_model_state_dict(
        load_file(os.path.join(out, "diffusion_models", "tiny_sdxl.safetensors")))
    clip = comfy.sd.load_text_encoder_state_dicts(
        [load_file(os.path.join(out, "text_encoders", f))
         for f in ("tiny_clip_l.safetensors", "tiny_clip_g.safetensors")])
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    path = os.path.join(out, "checkpoints", "tiny_sdxl_ckpt.safetensors")
    comfy.sd.save_checkpoint(path, unet, clip, vae)
    sd = load_file(path)
    cfg = md.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(cfg).__name__ == "KOALA_700M", cfg
    prefixes = sorted({".".join(k.split(".")[:3]) for k in sd if not k.startswith("model.")})
    print("checkpoint", type(cfg).__name__, prefixes, flush=True)
if "flux_ae" in which:  # Flux's 16-channel autoencoder (ae.safetensors): ComfyUI's fixed config
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencodingEngine
    with torch.device("meta"):
        ae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder",
                            "params": {**VAE_CFG, "z_channels": 16}},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder",
                            "params": {**VAE_CFG, "z_channels": 16}})
    os.makedirs(os.path.join(out, "vae"), exist_ok=True)
    sd = save(ae, os.path.join(out, "vae", "tiny_flux_ae.safetensors"))
    vae = comfy.sd.VAE(sd=sd)
    assert vae.latent_channels == 16 and type(vae.first_stage_model) is AutoencodingEngine
    print("detected a 16-channel AutoencodingEngine VAE", flush=True)
print(f"built {which} in {time.time() - t:.0f}s", flush=True)
'''

FAMILIES = {
    # family: (UNet file, CLIP loader node and inputs, empty latent node)
    "sdxl": ("tiny_sdxl.safetensors",
             {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "tiny_clip_l.safetensors",
                                                         "clip_name2": "tiny_clip_g.safetensors",
                                                         "type": "sdxl"}},
             "EmptyLatentImage"),
    "sd3": ("tiny_sd3.safetensors",
            {"class_type": "CLIPLoader", "inputs": {"clip_name": "tiny_clip_l.safetensors",
                                                    "type": "sd3"}},
            "EmptySD3LatentImage"),
    "flux": ("tiny_flux.safetensors",
             {"class_type": "CLIPLoader", "inputs": {"clip_name": "tiny_clip_l.safetensors",
                                                     "type": "sd3"}},
             "EmptySD3LatentImage"),
}
CONCEPT, SURROGATE = "a red circle", "a blue square"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    pytest.importorskip("websocket", reason="needs websocket-client in ComfyUI's environment")
    base = str(tmp_path_factory.mktemp("comfy_families"))
    models = os.path.join(base, "models")
    for sub in ("custom_nodes", "models/diffusion_models", "models/text_encoders", "models/loras",
                "models/checkpoints", "models/vae"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    os.symlink(REPO, os.path.join(base, "custom_nodes", "spare-unlearn"))
    env = {**os.environ, "PYTHONPATH": ROOT}
    t = time.time()
    out = subprocess.run([sys.executable, "-c", BUILD, models, "sdxl,sd3,flux,clip_l,clip_g,sdxl_ckpt,flux_ae"],
                         cwd=ROOT, env=env, timeout=900, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"\n{out.stdout.strip()} ({time.time() - t:.0f}s)")
    with running_comfy(base) as server:
        yield server


def loaders(family: str) -> dict:
    unet, clip, _ = FAMILIES[family]
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
            "2": json.loads(json.dumps(clip))}


def sampled(prompt: dict, nid: str, model: list, family: str, tag: str) -> None:
    """CLIPTextEncode(concept) -> KSampler (2 steps, cfg 1) on ``model`` -> SaveLatent."""
    empty = FAMILIES[family][2]
    prompt.setdefault("20", {"class_type": "CLIPTextEncode", "inputs": {"text": CONCEPT, "clip": ["2", 0]}})
    prompt.setdefault("21", {"class_type": empty, "inputs": {"width": 64, "height": 64, "batch_size": 1}})
    prompt[nid] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
        "scheduler": "simple", "positive": ["20", 0], "negative": ["20", 0],
        "latent_image": ["21", 0], "denoise": 1.0}}
    prompt[nid + "0"] = {"class_type": "SaveLatent", "inputs": {
        "samples": [nid, 0], "filename_prefix": f"cmp/{family}_{tag}"}}


def latent(comfy, history: dict, nid: str):
    from safetensors.torch import load_file
    item = history["outputs"][nid]["latents"][0]
    return load_file(comfy.output_file(item))["latent_tensor"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_unlearns_and_its_lora_loads_in_the_stock_loader(comfy, family):
    from safetensors.torch import load_file

    run = loaders(family)
    run["3"] = {"class_type": "ComputeSaliency", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "concept": CONCEPT, "samples": 1,
        "ranking": "objective", "surrogate": SURROGATE, "seed": 0, "width": 64, "height": 64,
        "sample_steps": 2, "cfg": 2.0}}
    run["4"] = {"class_type": "SparseLoRAInit", "inputs": {
        "model": ["1", 0], "saliency": ["3", 0], "module_selection": "objective",
        "module_fraction": 0.15, "rank": 2, "alpha": 2.0, "mask_fraction": 1.0, "seed": 0}}
    run["5"] = {"class_type": "SelfDistillUnlearn", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "adapter": ["4", 0], "concept": "",
        "surrogate": SURROGATE, "preserve": "", "steps": 4, "lr": 2e-2,
        "timestep_sampler": "uniform", "objective": "self_distill", "seed": 0, "batch_size": 1,
        "width": 64, "height": 64, "pool_size": 1, "pool_steps": 2, "cfg": 2.0}}
    run["6"] = {"class_type": "SaveUnlearnAdapter", "inputs": {
        "adapter": ["5", 0], "filename_prefix": f"spare/{family}", "keep_native": True}}
    t = time.time()
    history, messages = comfy.run(run)
    assert history.get("status", {}).get("status_str") == "success", json.dumps(
        [m for m in messages if m["type"] == "execution_error"])[-4000:]
    trained_in = time.time() - t
    lora = history["outputs"]["6"]["text"][0]
    assert lora == f"spare/{family}_00001_.safetensors"
    keys = load_file(os.path.join(comfy.base, "models", "loras", lora)).keys()
    assert keys and all(k.startswith("lora_unet_") for k in keys), sorted(keys)[:4]
    losses = re.findall(r"SelfDistillUnlearn: 4 steps .* loss (\S+) -> (\S+)", comfy.log_text())
    assert losses, comfy.log_text()[-3000:]

    cmp = loaders(family)
    cmp["30"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "lora_name": lora, "strength_model": 1.0}}
    cmp["31"] = {"class_type": "LoadUnlearnAdapter",
                 "inputs": {"adapter_name": lora.replace(".safetensors", ".spare.safetensors")}}
    cmp["32"] = {"class_type": "ApplyUnlearnAdapter",
                 "inputs": {"model": ["1", 0], "adapter": ["31", 0], "strength": 1.0}}
    sampled(cmp, "40", ["30", 0], family, "lora")
    sampled(cmp, "41", ["32", 0], family, "apply")
    sampled(cmp, "42", ["1", 0], family, "base")
    before = len(comfy.log_text())
    h, messages = comfy.run(cmp)
    assert h.get("status", {}).get("status_str") == "success", json.dumps(
        [m for m in messages if m["type"] == "execution_error"])[-4000:]
    via_lora, via_apply, base = (latent(comfy, h, n) for n in ("400", "410", "420"))
    scale = float(base.abs().max())
    diff = float((via_lora - via_apply).abs().max())
    effect = float((via_apply - base).abs().max())
    log = comfy.log_text()[before:]
    print(f"\n{family}: trained in {trained_in:.0f}s, loss {losses[-1][0]} -> {losses[-1][1]}; "
          f"LoRA {len(keys)} keys; LoraLoaderModelOnly vs ApplyUnlearnAdapter max |diff| "
          f"{diff:.2e}, adapter effect {effect:.2e} (latent scale {scale:.2f})")
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
    assert diff <= 1e-3 * max(scale, 1.0)
    assert effect > 10 * max(diff, 1e-6)


# ------------------------------------------------------------------ diffusers-named adapters
KEYMAP = r"""
import sys, json
from comfy.cli_args import args
args.cpu = True
import comfy.utils, comfy.model_detection as md
from safetensors import safe_open

path, family = sys.argv[1], sys.argv[2]
with safe_open(path, "pt") as f:
    shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
cfg = md.model_config_from_unet(comfy.utils.load_torch_file(path), "").unet_config
keymap = {"sdxl": lambda: comfy.utils.unet_to_diffusers(cfg),
          "sd3": lambda: comfy.utils.mmdit_to_diffusers(cfg),
          "flux": lambda: comfy.utils.flux_to_diffusers(cfg)}[family]()
out = {}
for name, to in keymap.items():
    if not name.endswith(".weight"):
        continue
    if isinstance(to, str):
        key, shape = to, shapes.get(to)
    elif len(to) == 2 and to[1] is not None:  # (fused weight, (dim, offset, size)): a slice of it
        key, (dim, _, size) = to[0], to[1]
        shape = shapes.get(key) and [size if i == dim else s for i, s in enumerate(shapes[key])]
    else:
        continue  # converted on load (SD3's last norm1_context: scale and shift swapped)
    if shape and len(shape) in (2, 4):
        out[name[:-len(".weight")]] = {"comfy": key, "shape": shape,
                                       "slice": not isinstance(to, str)}
print(json.dumps(out))
"""

DIFFUSERS_MODULES = {
    # family: (dense LoRA modules, the masked full-delta module), diffusers names: SDXL's
    # cross-attention to_k (context 2048 wide), a self-attention projection, a linear proj_in and
    # a 3x3 conv; SD3's and Flux's q/k/v (and Flux's proj_mlp) are slices of ComfyUI's fused qkv /
    # linear1 weights, and so is the masked one (a ``.diff`` written onto a slice)
    "sdxl": (["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
              "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
              "down_blocks.2.attentions.0.proj_in", "down_blocks.1.resnets.0.conv1"],
             "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"),
    "sd3": (["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
             "transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.ff.net.0.proj"],
            "transformer_blocks.0.attn.to_v"),
    "flux": (["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
              "single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.ff.net.2"],
             "transformer_blocks.0.attn.add_v_proj"),
}


def diffusers_names(comfy, family: str) -> dict:
    """The tiny model's diffusers module names -> ComfyUI weight, shape (of the slice, for a
    fused weight), from ComfyUI's own key maps (unet_to_diffusers / mmdit_to_diffusers /
    flux_to_diffusers, what comfy.lora.model_lora_keys_unet reads)."""
    path = os.path.join(comfy.base, "models", "diffusion_models", FAMILIES[family][0])
    out = subprocess.run([sys.executable, "-c", KEYMAP, path, family], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=300,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp8_unet_saliency_and_training(comfy, family):
    """The family's diffusion model loaded by the stock UNETLoader at weight_dtype fp8_e4m3fn
    (ComfyUI computes in its manual-cast dtype): ComputeSaliency ranks it (each layer's weight
    gradient read from the copy its manual cast makes), SparseLoRAInit places a LoRA by that map,
    SelfDistillUnlearn trains it, and the applied adapter moves the fp8 model's samples."""
    run = loaders(family)
    run["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    run["3"] = {"class_type": "ComputeSaliency", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "concept": CONCEPT, "samples": 1,
        "ranking": "saliency", "seed": 0, "width": 64, "height": 64, "sample_steps": 2,
        "cfg": 2.0}}
    run["4"] = {"class_type": "SparseLoRAInit", "inputs": {
        "model": ["1", 0], "saliency": ["3", 0], "module_selection": "saliency",
        "module_fraction": 0.15, "rank": 2, "alpha": 2.0, "mask_fraction": 1.0, "seed": 0}}
    run["5"] = {"class_type": "SelfDistillUnlearn", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "adapter": ["4", 0], "concept": CONCEPT,
        "surrogate": SURROGATE, "preserve": "", "steps": 3, "lr": 2e-2,
        "timestep_sampler": "uniform", "objective": "self_distill", "seed": 0, "batch_size": 1,
        "width": 64, "height": 64, "pool_size": 1, "pool_steps": 2, "cfg": 2.0}}
    run["6"] = {"class_type": "ApplyUnlearnAdapter",
                "inputs": {"model": ["1", 0], "adapter": ["5", 0], "strength": 1.0}}
    sampled(run, "40", ["6", 0], family, "fp8_apply")
    sampled(run, "41", ["1", 0], family, "fp8_base")
    t = time.time()
    history, messages = comfy.run(run)
    assert history.get("status", {}).get("status_str") == "success", json.dumps(
        [m for m in messages if m["type"] == "execution_error"])[-4000:]
    took = time.time() - t
    steps = [m["data"] for m in messages if m["type"] == "progress" and m["data"]["node"] == "3"]
    assert steps and steps[-1]["value"] == steps[-1]["max"], steps
    applied, base = (latent(comfy, history, n) for n in ("400", "410"))
    effect = float((applied - base).abs().max())
    print(f"\n{family} in fp8: saliency, a LoRA placed by it and trained, in {took:.0f}s; "
          f"effect on the fp8 model's latents {effect:.2e}")
    assert effect > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_diffusers_named_adapter_lora_loads_in_the_stock_loader(comfy, family):
    """An adapter with diffusers module names (what the diffusers backend trains), exported by
    spare_core.export.to_comfy_lora (``lora_unet_`` for the SDXL UNet, ``lora_transformer_`` for
    the SD3 / Flux transformers): every key loads in the stock LoraLoaderModelOnly (no "lora key
    not loaded", no shape mismatch), fused-weight slices and ``.diff`` included, and the sampled
    latents change."""
    import torch
    from safetensors.torch import save_file

    from spare_core.adapter import LoRADelta, MaskedFullDelta, UnlearnAdapter
    from spare_core.export import to_comfy_lora

    names = diffusers_names(comfy, family)
    dense, masked = DIFFUSERS_MODULES[family]
    assert set(dense) | {masked} <= set(names), sorted(set(dense) | {masked} - set(names))
    if family != "sdxl":  # at least one attention projection that is a slice of a fused weight
        assert names[dense[0]]["slice"] and names[masked]["slice"]
    g = torch.Generator().manual_seed(0)
    deltas = {}
    for n in dense:
        shape = tuple(names[n]["shape"])
        d = LoRADelta(shape, 2, 2.0, generator=g)
        with torch.no_grad():
            d.lora_B.copy_(torch.randn(d.lora_B.shape, generator=g) * 0.5)
        deltas[n] = d
    shape = tuple(names[masked]["shape"])
    d = MaskedFullDelta(shape, torch.rand(shape, generator=g) < 0.5)
    with torch.no_grad():
        d.values.copy_(torch.randn(d.values.shape, generator=g) * 0.05)
    deltas[masked] = d
    adapter = UnlearnAdapter(deltas)

    sd = to_comfy_lora(adapter)
    prefix = "lora_unet_" if family == "sdxl" else "lora_transformer_"
    assert all(k.startswith(prefix) for k in sd), sorted(sd)[:4]
    key = prefix + masked.replace(".", "_")
    assert f"{key}.diff" in sd and tuple(sd[f"{key}.diff"].shape) == shape
    assert len(sd) == 3 * len(dense) + 1
    lora = f"diffusers_named_{family}.safetensors"
    save_file(sd, os.path.join(comfy.base, "models", "loras", lora))

    cmp = loaders(family)
    cmp["30"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "lora_name": lora, "strength_model": 1.0}}
    sampled(cmp, "43", ["30", 0], family, "diffusers_lora")
    sampled(cmp, "42", ["1", 0], family, "base")
    before = len(comfy.log_text())
    t = time.time()
    h, messages = comfy.run(cmp)
    assert h.get("status", {}).get("status_str") == "success", json.dumps(
        [m for m in messages if m["type"] == "execution_error"])[-4000:]
    took = time.time() - t
    log = comfy.log_text()[before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
    assert "SHAPE MISMATCH" not in log and "NOT MERGED" not in log, log[-3000:]
    via_lora, base = (latent(comfy, h, n) for n in ("430", "420"))
    scale = float(base.abs().max())
    effect = float((via_lora - base).abs().max())
    print(f"\n{family}: {len(sd)} keys {prefix}* ({len(dense)} LoRA + 1 .diff; "
          f"{sum(names[n]['slice'] for n in deltas)} on fused-weight slices) loaded by "
          f"LoraLoaderModelOnly; sampled in {took:.0f}s; effect max |diff| {effect:.2e} "
          f"(latent scale {scale:.2f})")
    assert effect > 1e-2 * max(scale, 1.0), (effect, scale)

    # the check has teeth: the same adapter under the other prefix is reported key by key
    wrong = "lora_transformer_" if family == "sdxl" else "lora_unet_"
    save_file(to_comfy_lora(adapter, prefix=wrong),
              os.path.join(comfy.base, "models", "loras", f"wrong_prefix_{family}.safetensors"))
    neg = loaders(family)
    neg["30"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "lora_name": f"wrong_prefix_{family}.safetensors",
        "strength_model": 1.0}}
    sampled(neg, "44", ["30", 0], family, "wrong_prefix")
    before = len(comfy.log_text())
    h, _ = comfy.run(neg)
    assert h.get("status", {}).get("status_str") == "success"
    missed = set(re.findall(r"lora key not loaded: (\S+)", comfy.log_text()[before:]))
    assert missed == {wrong + k[len(prefix):] for k in sd}, sorted(missed)[:6]


# ------------------------------------------------------------------ the shipped SDXL and Flux workflows
SDXL_CKPT, FLUX_AE = "tiny_sdxl_ckpt.safetensors", "tiny_flux_ae.safetensors"
TINY_RUN = {  # class_type: the inputs set in the copy of a shipped API prompt (files, sizes, steps)
    "CheckpointLoaderSimple": {"ckpt_name": SDXL_CKPT},
    "UNETLoader": {"unet_name": "tiny_flux.safetensors"},
    "VAELoader": {"vae_name": FLUX_AE},
    # the one substitution: the Flux workflow's DualCLIPLoader(clip_l, t5xxl, type flux) becomes
    # DualCLIPLoader(clip_l, clip_g, type sd3), as the module docstring explains
    "DualCLIPLoader": {"clip_name1": "tiny_clip_l.safetensors",
                       "clip_name2": "tiny_clip_g.safetensors", "type": "sd3"},
    "KSampler": {"steps": 3},
    "SelfDistillUnlearn": {"steps": 3, "lr": 1e-2, "batch_size": 1, "pool_size": 1,
                           "pool_steps": 2},
}


def shipped_tiny(variant: str) -> tuple[dict, dict]:
    """The shipped API workflow and the copy that runs here (TINY_RUN's inputs, 64x64 px)."""
    with open(os.path.join(REPO, "workflows", "api", f"spare_erase_concept_{variant}.api.json")) as f:
        shipped = json.load(f)
    wf = json.loads(json.dumps(shipped))
    for node in wf.values():
        node["inputs"].update(TINY_RUN.get(node["class_type"], {}))
        if "width" in node["inputs"]:
            node["inputs"].update(width=64, height=64)
    return shipped, wf


@pytest.mark.parametrize("variant", ["sdxl", "flux"])
def test_shipped_workflow_runs_headless(comfy, variant):
    """workflows/api/spare_erase_concept_<variant>.api.json queued as shipped (its nodes, links
    and settings; only the file names, sizes and step counts of TINY_RUN swapped): it writes the
    before/after images, the LoRA and the native adapter (with SelfDistillUnlearn's concept), and
    the after image differs from the before one (same prompt, seed and sampler)."""
    import numpy as np
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import load_file

    shipped, wf = shipped_tiny(variant)
    assert list(wf) == list(shipped)
    for nid, node in wf.items():  # the same graph: node classes, links, other settings
        assert node["class_type"] == shipped[nid]["class_type"]
        swapped = {*TINY_RUN.get(node["class_type"], {}), "width", "height"}
        assert {k: v for k, v in node["inputs"].items() if k not in swapped} == {
            k: v for k, v in shipped[nid]["inputs"].items() if k not in swapped}, nid
    assert validate_api_prompt(wf, comfy.info) == []  # the tiny files are in the loaders' lists
    before_log = len(comfy.log_text())
    t = time.time()
    history, messages = comfy.run(wf)
    took = time.time() - t
    errors = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert not errors and history["status"]["status_str"] == "success", json.dumps(errors)[-4000:]
    log = comfy.log_text()[before_log:]
    assert "clip missing" not in log and "lora key not loaded" not in log, log[-3000:]

    outputs, images = history["outputs"], {}
    for nid, out in outputs.items():
        for item in out.get("images", []):
            path = comfy.output_file(item)
            assert os.path.isfile(path), path
            images[wf[nid]["_meta"]["title"]] = np.asarray(Image.open(path).convert("RGB"))
    assert set(images) == {"Before", "After", "Loss"}, sorted(images)
    assert images["Loss"].shape == (384, 768, 3)  # Self-Distill Unlearn's loss, previewed
    before, after = images["Before"].astype(int), images["After"].astype(int)
    assert before.shape == after.shape == (64, 64, 3)
    changed = float(np.abs(after - before).mean())
    assert changed > 1.0, changed  # mean |difference| in 0..255 pixel values

    save = node_of(wf, "SaveUnlearnAdapter")
    lora = outputs[save]["text"][0]
    assert lora == wf[save]["inputs"]["filename_prefix"] + "_00001_.safetensors"
    loras = os.path.join(comfy.base, "models", "loras")
    keys = load_file(os.path.join(loras, lora)).keys()
    assert keys and all(k.startswith("lora_unet_") for k in keys), sorted(keys)[:4]
    with safe_open(os.path.join(loras, lora.replace(".safetensors", ".spare.safetensors")), "pt") as f:
        assert f.metadata()["concept"] == wf[node_of(wf, "SelfDistillUnlearn")]["inputs"]["concept"]
    progress_by_node(messages, wf)
    losses = re.findall(r"SelfDistillUnlearn: 3 steps .* loss (\S+) -> (\S+)", log)
    print(f"\n{variant} workflow ran in {took:.0f}s: images {sorted(images)}; after vs before "
          f"mean |pixel diff| {changed:.1f}/255; {lora} ({len(keys)} keys) + native; "
          f"unlearning loss {' -> '.join(losses[-1]) if losses else '?'}")
