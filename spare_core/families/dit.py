"""Module names of the diffusion transformers (SD3's MMDiT, Flux's double/single-stream DiT) in
diffusers' naming and in ComfyUI's: which layers are input/output, time/text embedders, and the
text stream's attention (ESD-x's analogue of cross-attention).

Every ``nn.Linear`` of a block is adaptable: attention ``to_q/k/v/out`` and the text stream's
``add_*_proj/to_add_out`` (ComfyUI: fused ``qkv``/``proj``), feed-forwards, Flux's single-block
fused ``linear1/linear2`` (diffusers: ``to_q/k/v``, ``proj_mlp``, ``proj_out``) and the adaLN
modulation linears (``norm1.linear`` / ``img_mod.lin``)."""
from __future__ import annotations

INPUT_LAYERS = ("pos_embed.proj", "x_embedder", "x_embedder.proj", "img_in")
"""Patch/latent input projections (diffusers SD3 / Flux; ComfyUI SD3 / Flux)."""

OUTPUT_LAYERS = ("proj_out", "norm_out.linear", "final_layer.linear",
                 "final_layer.adaLN_modulation.1")
"""Top-level output projections and their modulation (block-level ``proj_out`` of Flux's single
blocks is not one of them: only these exact names are)."""

EMBEDDERS = ("time_text_embed", "context_embedder", "t_embedder", "y_embedder", "time_in",
             "vector_in", "guidance_in", "txt_in")
"""Time, pooled-text, guidance and text-sequence embedders (first name segment)."""

TEXT_ATTENTION = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
"""diffusers: the text stream's attention projections in joint (double-stream) blocks."""


def is_dit_name(name: str) -> bool:
    """True for a module name of a diffusers or ComfyUI DiT of these families."""
    head = name.split(".", 1)[0]
    return head in ("transformer_blocks", "single_transformer_blocks", "double_blocks",
                    "single_blocks", "joint_blocks") or head in EMBEDDERS \
        or name in INPUT_LAYERS or name in OUTPUT_LAYERS


def is_output_layer(name: str) -> bool:
    return name in OUTPUT_LAYERS or name.startswith("norm_out.") or name.startswith("final_layer.")


def is_time_embedding(name: str) -> bool:
    return name.split(".", 1)[0] in EMBEDDERS


def is_text_attention(name: str) -> bool:
    """The text stream's attention in joint blocks: diffusers ``attn.add_*_proj`` /
    ``attn.to_add_out``; ComfyUI Flux ``txt_attn.*``; ComfyUI SD3 ``context_block.attn.*``."""
    parts = name.split(".")
    return (any(p in TEXT_ATTENTION for p in parts) or "txt_attn" in parts
            or ("context_block" in parts and "attn" in parts))
