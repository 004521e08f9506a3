"""The SD1.x / SD2.x UNet family (diffusers ``UNet2DConditionModel`` names and the CompVis names
ComfyUI's ``openaimodel.UNetModel`` uses): adaptable modules and the module sets methods pick."""
from __future__ import annotations

from torch import nn

ADAPTABLE = (nn.Linear, nn.Conv2d)
"""Layer types whose weights adapters and saliency address."""

IO_CONVS = ("conv_in", "conv_out", "input_blocks.0.0", "out.2")
"""The UNet's input and output convolutions (diffusers; CompVis / ComfyUI): every denoising
gradient passes through them, so they rank high for any concept and SPARE never adapts them."""

OUTPUT_LAYERS = ("conv_out", "out.2", "out.0")
TIME_EMBED = ("time_embedding", "time_embed")


def adaptable_modules(net: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d modules of ``net`` by qualified name."""
    return {n: m for n, m in net.named_modules() if isinstance(m, ADAPTABLE)}


def _parts(name: str) -> list[str]:
    return name.split(".")


def is_cross_attention(name: str) -> bool:
    """True for a module inside a cross-attention block (a dotted name segment ``attn2``)."""
    return "attn2" in _parts(name)


def is_output_layer(name: str) -> bool:
    return name in OUTPUT_LAYERS or name.startswith("out.")


def is_time_embedding(name: str) -> bool:
    return any(p in TIME_EMBED for p in _parts(name))
