"""The ``text_encoder`` localisation: a LoRA on the first block of the CLIP text encoder.

HiRM's finding: a concept can be erased by editing only the first transformer block of the
text encoder (its self-attention q/k/v/out projections and its MLP fc1/fc2); the denoising
network stays untouched. Here such an adapter is an ordinary
:class:`~spare_core.adapter.UnlearnAdapter` whose ``root`` (metadata ``root``) is
``"text_encoder"``: its module names are those of the CLIP text transformer
(``encoder.layers.0.self_attn.q_proj``; transformers >= 5 flattens ``CLIPTextModel`` so the
model itself is that transformer, older versions hold it as ``.text_model``), and the LoRA
formats name them with the ``text_model.`` prefix (:func:`lora_name`).

Training (:func:`spare_core.loop.unlearn`): the frozen teacher reads the contexts the task
encoded once with the original encoder; the student's contexts are the same prompts re-encoded
through the adapted encoder at every call, with gradient (:class:`PromptReencoder`). Only a
diffusers SD1.x/SD2.x denoiser (``DiffusersDenoiser`` with a CLIP ``text_encoder`` and a
``tokenizer``) has such an encoder: :func:`check_text_encoder` refuses the others up front.

Why not peft (which diffusers itself uses to put a LoRA into a text encoder, and whose key
layout the diffusers export writes): the adapter is the engine's own hook adapter, as on the
UNet, because the frozen teacher is the same encoder with the adapter switched off
(``adapter.disabled()``: no second copy, no module swap changing the encoder's module names
while attached), and one adapter type serves the native file, both LoRA exports, the bench's
``applied_to`` and training. Prompt re-encoding by row matching is hand-written because no
library has it: it keeps the objectives' ``student(x, t, ctx)`` signature unchanged.

Torch only (no adapter import), so :mod:`spare_core.adapter` can resolve its root here.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

UNET = "unet"
TEXT_ENCODER = "text_encoder"
ROOTS = (UNET, TEXT_ENCODER)
"""What an adapter edits (its ``root`` metadata; files without one are UNet adapters)."""

FIRST_BLOCK = "encoder.layers.0"
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
"""The linear layers of a CLIP encoder block the localisation adapts."""
LORA_PREFIX = "text_model."
"""What LoRA files (kohya ``lora_te_text_model_...``, diffusers ``text_encoder.text_model...``)
put before the transformer's module names."""


def text_transformer(text_encoder: nn.Module) -> nn.Module:
    """The CLIP text transformer whose module names a text-encoder adapter uses:
    ``text_encoder.text_model`` where it exists (transformers < 5), else the model itself."""
    return getattr(text_encoder, "text_model", text_encoder)


def lora_name(name: str) -> str:
    """A text-encoder adapter's module name as LoRA files write it (``text_model.`` + name)."""
    return LORA_PREFIX + name


def first_block(net: nn.Module) -> list[str]:
    """The first block's linear layers of the CLIP text transformer ``net`` (module names, in
    :data:`BLOCK_LINEARS` order); ValueError naming the fix if ``net`` has none (a UNet)."""
    mods = dict(net.named_modules())
    names = [f"{FIRST_BLOCK}.{x}" for x in BLOCK_LINEARS]
    if not all(isinstance(mods.get(n), nn.Linear) for n in names):
        raise ValueError(f"module selection 'text_encoder' adapts the first block of a CLIP text "
                         f"encoder ({FIRST_BLOCK}.self_attn / .mlp), which "
                         f"{type(net).__name__} does not have: give the denoiser's text encoder, "
                         "not its UNet")
    return names


def check_text_encoder(denoiser) -> nn.Module:
    """The denoiser's CLIP text encoder; ValueError before any work for a backend without one
    (the ComfyUI bridge, SDXL, SD3, Flux)."""
    family = getattr(denoiser, "family", "sd")
    te = getattr(denoiser, "text_encoder", None)
    ok = (family == "sd" and isinstance(te, nn.Module)
          and callable(getattr(denoiser, "tokenizer", None))
          and callable(getattr(denoiser, "text_states", None)))
    if ok:
        try:
            first_block(text_transformer(te))
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(
            "module_selection 'text_encoder' needs a diffusers SD1.x/2.x denoiser with a CLIP "
            f"text encoder (DiffusersDenoiser with .text_encoder and .tokenizer); "
            f"{type(denoiser).__name__} (family {family!r}) has none. Choose another module "
            "selection (text_kv edits the UNet's text projections), or train on the diffusers "
            "pipeline folder (spare unlearn --model FOLDER --module-selection text_encoder)")
    return te


def adapted_network(model, root: str) -> nn.Module:
    """The module an adapter of ``root`` addresses by name: from a denoiser (anything with a
    ``unet`` that is not itself a module) its UNet or its text encoder's transformer; from a
    module, the module (a text encoder resolved to its transformer)."""
    if root not in ROOTS:
        raise ValueError(f"adapter root must be one of {list(ROOTS)}, got {root!r}")
    is_denoiser = not isinstance(model, nn.Module) and hasattr(model, "unet")
    if root == UNET:
        return model.unet if is_denoiser else model
    return text_transformer(check_text_encoder(model) if is_denoiser else model)


def root_module(denoiser, root: str) -> nn.Module:
    """What an adapter of ``root`` attaches to on ``denoiser``: ``denoiser.unet``, or its
    ``text_encoder`` (checked by :func:`check_text_encoder`)."""
    if root not in ROOTS:
        raise ValueError(f"adapter root must be one of {list(ROOTS)}, got {root!r}")
    return denoiser.unet if root == UNET else check_text_encoder(denoiser)


def check_prompt_table(task) -> None:
    """ValueError unless ``task`` lists the prompts it encodes (``prompt_table()``, as
    :class:`~spare_core.tasks.ConceptTask`): a text-encoder adapter re-encodes them."""
    if not callable(getattr(task, "prompt_table", None)):
        raise ValueError(f"a text-encoder adapter trains on prompts the task lists; "
                         f"{type(task).__name__} has no prompt_table(): use a ConceptTask "
                         "(concept methods), or a UNet module selection")


class PromptReencoder:
    """``c -> adapted c``: each context row the student receives (one of the frozen contexts the
    task encoded, ``frozen[i]`` of prompt ``prompts[i]``) becomes the encoding of the same prompt
    through the text encoder as it is now (the adapter attached), with gradient.

    Rows are matched to prompts by exact equality with the frozen table (a row is a copy of one,
    cast like it): the objectives call ``student(x, t, ctx)`` with the batch's contexts, so the
    mapping needs no change to them or to the batch. A row that matches no prompt (contexts
    built elsewhere, e.g. an adversarial prompt's) raises ValueError."""

    def __init__(self, denoiser, prompts: Sequence[str], frozen: Tensor) -> None:
        if len(prompts) != frozen.shape[0]:
            raise ValueError(f"{len(prompts)} prompts but {frozen.shape[0]} frozen contexts")
        self.denoiser, self.prompts, self.frozen = denoiser, list(prompts), frozen
        self._cast: Tensor | None = None

    def index(self, c: Tensor) -> Tensor:
        """``[B]`` prompt index of each row of ``c`` ``[B, L, D]``."""
        if self._cast is None or self._cast.device != c.device or self._cast.dtype != c.dtype:
            self._cast = self.frozen.to(c.device, c.dtype)
        flat = self._cast.flatten(1)
        idx = torch.full((c.shape[0],), -1, dtype=torch.long, device=c.device)
        for i, row in enumerate(c.flatten(1)):
            hit = (flat == row).all(dim=1).nonzero()
            if hit.numel():
                idx[i] = hit[0, 0]
        if bool((idx < 0).any()):
            raise ValueError(f"{int((idx < 0).sum())} context row(s) are none of the task's "
                             "encoded prompts: a text-encoder adapter re-encodes only the "
                             "task's own prompts (no adversarial or hand-made contexts)")
        return idx

    def __call__(self, c: Tensor) -> Tensor:
        idx = self.index(c)
        used, where = idx.unique(return_inverse=True)  # each prompt encoded once per call
        enc = self.denoiser.text_states([self.prompts[i] for i in used.tolist()])
        return enc.to(c.device, c.dtype)[where]
