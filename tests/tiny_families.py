"""Tiny random-weight pipelines of each model family, built from configs in code (no downloads):
SDXL (two CLIPs, pooled text, size ids), SD3 (MMDiT, two CLIPs, T5 left out as the pipeline
allows), Flux (double + single stream DiT, CLIP + T5, distilled guidance). The VAE is left out:
the engine works on latents."""
from __future__ import annotations

import torch

from tiny_models import char_tokenizer


def _clip(vocab: int, seed: int, hidden: int = 32, projection: bool = False, gain: float = 8.0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                         projection_dim=hidden, eos_token_id=vocab - 1, bos_token_id=vocab - 2,
                         pad_token_id=vocab - 1)
    te = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    with torch.no_grad():  # random init barely conditions on text; make prompts matter
        getattr(te, "text_model", te).final_layer_norm.weight.mul_(gain)
    return te


def tiny_sdxl_pipeline(seed: int = 0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = char_tokenizer()
    v = len(tok.get_vocab())
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=8).eval()
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                   beta_start=0.00085, beta_end=0.012)
    return StableDiffusionXLPipeline(
        vae=None, text_encoder=_clip(v, seed + 1), text_encoder_2=_clip(v, seed + 2, projection=True),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)


def tiny_sd3_pipeline(seed: int = 0):
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    tok = char_tokenizer()
    v = len(tok.get_vocab())
    torch.manual_seed(seed)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4,
                               num_layers=2, attention_head_dim=8, num_attention_heads=2,
                               caption_projection_dim=16, joint_attention_dim=64,
                               pooled_projection_dim=64, pos_embed_max_size=16).eval()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=tr, scheduler=sched, vae=None,
        text_encoder=_clip(v, seed + 1, projection=True), tokenizer=tok,
        text_encoder_2=_clip(v, seed + 2, projection=True), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)


def tiny_flux_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tok = char_tokenizer()
    v = len(tok.get_vocab())
    torch.manual_seed(seed)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                attention_head_dim=16, num_attention_heads=2,
                                joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=(4, 4, 8), guidance_embeds=True).eval()
    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(T5Config(vocab_size=v, d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8)).eval()
    with torch.no_grad():
        t5.encoder.final_layer_norm.weight.mul_(8.0)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                            use_dynamic_shifting=True, base_shift=0.5,
                                            max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
    return FluxPipeline(transformer=tr, scheduler=sched, vae=None, text_encoder=_clip(v, seed + 1),
                        tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok)


def tiny_family_denoiser(family: str, seed: int = 0):
    """(pipeline, denoiser) for ``family`` in ``sdxl``, ``sd3``, ``flux`` (8x8 latents)."""
    from spare_core import denoiser_from_pipeline

    if family == "sdxl":
        pipe = tiny_sdxl_pipeline(seed)
        return pipe, denoiser_from_pipeline(pipe)
    if family == "sd3":
        pipe = tiny_sd3_pipeline(seed)
        return pipe, denoiser_from_pipeline(pipe, max_sequence_length=8)
    if family == "flux":
        pipe = tiny_flux_pipeline(seed)
        return pipe, denoiser_from_pipeline(pipe, height=64, width=64, max_sequence_length=8)
    raise ValueError(family)
