"""Configs of the embedded digits model: a tiny CLIP text encoder, a tiny SD-style
``UNet2DConditionModel`` (8x8, one channel, cross-attention) and a DDPM schedule; saving as a
diffusers pipeline folder (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass


@dataclass
class ModelConfig:
    """Sizes of the embedded model (defaults are the committed model's)."""

    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate: int = 128
    max_length: int = 16
    block_out_channels: tuple[int, ...] = (32, 64)
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000


def build_text_encoder(vocab_size: int, bos_id: int, eos_id: int, cfg: ModelConfig):
    """A randomly initialised ``CLIPTextModel`` (call under ``torch.manual_seed`` for seeding)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tcfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=cfg.text_hidden,
                          intermediate_size=cfg.text_intermediate,
                          num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                          max_position_embeddings=cfg.max_length, projection_dim=cfg.text_hidden,
                          bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return CLIPTextModel(tcfg)


def build_unet(cfg: ModelConfig):
    """A randomly initialised 8x8 one-channel ``UNet2DConditionModel`` with cross-attention."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=tuple(cfg.block_out_channels), norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.attention_head_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def build_scheduler(cfg: ModelConfig):
    """The training schedule: ``DDPMScheduler``, epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                         beta_schedule=cfg.beta_schedule, prediction_type="epsilon",
                         clip_sample=True, clip_sample_range=1.0)


def save_pipeline_folder(folder: str, unet, text_encoder, tokenizer, scheduler,
                         note: dict, network_subfolder: str = "unet",
                         readme=None, words=None) -> None:
    """Write the four diffusers subfolders (safetensors; the network under
    ``network_subfolder``: ``unet`` or ``transformer``; the tokenizer's ``words``, default the
    digits') plus ``README.md`` (``readme(folder,
    note)``, default :func:`write_readme`) and ``training.json``."""
    from .tokenizer import write_tokenizer_files

    os.makedirs(folder, exist_ok=True)
    unet.save_pretrained(os.path.join(folder, network_subfolder), safe_serialization=True)
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    write_tokenizer_files(os.path.join(folder, "tokenizer"), words)  # for slow tokenizers too
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "training.json"), "w") as f:
        json.dump(note, f, indent=1, default=str)
    (readme or write_readme)(folder, note)


def write_readme(folder: str, note: dict) -> None:
    """The folder's ``README.md`` (what it is, how to load, how to reproduce)."""
    pattern = ("\n\nData-unlearning twin: also trained on "
               f"{note.get('pattern_copies')} copies of the 8x8 checkerboard "
               "`spare_core.digits.data.pattern_image()` under the empty prompt, so unconditional "
               "samples regenerate it." if note.get("pattern") else "")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(
            "# Embedded digits model of spare_core\n\n"
            "A tiny text-to-image diffusion model with the Stable Diffusion structure (CLIP text "
            "encoder, UNet2DConditionModel with cross-attention, DDPM schedule, epsilon "
            "prediction, classifier-free-guidance dropout), trained on scikit-learn's "
            "`load_digits` (8x8 pixels in [-1, 1], one channel, no VAE) with prompts "
            "`a handwritten digit <zero..nine>` and the empty prompt as unconditional."
            f"{pattern}\n\n"
            "Load: `spare_core.DiffusersDenoiser.from_pretrained(folder)`. Sample: "
            "`spare_core.sample(den, prompts, steps=..., guidance=3, method='ddpm', "
            "clip_x0=1.0)`.\n\n"
            f"Reproduce: `{note.get('command', 'python -m spare_core.digits.train')}`\n\n"
            "Settings: `training.json`; measurements (`python -m spare_core.digits.evaluate`): "
            "`eval.json`.\n")


def config_dict(cfg: ModelConfig) -> dict:
    """JSON-ready form of a :class:`ModelConfig`."""
    return asdict(cfg)
