"""A small test double of exactly the ComfyUI surface the SPARE node pack touches.

Modelled on ComfyUI a125cd84b054a57729b5eecab930ca9408719832 (2025-10-12). Each stand-in names the
host code it replaces; anything the pack does not use is left out on purpose, so a new host call
in ``nodes/comfy_bridge.py`` fails here until it is added (and documented) below.

Installed into ``sys.modules`` by :meth:`Host.install`:
- ``comfy.model_management``: ``load_models_gpu(models, force_full_load=)`` (loads one
  ModelPatcher's weight patches into the shared UNet, first restoring the weights another clone
  patched: ModelPatcher.patch_model / unpatch_model with the shared ``backup`` dict),
  ``throw_exception_if_processing_interrupted()``, ``InterruptProcessingException``,
  ``interrupt_current_processing()``, ``get_free_memory(dev)`` (reports ``Host.free_memory``).
- ``comfy.utils.ProgressBar(total)`` with ``update_absolute(value, total)``.
- ``folder_paths``: ``get_folder_paths``, ``get_full_path``, ``get_filename_list``,
  ``get_save_image_path`` (only the ``loras`` folder exists; like the host it raises a plain
  ``Exception`` "Saving image outside the output folder is not allowed" for a prefix that
  normalises to a folder outside the given one: ``../x``, ``a/../../x``, an absolute path).
Objects (as CheckpointLoaderSimple returns them, built under ``torch.inference_mode()`` like every
node ComfyUI executes, so weights are inference tensors):
- :class:`ModelPatcher` (comfy/model_patcher.py): ``model``, ``clone()``, ``add_patches()``,
  ``get_model_object()``, ``patches``, ``patches_uuid``, ``backup``.
- :class:`BaseModel` (comfy/model_base.py): ``diffusion_model``, ``model_sampling``,
  ``model_type`` (ModelType enum), ``latent_format.latent_channels``, ``get_dtype()``,
  ``manual_cast_dtype``, ``process_latent_in(latent)`` (SD1.5's latent scale 0.18215).
- :class:`VAE` (comfy/sd.py): ``encode(pixels [B, H, W, 3] in [0, 1]) -> [B, 4, H/8, W/8]``
  unscaled latents (here a fixed 8x8 patch projection instead of the KL autoencoder).
- :class:`ComfyStyleUNet`: a diffusers UNet2DConditionModel called the way ComfyUI calls its
  openaimodel.UNetModel: ``forward(x, timesteps, context=, control=, transformer_options=)``.
- :class:`ModelSamplingDiscrete` (comfy/model_sampling.py): ``sigmas`` of SD's scaled-linear schedule.
- :class:`CLIP` (comfy/sd.py): ``tokenize(text, return_word_ids=False)`` -> ``{"l": [[(token,
  weight), ...], ...]}`` in chunks (77 tokens in ComfyUI, 32 here; ``(token, weight, word_id)``
  with word ids), ``encode_from_tokens(tokens)`` -> ``[1, 32*chunks, D]``;
  laid out as SD1.x's (``clip_l``, key ``l``) or SD2.x's (``clip_h``, key ``h``) for the prompt
  attack: ``cond_stage_model`` (SD1ClipModel: ``clip``, ``clip_name``, the
  :class:`SDClipModel`), ``tokenizer`` (SD1Tokenizer: the SDTokenizer at ``clip``, its
  ``tokenizer`` a transformers CLIPTokenizer).
- ``BaseModel.process_latent_out(latent)``: what a KSampler outputs (SD1.5's scale undone).
Host behaviour the tests need, not the pack:
- :meth:`Host.run`: execution.py (inputs checked against INPUT_TYPES, run under inference mode).
- :meth:`Host.load_lora`: comfy.sd.load_lora_for_models + comfy.lora.model_lora_keys_unet
  (``lora_unet_<name, . -> _>`` -> ``diffusion_model.<name>.weight``; ``lora_up``/``lora_down``/
  ``alpha`` as LoRAAdapter.calculate_weight; ``.diff``; unknown keys are recorded as
  "lora key not loaded" warnings).
- :meth:`Host.eps`: what a KSampler step does to the weights: load the MODEL, run the UNet.
- :func:`object_info` / :data:`STOCK_NODES`: server.py's ``/object_info`` for our classes and the
  stock nodes the workflows use; :func:`validate_api_prompt`: execution.py's prompt validation
  (types, links, ranges, combos); :func:`validate_ui_workflow` / :func:`ui_to_api`: what the
  frontend needs to load a UI workflow and what it queues from it (graphToPrompt).
"""
from __future__ import annotations

import collections
import enum
import importlib.util
import json
import os
import re
import sys
import types
import uuid
from types import SimpleNamespace

import torch
from torch import nn

from tiny_models import char_tokenizer, tiny_text_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 32  # tokens per CLIP chunk (ComfyUI: 77)
Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])


def load_pack(name: str | None = None):
    """Import the repository root the way ComfyUI's nodes.load_custom_node does: a package from
    its ``__init__.py`` under the module name ComfyUI gives it, the pack folder's path with "."
    replaced by "_x_" (README's folder ``custom_nodes/spare-unlearn`` is no identifier either)."""
    name = name or REPO.replace(".", "_x_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ model objects
class ModelType(enum.Enum):
    EPS = 1
    V_PREDICTION = 2
    V_PREDICTION_EDM = 3
    FLOW = 6
    FLUX = 8


class ComfyStyleUNet:
    """Factory for a tiny UNet2DConditionModel subclass with ComfyUI's UNetModel call convention."""

    @staticmethod
    def build(seed: int = 0, channels: tuple[int, int] = (16, 32)) -> nn.Module:
        from diffusers import UNet2DConditionModel

        class _UNet(UNet2DConditionModel):
            def forward(self, x, timesteps=None, context=None, y=None, control=None,
                        transformer_options=None, **kwargs):
                return super().forward(x, timesteps, encoder_hidden_states=context).sample

        torch.manual_seed(seed)
        return _UNet(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                     block_out_channels=channels, norm_num_groups=8, cross_attention_dim=32,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                     attention_head_dim=8).eval()


class ModelSamplingDiscrete(nn.Module):
    """SD's schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, sigmas from alpha-bar."""

    def __init__(self) -> None:
        super().__init__()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        self.register_buffer("sigmas", (((1 - ac) / ac) ** 0.5).float())


class BaseModel(nn.Module):
    def __init__(self, unet: nn.Module, model_type: ModelType = ModelType.EPS) -> None:
        super().__init__()
        self.diffusion_model = unet
        self.model_sampling = ModelSamplingDiscrete()
        self.model_type = model_type
        self.latent_format = SimpleNamespace(latent_channels=4)
        self.manual_cast_dtype = None
        self.current_weight_patches_uuid = None

    def get_dtype(self) -> torch.dtype:
        return self.diffusion_model.dtype

    def process_latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * 0.18215  # latent_formats.SD15.process_in

    def process_latent_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / 0.18215  # latent_formats.SD15.process_out


def store_weights_as(model: "ModelPatcher", storage: torch.dtype, compute: torch.dtype) -> None:
    """What UNETLoader(weight_dtype=fp8_e4m3fn) gives: Linear/Conv2d weights stored in
    ``storage`` and cast to ``compute`` at every call (comfy.ops.manual_cast:
    cast_bias_weight makes new tensors, the stored weights are never changed, then applies the
    layer's ``weight_function`` list to the cast weight), with
    ``BaseModel.manual_cast_dtype = compute``."""
    import torch.nn.functional as F

    with torch.inference_mode(False):
        for m in model.model.diffusion_model.modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            m.weight = nn.Parameter(m.weight.detach().to(storage), requires_grad=False)
            m.weight_function = []

            def forward(x, _m=m):
                w = _m.weight.to(x.dtype)
                for f in _m.weight_function:
                    w = f(w)
                b = None if _m.bias is None else _m.bias.to(x.dtype)
                if isinstance(_m, nn.Conv2d):
                    return _m._conv_forward(x, w, b)
                return F.linear(x, w, b)
            m.forward = forward
    model.model.manual_cast_dtype = compute


class VAE:
    """Deterministic stand-in: each 8x8 RGB patch -> 4 numbers by a fixed random projection,
    scaled so encoded images have roughly unit latent variance after ``process_latent_in``."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(4, 3 * 64, generator=g) / (3 * 64) ** 0.5 / 0.18215 * 2

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        b, h, w, c = pixels.shape
        x = (pixels.movedim(-1, 1) * 2 - 1).float()  # [B, 3, H, W] in [-1, 1]
        patches = torch.nn.functional.unfold(x, 8, stride=8)  # [B, 3*64, (H/8)*(W/8)]
        return (self.proj @ patches).reshape(b, 4, h // 8, w // 8)


def _get_attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_param(obj, path: str, value: torch.Tensor) -> None:
    """comfy.utils.set_attr_param: replaces the Parameter object (never writes into it)."""
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, nn.Parameter(value, requires_grad=False))


class ModelPatcher:
    def __init__(self, model: BaseModel) -> None:
        self.model = model
        self.patches: dict[str, list] = {}
        self.weight_wrapper_patches: dict[str, list] = {}
        self.backup: dict[str, Backup] = {}
        self.patches_uuid = uuid.uuid4()
        self.load_device = torch.device("cpu")

    def clone(self) -> "ModelPatcher":
        n = ModelPatcher(self.model)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.weight_wrapper_patches = self.weight_wrapper_patches.copy()
        n.patches_uuid = self.patches_uuid
        n.backup = self.backup
        return n

    def add_patches(self, patches, strength_patch: float = 1.0, strength_model: float = 1.0):
        keys = self.model.state_dict().keys()
        added = []
        for k, v in patches.items():
            if k in keys:
                self.patches.setdefault(k, []).append((strength_patch, v, strength_model, None, None))
                added.append(k)
        self.patches_uuid = uuid.uuid4()
        return added

    def add_weight_wrapper(self, name: str, function) -> None:
        """comfy/model_patcher.py: ``function`` joins the layer's ``weight_function`` at load."""
        self.weight_wrapper_patches[name] = self.weight_wrapper_patches.get(name, []) + [function]
        self.patches_uuid = uuid.uuid4()

    def get_model_object(self, name: str):
        return _get_attr(self.model, name)

    # -- what comfy.model_management.load_models_gpu does to the shared module
    def unpatch_model(self) -> None:
        for k, bk in self.backup.items():
            _set_param(self.model, k, bk.weight)
        self.backup.clear()
        for m in self.model.modules():  # as comfy's unpatch: the wrappers leave with the clone
            if hasattr(m, "weight_function"):
                m.weight_function = []
        self.model.current_weight_patches_uuid = None

    def patch_model(self) -> None:
        for key, plist in self.patches.items():
            weight = _get_attr(self.model, key)
            if key not in self.backup:
                self.backup[key] = Backup(weight, False)
            w = weight.detach().to(torch.float32, copy=True)
            for strength, value, strength_model, _, _ in plist:
                kind, args = value
                assert kind == "diff", f"the double only knows 'diff' patches, got {kind!r}"
                w = w * strength_model + strength * args[0].to(w)
            _set_param(self.model, key, w.to(weight.dtype))
        for name, m in self.model.named_modules():  # layers that cast their weight per call
            if hasattr(m, "weight_function"):
                m.weight_function = list(self.weight_wrapper_patches.get(f"{name}.weight", []))
                for f in m.weight_function:
                    if hasattr(f, "move_to"):
                        f.move_to(device=self.load_device)
        self.model.current_weight_patches_uuid = self.patches_uuid


class SDClipModel(nn.Module):
    """comfy/sd1_clip.py SDClipModel: ``transformer`` (``get_input_embeddings()`` is the token
    embedding, which ``process_tokens`` calls once per chunk row), ``special_tokens``; frozen.
    Its layers add their residuals in place, as comfy/clip_model.py CLIPLayer does (``x +=
    self.self_attn(self.layer_norm1(x), ...)``): same values, but what a LayerNorm saved for
    backward is changed afterwards."""

    def __init__(self, transformer: nn.Module, special_tokens: dict) -> None:
        super().__init__()
        self.transformer = transformer.requires_grad_(False)
        self.special_tokens = special_tokens
        for layer in getattr(transformer, "text_model", transformer).encoder.layers:
            def forward(hidden_states, attention_mask=None, _l=layer, **kwargs):
                x = hidden_states
                x += _l.self_attn(hidden_states=_l.layer_norm1(x), attention_mask=attention_mask,
                                  **kwargs)[0]
                x += _l.mlp(_l.layer_norm2(x))
                return x
            layer.forward = forward


class SD1ClipModel(nn.Module):
    """comfy/sd1_clip.py SD1ClipModel (SD2ClipModel with ``clip_name="h"``): the SDClipModel at
    attribute ``clip`` (``clip_l`` / ``clip_h``), ``clip_name`` the key of the token dict."""

    def __init__(self, model: SDClipModel, clip_name: str = "l") -> None:
        super().__init__()
        self.clip_name, self.clip = clip_name, f"clip_{clip_name}"
        setattr(self, self.clip, model)


class CLIP:
    def __init__(self, seed: int = 0, cond_gain: float = 8.0, clip_name: str = "l") -> None:
        tok = char_tokenizer(CHUNK)
        self.key = clip_name
        # SD1Tokenizer: the SDTokenizer at .clip_l (SD2Tokenizer: .clip_h), CLIPTokenizer inside
        self.tokenizer = SimpleNamespace(clip=f"clip_{clip_name}", clip_name=clip_name)
        setattr(self.tokenizer, self.tokenizer.clip, SimpleNamespace(tokenizer=tok))
        with torch.inference_mode():
            encoder = tiny_text_encoder(len(tok.get_vocab()), seed=seed, max_len=CHUNK)
            encoder.final_layer_norm.weight.mul_(cond_gain)  # make prompts matter
            special = {"start": tok.bos_token_id, "end": tok.eos_token_id, "pad": tok.eos_token_id}
            self.cond_stage_model = SD1ClipModel(SDClipModel(encoder, special), clip_name)

    @property
    def encoder(self) -> nn.Module:
        return getattr(self.cond_stage_model, self.cond_stage_model.clip).transformer

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        """comfy/sd.py CLIP.tokenize -> SDTokenizer.tokenize_with_weights for a prompt without
        ``(word:weight)`` emphasis or embeddings: start, the text's tokens, end, padded with the
        end token per chunk; ``(token, weight)``, or ``(token, weight, word_id)`` with
        ``return_word_ids`` (0 for start, end and padding; the host numbers each weighted
        segment from 1, so an unweighted prompt's tokens all have word id 1)."""
        tok = getattr(self.tokenizer, self.tokenizer.clip).tokenizer
        ids = tok(text, add_special_tokens=False, verbose=False).input_ids
        bos, eos = tok.bos_token_id, tok.eos_token_id
        body = CHUNK - 2
        chunks = [ids[i:i + body] for i in range(0, len(ids), body)] or [[]]
        rows = [[(bos, 1.0, 0), *[(t, 1.0, 1) for t in c], (eos, 1.0, 0)]
                + [(eos, 1.0, 0)] * (body - len(c)) for c in chunks]
        if not return_word_ids:
            rows = [[(t, w) for t, w, _ in row] for row in rows]
        return {self.key: rows}

    def encode_from_tokens(self, tokens: dict, return_pooled=False, return_dict=False):
        rows = [torch.tensor([[t for t, _ in chunk]]) for chunk in tokens[self.key]]
        outs = [self.encoder(ids) for ids in rows]  # one row at a time, as process_tokens
        cond = torch.cat([o.last_hidden_state for o in outs], 1)
        out = outs[0]
        if return_dict:
            return {"cond": cond, "pooled_output": out.pooler_output[:1]}
        return (cond, out.pooler_output[:1]) if return_pooled else cond


# ------------------------------------------------------------------ SDXL, SD3 and Flux MODELs
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """comfy/ldm/modules/diffusionmodules/util.py timestep_embedding: ``[cos, sin]``."""
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(max_period)) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None].to(t.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


ADM_EMBED = 8  # per size value (ComfyUI's SDXL: Timestep(256))


class ComfyStyleSDXLUNet:
    """Factory for a tiny SDXL-like UNet: diffusers UNet2DConditionModel whose class embedding
    (``class_embed_type="projection"``) reads the ADM vector ``y`` [B, pooled + 6 * ADM_EMBED], as
    ComfyUI's UNetModel with ``num_classes="sequential"`` reads it in ``label_emb``; called
    ``forward(x, timesteps, context=, y=, control=, transformer_options=)``."""

    @staticmethod
    def build(seed: int = 0, pooled: int = 32) -> nn.Module:
        from diffusers import UNet2DConditionModel

        class _UNet(UNet2DConditionModel):
            num_classes = "sequential"

            def forward(self, x, timesteps=None, context=None, y=None, control=None,
                        transformer_options=None, **kwargs):
                assert y is not None, "SDXL's UNet needs y (the ADM vector)"
                return super().forward(x, timesteps, encoder_hidden_states=context,
                                       class_labels=y).sample

        torch.manual_seed(seed)
        return _UNet(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                     block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                     use_linear_projection=True, class_embed_type="projection",
                     projection_class_embeddings_input_dim=pooled + 6 * ADM_EMBED).eval()


def _attention(q, k, v, heads: int) -> torch.Tensor:
    b, n, d = q.shape
    q, k, v = (z.reshape(b, -1, heads, d // heads).transpose(1, 2) for z in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, d)


def _pos_embed(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin/cos position embedding ``[h*w, dim]`` (no parameters)."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([timestep_embedding(ys.flatten(), dim // 2),
                      timestep_embedding(xs.flatten(), dim // 2)], dim=-1)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class _QKV(nn.Module):
    def __init__(self, hidden: int, proj: bool = True) -> None:
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden)
        if proj:
            self.proj = nn.Linear(hidden, hidden)


class _Lin(nn.Module):
    """Flux's Modulation: ``.lin``."""

    def __init__(self, hidden: int, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(hidden, n * hidden)

    def forward(self, vec):
        return self.lin(torch.nn.functional.silu(vec)).chunk(self.lin.out_features // vec.shape[-1], -1)


class _MLPEmbedder(nn.Module):
    def __init__(self, dim_in: int, hidden: int) -> None:
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(dim_in, hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(torch.nn.functional.silu(self.in_layer(x)))


class _DoubleBlock(nn.Module):
    """comfy/ldm/flux/layers.py DoubleStreamBlock's layout (img_/txt_ mod, attn, mlp)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", _Lin(hidden, 6))
            setattr(self, f"{s}_attn", _QKV(hidden))
            setattr(self, f"{s}_mlp", nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                                    nn.Linear(2 * hidden, hidden)))

    def forward(self, img, txt, vec):
        ln = lambda z: torch.nn.functional.layer_norm(z, z.shape[-1:])  # noqa: E731
        mi, mt = self.img_mod(vec), self.txt_mod(vec)
        qi, ki, vi = self.img_attn.qkv(_modulate(ln(img), mi[0], mi[1])).chunk(3, -1)
        qt, kt, vt = self.txt_attn.qkv(_modulate(ln(txt), mt[0], mt[1])).chunk(3, -1)
        a = _attention(torch.cat([qt, qi], 1), torch.cat([kt, ki], 1), torch.cat([vt, vi], 1),
                       self.heads)
        at, ai = a[:, :txt.shape[1]], a[:, txt.shape[1]:]
        img = img + mi[2][:, None] * self.img_attn.proj(ai)
        img = img + mi[5][:, None] * self.img_mlp(_modulate(ln(img), mi[3], mi[4]))
        txt = txt + mt[2][:, None] * self.txt_attn.proj(at)
        txt = txt + mt[5][:, None] * self.txt_mlp(_modulate(ln(txt), mt[3], mt[4]))
        return img, txt


class _SingleBlock(nn.Module):
    """SingleStreamBlock: fused ``linear1`` (qkv + mlp in), ``linear2``, ``modulation.lin``."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.hidden = heads, hidden
        self.linear1 = nn.Linear(hidden, 3 * hidden + 2 * hidden)
        self.linear2 = nn.Linear(hidden + 2 * hidden, hidden)
        self.modulation = _Lin(hidden, 3)

    def forward(self, x, vec):
        shift, scale, gate = self.modulation(vec)
        h = self.linear1(_modulate(torch.nn.functional.layer_norm(x, x.shape[-1:]), shift, scale))
        qkv, mlp = h.split([3 * self.hidden, 2 * self.hidden], -1)
        a = _attention(*qkv.chunk(3, -1), self.heads)
        return x + gate[:, None] * self.linear2(torch.cat([a, torch.nn.functional.gelu(mlp)], -1))


class _FinalLayer(nn.Module):
    def __init__(self, hidden: int, out: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, -1)
        return self.linear(_modulate(torch.nn.functional.layer_norm(x, x.shape[-1:]), shift, scale))


class ComfyStyleFlux(nn.Module):
    """A tiny Flux with comfy/ldm/flux/model.py's module names (``img_in``, ``time_in``,
    ``vector_in``, ``guidance_in``, ``txt_in``, ``double_blocks.N.{img,txt}_{mod.lin,attn.qkv,
    attn.proj,mlp.0,mlp.2}``, ``single_blocks.N.{linear1,linear2,modulation.lin}``,
    ``final_layer.{linear,adaLN_modulation.1}``) and its call ``forward(x, timestep, context,
    y=, guidance=, control=, transformer_options=)``: 2x2 patches, timestep ``s`` in [0, 1]
    embedded at ``1000 s``, guidance embedded likewise; fixed sin/cos positions instead of RoPE."""

    def __init__(self, channels: int = 16, hidden: int = 32, context: int = 32, pooled: int = 32,
                 heads: int = 2, depth: int = 1, depth_single: int = 1) -> None:
        super().__init__()
        self.patch_size, self.hidden, self.heads = 2, hidden, heads
        self.img_in = nn.Linear(channels * 4, hidden)
        self.time_in = _MLPEmbedder(16, hidden)
        self.vector_in = _MLPEmbedder(pooled, hidden)
        self.guidance_in = _MLPEmbedder(16, hidden)
        self.txt_in = nn.Linear(context, hidden)
        self.double_blocks = nn.ModuleList(_DoubleBlock(hidden, heads) for _ in range(depth))
        self.single_blocks = nn.ModuleList(_SingleBlock(hidden, heads) for _ in range(depth_single))
        self.final_layer = _FinalLayer(hidden, 4 * channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def forward(self, x, timestep, context, y=None, guidance=None, control=None,
                transformer_options={}, **kwargs):
        assert y is not None, "Flux needs y (the pooled CLIP vector)"
        b, c, h, w = x.shape
        img = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
        img = self.img_in(img) + _pos_embed(h // 2, w // 2, self.hidden).to(x)
        vec = self.time_in(timestep_embedding(1000 * timestep, 16).to(x))
        if guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(1000 * guidance, 16).to(x))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(context)
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec)
        joint = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            joint = block(joint, vec=vec)
        out = self.final_layer(joint[:, txt.shape[1]:], vec)
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class _DismantledBlock(nn.Module):
    """comfy/ldm/modules/diffusionmodules/mmdit.py DismantledBlock: ``attn.qkv``, ``attn.proj``,
    ``mlp.fc1``, ``mlp.fc2``, ``adaLN_modulation.1``; ``pre_only`` (the last context block):
    only ``attn.qkv`` and a 2-way modulation."""

    def __init__(self, hidden: int, pre_only: bool = False) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.attn = _QKV(hidden, proj=not pre_only)
        if not pre_only:
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, (2 if pre_only else 6) * hidden))

    def pre(self, x, c):
        m = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, -1)
        return self.attn.qkv(_modulate(torch.nn.functional.layer_norm(x, x.shape[-1:]), m[0], m[1])), m

    def post(self, x, a, m):
        x = x + m[2][:, None] * self.attn.proj(a)
        h = _modulate(torch.nn.functional.layer_norm(x, x.shape[-1:]), m[3], m[4])
        return x + m[5][:, None] * self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(h)))


class _JointBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, pre_only: bool) -> None:
        super().__init__()
        self.heads = heads
        self.context_block = _DismantledBlock(hidden, pre_only)
        self.x_block = _DismantledBlock(hidden)

    def forward(self, context, x, c):
        qkv_c, mc = self.context_block.pre(context, c)
        qkv_x, mx = self.x_block.pre(x, c)
        q, k, v = torch.cat([qkv_c, qkv_x], 1).chunk(3, -1)
        a = _attention(q, k, v, self.heads)
        ac, ax = a[:, :context.shape[1]], a[:, context.shape[1]:]
        context = None if self.context_block.pre_only else self.context_block.post(context, ac, mc)
        return context, self.x_block.post(x, ax, mx)


class ComfyStyleMMDiT(nn.Module):
    """A tiny SD3 MMDiT with mmdit.py's module names (``x_embedder.proj`` (Conv2d 2x2 patches),
    ``t_embedder.mlp.{0,2}``, ``y_embedder.mlp.{0,2}``, ``context_embedder``,
    ``joint_blocks.N.{context_block,x_block}.*``, ``final_layer.*``) called as
    OpenAISignatureMMDITWrapper: ``forward(x, timesteps, context=, y=, control=,
    transformer_options=)`` with timesteps ``1000 s``."""

    def __init__(self, channels: int = 16, hidden: int = 32, context: int = 32, pooled: int = 32,
                 heads: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.hidden = hidden
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(channels, hidden, 2, stride=2)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(16, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embedder = nn.Module()
        self.y_embedder.mlp = nn.Sequential(nn.Linear(pooled, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.context_embedder = nn.Linear(context, hidden)
        self.joint_blocks = nn.ModuleList(_JointBlock(hidden, heads, pre_only=i == depth - 1)
                                          for i in range(depth))
        self.final_layer = _FinalLayer(hidden, 4 * channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.context_embedder.weight.dtype

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={},
                **kwargs):
        assert y is not None, "SD3 needs y (the pooled CLIP vector)"
        b, c, h, w = x.shape
        img = self.x_embedder.proj(x).flatten(2).transpose(1, 2)
        img = img + _pos_embed(h // 2, w // 2, self.hidden).to(x)
        vec = self.t_embedder.mlp(timestep_embedding(timesteps, 16).to(x)) + self.y_embedder.mlp(y)
        ctx = self.context_embedder(context)
        for block in self.joint_blocks:
            ctx, img = block(ctx, img, vec)
        out = self.final_layer(img, vec)
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class ModelSamplingDiscreteFlow(nn.Module):
    """comfy/model_sampling.py: ``sigmas = shift t / (1 + (shift - 1) t)`` for t = i/T, i = 1..T;
    ``timestep(sigma) = sigma * multiplier`` (SD3: shift 3, multiplier 1000)."""

    def __init__(self, shift: float = 3.0, multiplier: float = 1000.0, timesteps: int = 1000) -> None:
        super().__init__()
        self.shift, self.multiplier = shift, multiplier
        t = torch.arange(1, timesteps + 1, dtype=torch.float32) / timesteps
        self.register_buffer("sigmas", shift * t / (1 + (shift - 1) * t))

    def timestep(self, sigma):
        return sigma * self.multiplier


class ModelSamplingFlux(nn.Module):
    """comfy/model_sampling.py ModelSamplingFlux: 10000 sigmas ``flux_time_shift(shift, 1, t)``
    (``e^mu / (e^mu + (1/t - 1))``, mu = shift = 1.15), ``timestep(sigma) = sigma``."""

    def __init__(self, shift: float = 1.15, timesteps: int = 10000) -> None:
        super().__init__()
        t = torch.arange(1, timesteps + 1, dtype=torch.float32) / timesteps
        mu = torch.tensor(shift).exp()
        self.register_buffer("sigmas", mu / (mu + (1 / t - 1)))

    def timestep(self, sigma):
        return sigma


class SDXL(BaseModel):
    """model_base.SDXL: ``encode_adm`` = pooled text + Timestep embeddings of (height, width,
    crop_h, crop_w, target_height, target_width), here ADM_EMBED numbers each (ComfyUI: 256)."""

    def __init__(self, unet: nn.Module, model_type: ModelType = ModelType.EPS) -> None:
        super().__init__(unet, model_type)
        self.adm_calls: list[dict] = []

    def encode_adm(self, **kwargs):
        self.adm_calls.append(dict(kwargs))
        pooled = kwargs["pooled_output"]
        width, height = kwargs.get("width", 768), kwargs.get("height", 768)
        values = [height, width, kwargs.get("crop_h", 0), kwargs.get("crop_w", 0),
                  kwargs.get("target_height", height), kwargs.get("target_width", width)]
        flat = torch.cat([timestep_embedding(torch.Tensor([v]), ADM_EMBED) for v in values])
        flat = flat.flatten().unsqueeze(0).repeat(pooled.shape[0], 1)
        return torch.cat((pooled.to(flat.device), flat), dim=1)


class SD3(BaseModel):
    """model_base.SD3: an MMDiT over ModelSamplingDiscreteFlow (FLOW), 16-channel latents."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net, ModelType.FLOW)
        self.model_sampling = ModelSamplingDiscreteFlow(shift=3.0, multiplier=1000.0)
        self.latent_format = SimpleNamespace(latent_channels=16)

    def get_dtype(self) -> torch.dtype:
        return self.diffusion_model.dtype


class Flux(BaseModel):
    """model_base.Flux: ModelSamplingFlux (FLUX), 16-channel latents (schnell: FLOW with
    ModelSamplingDiscreteFlow, multiplier 1)."""

    def __init__(self, net: nn.Module, model_type: ModelType = ModelType.FLUX) -> None:
        super().__init__(net, model_type)
        self.model_sampling = (ModelSamplingFlux() if model_type == ModelType.FLUX
                               else ModelSamplingDiscreteFlow(shift=1.0, multiplier=1.0))
        self.latent_format = SimpleNamespace(latent_channels=16)

    def get_dtype(self) -> torch.dtype:
        return self.diffusion_model.dtype


def build_family_model(family: str, seed: int = 0, **kwargs) -> BaseModel:
    """The BaseModel subclass ComfyUI's loader builds for ``family`` ("sdxl", "sd3", "flux",
    "flux_schnell"), with a tiny network seeded by ``seed``."""
    if family == "sdxl":
        return SDXL(ComfyStyleSDXLUNet.build(seed), kwargs.get("model_type", ModelType.EPS))
    torch.manual_seed(seed)
    if family == "sd3":
        return SD3(ComfyStyleMMDiT(**kwargs).eval())
    if family in ("flux", "flux_schnell"):
        net = ComfyStyleFlux(**kwargs).eval()
        return Flux(net, ModelType.FLUX if family == "flux" else ModelType.FLOW)
    raise ValueError(family)


# ------------------------------------------------------------------ the host
class InterruptProcessingException(Exception):
    pass


class Host:
    """One fake ComfyUI: a base folder with models/loras, the fake modules, and records of what
    the pack did (progress updates, LoRA warnings)."""

    def __init__(self, base_dir: str) -> None:
        self.base_dir = base_dir
        self.loras = os.path.join(base_dir, "models", "loras")
        os.makedirs(self.loras, exist_ok=True)
        self.progress: list[tuple[int, int]] = []
        self.warnings: list[str] = []
        self.loaded: list[ModelPatcher] = []
        self._interrupt = False
        self._interrupt_after: int | None = None
        self.free_memory = 1 << 40  # bytes get_free_memory reports

    # -- fake modules
    def modules(self) -> dict[str, types.ModuleType]:
        host = self
        comfy = types.ModuleType("comfy")
        mm = types.ModuleType("comfy.model_management")
        utils = types.ModuleType("comfy.utils")
        fp = types.ModuleType("folder_paths")

        def load_models_gpu(models, memory_required=0, force_patch_weights=False,
                            minimum_memory_required=None, force_full_load=False):
            for m in models:
                host.load(m)

        def throw_exception_if_processing_interrupted():
            if host._interrupt:
                host._interrupt = False
                raise InterruptProcessingException()

        def interrupt_current_processing(value=True):
            host._interrupt = value

        def get_free_memory(dev=None, torch_free_too=False):
            return host.free_memory

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.current = total, 0

            def update_absolute(self, value, total=None, preview=None):
                if total is not None:
                    self.total = total
                self.current = min(value, self.total)
                host.progress.append((self.current, self.total))
                if host._interrupt_after is not None and len(host.progress) >= host._interrupt_after:
                    host._interrupt_after, host._interrupt = None, True

        def get_folder_paths(name):
            return [host.loras] if name == "loras" else []

        def get_filename_list(name):
            out = []
            for root in get_folder_paths(name):
                for d, _, files in os.walk(root):
                    out += [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                            for f in files if f.endswith((".safetensors", ".ckpt", ".pt"))]
            return sorted(out)

        def get_full_path(name, filename):
            for root in get_folder_paths(name):
                path = os.path.join(root, os.path.relpath(os.path.join("/", filename), "/"))
                if os.path.isfile(path):
                    return path
            return None

        def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
            subfolder = os.path.dirname(os.path.normpath(filename_prefix))
            filename = os.path.basename(os.path.normpath(filename_prefix))
            folder = os.path.join(output_dir, subfolder)
            if os.path.commonpath((output_dir, os.path.abspath(folder))) != output_dir:
                # as the host: a plain Exception (logged there too), not a ValueError
                raise Exception("**** ERROR: Saving image outside the output folder is not allowed."
                                f"\n full_output_folder: {os.path.abspath(folder)}"
                                f"\n         output_dir: {output_dir}")
            os.makedirs(folder, exist_ok=True)
            pattern = re.compile(re.escape(filename) + r"_(\d+)_")
            found = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))]
            return folder, filename, max(found, default=0) + 1, subfolder, filename_prefix

        mm.load_models_gpu = load_models_gpu
        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
        mm.interrupt_current_processing = interrupt_current_processing
        mm.get_free_memory = get_free_memory
        mm.InterruptProcessingException = InterruptProcessingException
        utils.ProgressBar = ProgressBar
        fp.get_folder_paths, fp.get_filename_list = get_folder_paths, get_filename_list
        fp.get_full_path, fp.get_save_image_path = get_full_path, get_save_image_path
        comfy.model_management, comfy.utils = mm, utils
        return {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils,
                "folder_paths": fp}

    def install(self, monkeypatch) -> "Host":
        for name, module in self.modules().items():
            monkeypatch.setitem(sys.modules, name, module)
        return self

    # -- host behaviour
    def interrupt_after(self, updates: int) -> None:
        """Press Cancel once the pack has made ``updates`` more progress updates."""
        self._interrupt_after = len(self.progress) + updates

    def load(self, patcher: ModelPatcher) -> None:
        base = patcher.model
        if base.current_weight_patches_uuid != patcher.patches_uuid:
            patcher.unpatch_model()
            patcher.patch_model()
        self.loaded.append(patcher)

    def load_checkpoint(self, seed: int = 0, model_type: ModelType = ModelType.EPS,
                        channels: tuple[int, int] = (16, 32)):
        """CheckpointLoaderSimple: (MODEL, CLIP), built under inference mode."""
        with torch.inference_mode():
            model = ModelPatcher(BaseModel(ComfyStyleUNet.build(seed, channels), model_type))
        return model, CLIP(seed)

    def load_family(self, family: str, seed: int = 0, **kwargs):
        """CheckpointLoaderSimple for an SDXL / SD3 / Flux checkpoint (see
        :func:`build_family_model`): (MODEL, CLIP), built under inference mode."""
        with torch.inference_mode():
            model = ModelPatcher(build_family_model(family, seed, **kwargs))
        return model, CLIP(seed)

    @torch.inference_mode()
    def forward(self, model: ModelPatcher, x: torch.Tensor, t: torch.Tensor, **conds):
        """The raw network output a sampler step gets from this MODEL (its patches loaded
        first): ``diffusion_model(x, t, control=None, transformer_options={}, **conds)``, conds
        as the model's extra_conds give them (``context``, ``y``, ``guidance``)."""
        self.load(model)
        return model.model.diffusion_model(x, t.float(), control=None, transformer_options={},
                                           **conds).clone()

    def run(self, node_cls, **inputs):
        """execution.py: check inputs against INPUT_TYPES, call FUNCTION under inference mode,
        return the output tuple (``result`` of a ui dict)."""
        spec = node_cls.INPUT_TYPES()
        required, optional = spec.get("required", {}), spec.get("optional", {})
        missing = [k for k in required if k not in inputs]
        unknown = [k for k in inputs if k not in required and k not in optional]
        assert not missing and not unknown, f"missing {missing}, unknown {unknown}"
        for k, v in inputs.items():
            kind = (required.get(k) or optional.get(k))[0]
            if isinstance(kind, list):
                assert v in kind, f"{k}={v!r} is not one of the combo's options {kind}"
        with torch.inference_mode():
            out = getattr(node_cls(), node_cls.FUNCTION)(**inputs)
        if isinstance(out, dict):
            out = out["result"]
        assert isinstance(out, tuple) and len(out) == len(node_cls.RETURN_TYPES)
        return out

    def load_lora(self, model: ModelPatcher, lora: dict, strength: float = 1.0) -> ModelPatcher:
        """LoraLoader (model part) over a state dict in ComfyUI/kohya key format."""
        sd_keys = [k for k in model.model.state_dict() if k.startswith("diffusion_model.")]
        key_map = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_"): k
                   for k in sd_keys if k.endswith(".weight")}
        patches, used = {}, set()
        for prefix, key in key_map.items():
            up, down = lora.get(f"{prefix}.lora_up.weight"), lora.get(f"{prefix}.lora_down.weight")
            if up is not None and down is not None:
                alpha = lora.get(f"{prefix}.alpha")
                scale = 1.0 if alpha is None else alpha.item() / down.shape[0]
                shape = _get_attr(model.model, key).shape
                diff = torch.mm(up.flatten(start_dim=1).float(), down.flatten(start_dim=1).float())
                patches[key] = ("diff", (diff.reshape(shape) * scale,))
                used |= {f"{prefix}.lora_up.weight", f"{prefix}.lora_down.weight", f"{prefix}.alpha"}
            elif f"{prefix}.diff" in lora:
                patches[key] = ("diff", (lora[f"{prefix}.diff"],))
                used.add(f"{prefix}.diff")
        self.warnings += [f"lora key not loaded: {k}" for k in lora if k not in used]
        clone = model.clone()
        clone.add_patches(patches, strength)
        return clone

    @torch.inference_mode()
    def eps(self, model: ModelPatcher, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
        """The UNet output a sampler would get from this MODEL (its patches loaded first)."""
        self.load(model)
        return model.model.diffusion_model(x, t.float(), context=context).clone()


# ------------------------------------------------------------------ /object_info and prompt checks
FILE_LIST = None
"""Combo whose options are the files of a models folder (any name is accepted here)."""

STOCK_NODES: dict[str, dict] = {
    # The stock nodes the shipped workflows use, as server.py's /object_info describes them
    # (ComfyUI a125cd8): inputs in order, with the options the checks read; outputs.
    # tests/test_comfy_real.py checks this table against a real ComfyUI's /object_info.
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [FILE_LIST, {}]}},
                               "output": ["MODEL", "CLIP", "VAE"]},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}],
                                              "clip": ["CLIP", {}]}},
                       "output": ["CONDITIONING"]},
    "EmptyLatentImage": {"input": {"required": {
        "width": ["INT", {"default": 512, "min": 16, "max": 16384}],
        "height": ["INT", {"default": 512, "min": 16, "max": 16384}],
        "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}]}}, "output": ["LATENT"]},
    "KSampler": {"input": {"required": {
        "model": ["MODEL", {}],
        "seed": ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                         "control_after_generate": True}],
        "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
        "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}],
        "sampler_name": [["euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m",
                          "dpmpp_2m_sde", "ddim", "uni_pc"], {}],
        "scheduler": [["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                       "normal"], {}],
        "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}],
        "latent_image": ["LATENT", {}],
        "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}]}}, "output": ["LATENT"]},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}},
                  "output": ["IMAGE"]},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}],
                                         "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
                  "output": [], "output_node": True},
    "PreviewImage": {"input": {"required": {"images": ["IMAGE", {}]}}, "output": [],
                     "output_node": True},
    "LoraLoader": {"input": {"required": {
        "model": ["MODEL", {}], "clip": ["CLIP", {}], "lora_name": [FILE_LIST, {}],
        "strength_model": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0}],
        "strength_clip": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0}]}},
        "output": ["MODEL", "CLIP"]},
    "CheckpointSave": {"input": {"required": {
        "model": ["MODEL", {}], "clip": ["CLIP", {}], "vae": ["VAE", {}],
        "filename_prefix": ["STRING", {"default": "checkpoints/ComfyUI"}]}},
        "output": [], "output_node": True},
    # the SDXL and Flux variants' loaders and Flux's guidance / 16-channel latent
    "UNETLoader": {"input": {"required": {
        "unet_name": [FILE_LIST, {}],
        "weight_dtype": [["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"], {}]}},
        "output": ["MODEL"]},
    "DualCLIPLoader": {"input": {"required": {
        "clip_name1": [FILE_LIST, {}], "clip_name2": [FILE_LIST, {}],
        "type": [["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"], {}]},
        "optional": {"device": [["default", "cpu"], {"advanced": True}]}},
        "output": ["CLIP"]},
    "VAELoader": {"input": {"required": {"vae_name": [FILE_LIST, {}]}}, "output": ["VAE"]},
    "FluxGuidance": {"input": {"required": {
        "conditioning": ["CONDITIONING", {}],
        "guidance": ["FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0}]}},
        "output": ["CONDITIONING"]},
    "EmptySD3LatentImage": {"input": {"required": {
        "width": ["INT", {"default": 1024, "min": 16, "max": 16384}],
        "height": ["INT", {"default": 1024, "min": 16, "max": 16384}],
        "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}]}}, "output": ["LATENT"]},
    "SaveLatent": {"input": {"required": {"samples": ["LATENT", {}],
                                          "filename_prefix": ["STRING", {"default": "latents/ComfyUI"}]}},
                   "output": [], "output_node": True},
}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def node_info(cls) -> dict:
    """server.py's node_info() for a V1 node class (the parts the checks read)."""
    spec = cls.INPUT_TYPES()
    return {"input": {k: {n: list(v) for n, v in spec.get(k, {}).items()}
                      for k in ("required", "optional") if k in spec},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}


def object_info(mappings: dict) -> dict:
    """/object_info for the stock table plus the given NODE_CLASS_MAPPINGS."""
    info = {k: {"output_node": False, **v} for k, v in STOCK_NODES.items()}
    info.update({name: node_info(cls) for name, cls in mappings.items()})
    return info


def _inputs(defn: dict) -> list[tuple[str, object, dict, bool]]:
    """(name, type, options, required) in INPUT_TYPES order."""
    out = []
    for section in ("required", "optional"):
        for name, spec in defn["input"].get(section, {}).items():
            out.append((name, spec[0], spec[1] if len(spec) > 1 else {}, section == "required"))
    return out


def is_widget(kind) -> bool:
    """A widget input: a file list, a V1 combo (its options as the type), a V3 combo (type
    ``"COMBO"``, the options in its dict, as comfy_api's io.Combo describes it) or a literal."""
    return kind is FILE_LIST or isinstance(kind, list) or kind == "COMBO" or kind in WIDGET_TYPES


def check_value(where: str, kind, opts: dict, value) -> list[str]:
    """execution.validate_inputs for one literal (widget) value."""
    if kind is FILE_LIST:
        return [] if isinstance(value, str) and value else [f"{where}: file name expected, got {value!r}"]
    if isinstance(kind, list) or kind == "COMBO":
        options = kind if isinstance(kind, list) else opts.get("options", [])
        return [] if value in options else [f"{where}: {value!r} is not one of {options}"]
    ok = {"INT": isinstance(value, int) and not isinstance(value, bool),
          "FLOAT": isinstance(value, (int, float)) and not isinstance(value, bool),
          "STRING": isinstance(value, str), "BOOLEAN": isinstance(value, bool)}[kind]
    if not ok:
        return [f"{where}: {kind} expected, got {value!r}"]
    errors = []
    if kind in ("INT", "FLOAT"):
        if "min" in opts and value < opts["min"]:
            errors.append(f"{where}: {value} < min {opts['min']}")
        if "max" in opts and value > opts["max"]:
            errors.append(f"{where}: {value} > max {opts['max']}")
    return errors


def validate_api_prompt(prompt: dict, info: dict) -> list[str]:
    """Errors of an API-format prompt (POST /prompt body's "prompt") against /object_info."""
    errors = []
    for nid, node in prompt.items():
        cls = node.get("class_type")
        if cls not in info:
            errors.append(f"node {nid}: unknown node type {cls!r}")
            continue
        defs = {name: (kind, opts, req) for name, kind, opts, req in _inputs(info[cls])}
        given = node.get("inputs", {})
        errors += [f"node {nid} ({cls}): missing required input {n!r}"
                   for n, (_, _, req) in defs.items() if req and n not in given]
        for name, value in given.items():
            where = f"node {nid} ({cls}).{name}"
            if name not in defs:
                errors.append(f"{where}: no such input")
                continue
            kind, opts, _ = defs[name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src = prompt.get(value[0])
                if src is None or src.get("class_type") not in info:
                    errors.append(f"{where}: links to missing node {value[0]!r}")
                    continue
                outs = info[src["class_type"]]["output"]
                if not 0 <= value[1] < len(outs):
                    errors.append(f"{where}: output slot {value[1]} of node {value[0]} does not exist")
                elif is_widget(kind) or outs[value[1]] != kind:
                    errors.append(f"{where}: {kind} input linked to a {outs[value[1]]} output")
            elif not is_widget(kind):
                errors.append(f"{where}: {kind} input needs a link, got {value!r}")
            else:
                errors += check_value(where, kind, opts, value)
    return errors


def widget_slots(defn: dict) -> list[tuple[str, object, dict]]:
    """The frontend's widgets_values layout: widget inputs in order, each INT with
    ``control_after_generate`` followed by its control value."""
    slots = []
    for name, kind, opts, _ in _inputs(defn):
        if is_widget(kind):
            slots.append((name, kind, opts))
            if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                slots.append((name + ":control", ["fixed", "increment", "decrement", "randomize"], {}))
    return slots


def validate_ui_workflow(wf: dict, info: dict) -> list[str]:
    """Errors of a UI-format (LiteGraph) workflow against /object_info: node types, socket
    inputs and outputs, widgets_values, and that every link joins matching types both ways."""
    errors = []
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        cls, nid = n["type"], n["id"]
        if cls not in info:
            errors.append(f"node {nid}: unknown node type {cls!r}")
            continue
        defn = info[cls]
        sockets = {name: kind for name, kind, _, _ in _inputs(defn) if not is_widget(kind)}
        for inp in n.get("inputs", []):
            if inp.get("widget"):
                continue
            if sockets.get(inp["name"]) != inp["type"]:
                errors.append(f"node {nid} ({cls}): input {inp['name']}:{inp['type']} not in INPUT_TYPES")
        missing = set(sockets) - {i["name"] for i in n.get("inputs", [])}
        required = {name for name, kind, _, req in _inputs(defn) if req and not is_widget(kind)}
        errors += [f"node {nid} ({cls}): socket {m!r} missing" for m in sorted(missing & required)]
        if [o["type"] for o in n.get("outputs", [])] != list(defn["output"]):
            errors.append(f"node {nid} ({cls}): outputs {[o['type'] for o in n.get('outputs', [])]} "
                          f"!= {defn['output']}")
        slots, values = widget_slots(defn), n.get("widgets_values", [])
        if len(values) != len(slots):
            errors.append(f"node {nid} ({cls}): {len(values)} widgets_values for {len(slots)} widgets "
                          f"{[s[0] for s in slots]}")
        for (name, kind, opts), value in zip(slots, values):
            errors += check_value(f"node {nid} ({cls}).{name}", kind, opts, value)
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        a, b = nodes.get(src), nodes.get(dst)
        if a is None or b is None:
            errors.append(f"link {link_id}: joins a missing node")
            continue
        out, inp = a["outputs"][src_slot], b["inputs"][dst_slot]
        if not (out["type"] == inp["type"] == kind):
            errors.append(f"link {link_id}: {a['type']}.{out['name']}:{out['type']} -> "
                          f"{b['type']}.{inp['name']}:{inp['type']} (link says {kind})")
        if inp.get("link") != link_id or link_id not in (out.get("links") or []):
            errors.append(f"link {link_id}: not recorded on both ends")
    return errors


def readme_bake_entry() -> dict:
    """The API entry (a stock CheckpointSave) that workflows/README.md gives for baking the
    patched model into a checkpoint headless."""
    with open(os.path.join(REPO, "workflows", "README.md")) as f:
        text = f.read()
    return json.loads(text.split("## Bake into a checkpoint", 1)[1]
                      .split("```json\n", 1)[1].split("```", 1)[0])


MUTED, BYPASSED = 2, 4
"""LiteGraph node modes the frontend leaves out of the queued prompt (Ctrl+M, Ctrl+B)."""


def ui_to_api(wf: dict, info: dict) -> dict:
    """What the frontend queues for a UI workflow (graphToPrompt): literal widget values and
    [node id, slot] links, without the control_after_generate values. Muted and bypassed nodes
    are left out; an input fed by a bypassed node is fed by whatever feeds that node's first
    input of the same type (the same slot first), an input fed by a muted node by nothing (the
    frontend drops links to nodes it left out)."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}

    def source(link_id: int) -> list | None:
        _, src, slot, _, _, kind = links[link_id]
        while nodes[src].get("mode", 0) in (MUTED, BYPASSED):
            if nodes[src]["mode"] == MUTED:
                return None
            ins = nodes[src].get("inputs", [])
            order = ([slot] if slot < len(ins) else []) + list(range(len(ins)))
            match = next((ins[i] for i in order if ins[i]["type"] == kind), None)
            if match is None or match.get("link") is None:  # first match taken, linked or not
                return None
            through = match["link"]
            _, src, slot, _, _, _ = links[through]
        return [str(src), slot]

    prompt = {}
    for nid, n in nodes.items():
        if n.get("mode", 0) in (MUTED, BYPASSED):
            continue
        inputs = {}
        for (name, _, _), value in zip(widget_slots(info[n["type"]]), n.get("widgets_values", [])):
            if not name.endswith(":control"):
                inputs[name] = value
        for inp in n.get("inputs", []):
            if inp.get("link") is not None and (src := source(inp["link"])) is not None:
                inputs[inp["name"]] = src
        prompt[str(nid)] = {"class_type": n["type"], "inputs": inputs}
    return prompt
