"""Export an adapter to formats other tools load.

- ComfyUI / kohya (A1111, Forge): ``lora_unet_<module with . as _>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha`` for dense low-rank modules; ``.diff`` (full weight difference)
  where an element mask or a masked full delta makes the update not low-rank.
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (scale folded into B);
  masked modules are written at full rank via an SVD of their dense delta, which reproduces it
  exactly (up to float rounding), so ``pipe.load_lora_weights`` gives the same weights.
- merged: :func:`merge_into_unet` adds the adapter's deltas to a UNet's weights for good;
  :func:`save_merged_pipeline` writes a diffusers pipeline folder with the erased UNet (nothing
  to unplug: what one ships when the model is distributed).

A text-encoder adapter (``adapter.root == "text_encoder"``, the first block of SD1.x/SD2.x's
CLIP) exports with the text encoder's names: ``lora_te_text_model_encoder_layers_0_...``
(what ComfyUI's ``model_lora_keys_clip`` maps onto SD1.x's clip_l, and kohya writes), and
``text_encoder.text_model.encoder.layers.0....lora_A.weight`` (what diffusers'
``load_lora_weights`` hands to the text encoder); merged, it is baked into ``text_encoder/``.
"""
from __future__ import annotations

import os
import shutil

import torch
from torch import Tensor, nn

from .adapter import UnlearnAdapter, is_dense_lora, svd_factors
from .families import adaptable_modules
from .text_encoder import TEXT_ENCODER, lora_name

# top-level module names of the CompVis/LDM UNet (ComfyUI's, A1111's) and of ComfyUI's own SD3 /
# Flux DiTs; diffusers names its parts down_blocks / mid_block / up_blocks / conv_in /
# time_embedding / ... and transformer_blocks / single_transformer_blocks / x_embedder / ...
COMPVIS_PREFIXES = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb",
                    "out", "diffusion_model", "double_blocks", "single_blocks", "joint_blocks",
                    "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer",
                    "t_embedder", "y_embedder")
DIFFUSERS_DIT_PREFIXES = ("transformer_blocks", "single_transformer_blocks", "pos_embed",
                          "x_embedder", "context_embedder", "time_text_embed", "norm_out",
                          "proj_out")


def is_diffusers_transformer(names) -> bool:
    """True when module names are a diffusers transformer's (SD3, Flux, digits-dit): their
    LoRA keys are ``transformer.*`` (diffusers, ComfyUI) / ``lora_transformer_*`` (kohya-style,
    which ComfyUI reads for SD3 and Flux). ``context_embedder`` and ``x_embedder`` are also
    ComfyUI SD3 names: beside ComfyUI's own block names they are ComfyUI's."""
    heads = {n.split(".", 1)[0] for n in names}
    return bool(heads & set(DIFFUSERS_DIT_PREFIXES)) and not heads & set(COMPVIS_PREFIXES)


def check_diffusers_names(adapter: UnlearnAdapter) -> None:
    """ValueError if the adapter addresses a CompVis-layout UNet (trained through the ComfyUI
    backend): diffusers cannot map those names, and a LoRA written with them would load as a
    silent no-op."""
    bad = [n for n in adapter.names if n.split(".", 1)[0] in COMPVIS_PREFIXES]
    if bad:
        raise ValueError(
            f"adapter modules have CompVis/ComfyUI names (e.g. {bad[0]!r}), which diffusers cannot "
            "map; export it as a ComfyUI/kohya LoRA instead (to_comfy_lora, or --format comfy), "
            "which ComfyUI, A1111 and Forge load")


def _file_names(adapter: UnlearnAdapter) -> dict[str, str]:
    """Module name -> the name LoRA files use for it (the text transformer's ``text_model.``
    prefix for a text-encoder adapter, else the name itself)."""
    text = adapter.root == TEXT_ENCODER
    return {n: lora_name(n) if text else n for n in adapter.names}


def to_comfy_lora(adapter: UnlearnAdapter, prefix: str | None = None) -> dict[str, Tensor]:
    """State dict for ComfyUI's LoraLoader (strength of the adapter folded in). Key prefix by
    family: ``lora_unet_`` for UNets (diffusers or CompVis names: ComfyUI maps both, SD1.x to
    SDXL) and for ComfyUI-named DiTs; ``lora_transformer_`` for diffusers-named DiTs (ComfyUI's
    SD3 and Flux key maps); ``lora_te_`` for a text-encoder adapter (ComfyUI's SD1.x clip_l)."""
    if prefix is None:
        prefix = ("lora_te_" if adapter.root == TEXT_ENCODER else "lora_transformer_"
                  if is_diffusers_transformer(adapter.names) else "lora_unet_")
    out: dict[str, Tensor] = {}
    s = float(adapter.strength)
    for n, name in _file_names(adapter).items():
        d = adapter[n]
        key = prefix + name.replace(".", "_")
        if is_dense_lora(d):
            shape = d.weight_shape
            down = d.lora_A.detach().float().reshape(d.rank, *shape[1:])
            up = (d.lora_B.detach().float() * s)
            if len(shape) == 4:
                up = up.reshape(shape[0], d.rank, 1, 1)
            out[f"{key}.lora_down.weight"] = down.contiguous()
            out[f"{key}.lora_up.weight"] = up.contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(d.alpha))
        else:
            with torch.no_grad():
                out[f"{key}.diff"] = (d.delta().float() * s).contiguous()
    return out


def to_diffusers_lora(adapter: UnlearnAdapter, prefix: str | None = None) -> dict[str, Tensor]:
    """PEFT-style state dict for ``pipe.load_lora_weights`` / ``load_lora_adapter``: keys
    ``unet.*`` for UNets, ``transformer.*`` for DiTs (chosen from the names unless ``prefix``),
    ``text_encoder.text_model.*`` for a text-encoder adapter.

    Module names must be diffusers names (adapters trained on the diffusers backend are); an
    adapter trained through ComfyUI (CompVis / ComfyUI DiT names) raises ValueError naming the
    fix.
    """
    check_diffusers_names(adapter)
    if prefix is None:
        prefix = ("text_encoder." if adapter.root == TEXT_ENCODER else "transformer."
                  if is_diffusers_transformer(adapter.names) else "unet.")
    out: dict[str, Tensor] = {}
    s = float(adapter.strength)
    for n, name in _file_names(adapter).items():
        d = adapter[n]
        shape = d.weight_shape
        with torch.no_grad():
            if is_dense_lora(d):
                a = d.lora_A.detach().float()
                b = d.lora_B.detach().float() * (d.scale * s)
            else:
                a, b = svd_factors(d.delta().float().reshape(shape[0], -1) * s)
        r = a.shape[0]
        if len(shape) == 4:
            a, b = a.reshape(r, *shape[1:]), b.reshape(shape[0], r, 1, 1)
        out[f"{prefix}{name}.lora_A.weight"] = a.contiguous()
        out[f"{prefix}{name}.lora_B.weight"] = b.contiguous()
    return out


@torch.no_grad()
def merge_into_unet(unet: nn.Module, adapter: UnlearnAdapter) -> None:
    """Add the adapter's deltas (strength applied) to ``unet``'s weights (a text-encoder
    adapter's: to the text encoder given as ``unet``), in place and for good.

    The sum is formed in float32 and cast to each weight's dtype. Raises ValueError for an adapter
    made for other layers and RuntimeError if an adapter is attached to ``unet`` (detach it first:
    merging through a parametrization would double-count)."""
    from torch.nn.utils import parametrize

    adapter.check_compatible(unet)
    mods = adaptable_modules(adapter.network(unet))
    attached = [n for n in adapter.names if parametrize.is_parametrized(mods[n], "weight")]
    if attached or adapter.is_attached(unet):
        raise RuntimeError(f"{(attached or adapter.names)[0]} carries an attached adapter; detach "
                           "it before merging")
    for n, d in adapter.merged().items():
        w = mods[n].weight
        w.copy_((w.float() + d.to(w.device, torch.float32)).to(w.dtype))


def save_merged_pipeline(model_dir: str, adapter: UnlearnAdapter, out_dir: str,
                         overwrite: bool = False) -> None:
    """Write ``out_dir``: the diffusers pipeline folder ``model_dir`` with the adapter baked into
    its network's weights (``unet/`` or ``transformer/``, or ``text_encoder/`` for a
    text-encoder adapter, re-saved as safetensors in its stored dtype; every other file copied).
    Written next to ``out_dir`` and renamed into place, so an interrupted run leaves no half
    folder; an existing ``out_dir`` is refused unless ``overwrite``."""
    import json

    import diffusers

    subs = ("text_encoder",) if adapter.root == TEXT_ENCODER else ("unet", "transformer")
    sub = next((s for s in subs if os.path.isdir(os.path.join(model_dir, s))), None)
    if sub is None:
        raise FileNotFoundError(f"{model_dir!r} is not a diffusers pipeline folder: no "
                                f"{' or '.join(s + '/' for s in subs)} inside. Save one with "
                                "pipe.save_pretrained(folder).")
    with open(os.path.join(model_dir, sub, "config.json")) as f:
        config = json.load(f)
    if "_class_name" in config:  # a diffusers model
        model_cls, save_kw = getattr(diffusers, config["_class_name"]), {"safe_serialization": True}
    else:  # the text encoder: a transformers model (safetensors is its default format)
        import transformers
        model_cls, save_kw = getattr(transformers, config["architectures"][0]), {}
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir!r} exists; choose another folder or pass overwrite=True "
                              "(CLI: --overwrite)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(out_dir)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(model_dir, tmp, ignore=lambda d, names: [sub]
                        if os.path.samefile(d, model_dir) else [])
        net = model_cls.from_pretrained(model_dir, subfolder=sub,
                                        torch_dtype=_stored_dtype(model_dir, sub),
                                        use_safetensors=True)
        merge_into_unet(net, adapter)
        net.save_pretrained(os.path.join(tmp, sub), **save_kw)
        old = None
        if os.path.exists(out_dir):
            old = f"{tmp}-old"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _stored_dtype(model_dir: str, sub: str = "unet") -> torch.dtype:
    """dtype of the first floating tensor in ``model_dir/sub``'s safetensors (float32 if none)."""
    from safetensors import safe_open

    folder = os.path.join(model_dir, sub)
    names = sorted((f for f in os.listdir(folder) if f.endswith(".safetensors")),
                   key=lambda f: (f != "diffusion_pytorch_model.safetensors", f))  # non-variant 1st
    if not names:
        raise FileNotFoundError(f"{folder!r} holds no .safetensors weights; re-save the pipeline "
                                "with pipe.save_pretrained(folder, safe_serialization=True)")
    with safe_open(os.path.join(folder, names[0]), framework="pt") as f:
        for k in f.keys():
            t = f.get_slice(k).get_dtype()
            if t in ("F16", "BF16", "F32"):
                return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[t]
    return torch.float32
