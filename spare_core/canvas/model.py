"""Configs of the embedded canvas model: the digits model's tiny CLIP text encoder and DDPM
schedule, and a 16x16 RGB ``UNet2DConditionModel`` with cross-attention at 8x8 and 4x4."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ..digits.model import ModelConfig


@dataclass
class CanvasConfig(ModelConfig):
    """Sizes of the canvas model (defaults are the committed model's); text encoder and schedule
    fields as :class:`~spare_core.digits.model.ModelConfig`."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    sample_size: int = 16
    channels: int = 3


def build_unet(cfg: CanvasConfig):
    """A randomly initialised 16x16 RGB ``UNet2DConditionModel``: a plain block at 16x16,
    cross-attention blocks at 8x8 and 4x4 (measured on 1 CPU thread: 0.54 s per training step
    of 64 images, against 1.4 s with cross-attention at 16x16 too)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=cfg.channels, out_channels=cfg.channels,
        layers_per_block=1, block_out_channels=tuple(cfg.block_out_channels),
        norm_num_groups=cfg.norm_num_groups, cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.attention_head_dim,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def write_readme(folder: str, note: dict) -> None:
    """The folder's ``README.md`` (what it is, how to load, how to reproduce)."""
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(
            "# Embedded canvas model of spare_core\n\n"
            "A tiny two-domain text-to-image diffusion model with the Stable Diffusion structure "
            "(CLIP text encoder, UNet2DConditionModel with cross-attention, DDPM schedule, "
            "epsilon prediction, classifier-free-guidance dropout), trained on procedurally "
            "rendered 16x16 RGB images of 8 objects x 8 styles (`spare_core.canvas.data`), "
            "UnlearnCanvas's style x object set-up at toy scale. Prompts `a {object} in {style} "
            "style` and `an image of a {object}, {style} style`, two names per concept, plus "
            "one-domain prompts (`{style} style`, `a {object}`) and the empty prompt.\n\n"
            "Load: `spare_core.DiffusersDenoiser.from_pretrained(folder)`.\n\n"
            f"Reproduce: `{note.get('command', 'python -m spare_core.canvas.train')}`\n\n"
            "Settings: `training.json`; measurements (`python -m spare_core.canvas.evaluate`): "
            "`eval.json`.\n")


def config_dict(cfg: CanvasConfig) -> dict:
    """JSON-ready form of a :class:`CanvasConfig`."""
    return asdict(cfg)
