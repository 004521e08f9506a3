"""Configs of the embedded flow-matching digits model "digits-dit": a tiny SD3-style
``SD3Transformer2DModel`` (MMDiT, 8x8, one channel) conditioned by the committed digits model's
CLIP text encoder, a ``FlowMatchEulerDiscreteScheduler``; saving as a diffusers pipeline folder
(``transformer/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

TEXT_HIDDEN = 64  # hidden size of the digits CLIP text encoder (ModelConfig.text_hidden)


@dataclass
class DitConfig:
    """Sizes of the embedded DiT (defaults are the committed model's)."""

    sample_size: int = 8
    patch_size: int = 1
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    text_hidden: int = TEXT_HIDDEN
    num_train_timesteps: int = 1000
    shift: float = 1.0

    @property
    def inner_dim(self) -> int:
        """Transformer width = heads * head dim (also the caption projection size)."""
        return self.num_attention_heads * self.attention_head_dim


def build_transformer(cfg: DitConfig | None = None):
    """A randomly initialised ``SD3Transformer2DModel`` for ``[B, 1, 8, 8]`` images in ``[-1, 1]``
    (call under ``torch.manual_seed`` for seeding). Conditioning: ``encoder_hidden_states``
    ``[B, L, 64]`` and ``pooled_projections`` ``[B, 64]``; ``timestep`` = sigma * 1000 ``[B]``.

    The sin-cos position table covers exactly the patch grid (``pos_embed_max_size``), so the
    saved buffer stays tiny (SD3's default 96x96 table would be megabytes)."""
    from diffusers import SD3Transformer2DModel

    cfg = cfg or DitConfig()
    return SD3Transformer2DModel(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=1, out_channels=1,
        num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.text_hidden,
        caption_projection_dim=cfg.inner_dim, pooled_projection_dim=cfg.text_hidden,
        pos_embed_max_size=cfg.sample_size // cfg.patch_size)


def build_flow_scheduler(cfg: DitConfig | None = None):
    """The rectified-flow schedule: ``FlowMatchEulerDiscreteScheduler`` (1000 steps, shift 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = cfg or DitConfig()
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps,
                                           shift=cfg.shift)


def save_dit_folder(folder: str, transformer, text_encoder, tokenizer, scheduler,
                    note: dict) -> None:
    """Write ``transformer/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` (safetensors)
    plus ``README.md`` and ``training.json``."""
    from .model import save_pipeline_folder

    save_pipeline_folder(folder, transformer, text_encoder, tokenizer, scheduler, note,
                         network_subfolder="transformer", readme=write_dit_readme)


def write_dit_readme(folder: str, note: dict) -> None:
    """The folder's ``README.md`` (what it is, how to load, how to reproduce)."""
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(
            "# Embedded flow-matching digits model (digits-dit) of spare_core\n\n"
            "The flow-matching twin of `spare_core/assets/digits`: a tiny text-to-image model "
            "with the Stable Diffusion 3 structure (MMDiT `SD3Transformer2DModel`, "
            "`FlowMatchEulerDiscreteScheduler`, rectified flow, velocity prediction, "
            "classifier-free-guidance dropout to the empty prompt), trained on scikit-learn's "
            "`load_digits` (8x8 pixels in [-1, 1], one channel, no VAE) with prompts "
            "`a handwritten digit <zero..nine>`. The CLIP text encoder and tokenizer are the "
            "digits model's, copied unchanged and kept frozen; only the transformer was trained."
            "\n\n"
            "Conventions: `x_s = (1 - s) x0 + s noise` for sigma `s` in [0, 1], the transformer "
            "predicts `v = noise - x0` given `timestep = 1000 s`, `encoder_hidden_states` = the "
            "text encoder's last hidden state `[B, 16, 64]` and `pooled_projections` = its "
            "`pooler_output` `[B, 64]`.\n\n"
            "Load: `spare_core.load_denoiser(folder)` (an `SD3Denoiser`; or "
            "`spare demo --model digits-dit`). Sample: `spare_core.sample(den, prompts, "
            "steps=25, guidance=3, method='ddim', clip_x0=1.0)` (DDIM on a flow is the "
            "deterministic Euler step from s=1 to s=0).\n\n"
            f"Reproduce: `{note.get('command', 'python -m spare_core.digits.train_dit')}`\n\n"
            "Settings: `training.json`; measurements "
            "(`python -m spare_core.digits.evaluate --model <folder> --steps 10 25 50 --json "
            "<folder>/eval.json`): `eval.json`.\n")


def config_dict(cfg: DitConfig) -> dict:
    """JSON-ready form of a :class:`DitConfig`."""
    return asdict(cfg)
