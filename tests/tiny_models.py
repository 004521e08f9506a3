"""Tiny SD-structured models built from configs in code (no downloads) for fast CPU tests."""
from __future__ import annotations

import json
import os
import string
import tempfile

import torch


def char_tokenizer(max_length: int = 32):
    """A real ``CLIPTokenizer`` over single characters (every printable char is in the vocab and
    there are no merges), written to a temporary folder: no hub needed."""
    from transformers import CLIPTokenizer

    chars = sorted(set(string.ascii_lowercase + string.digits + " .,'-"))
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    d = tempfile.mkdtemp(prefix="tok-")
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                         model_max_length=max_length, pad_token="<|endoftext|>")


def tiny_unet(seed: int = 0, cross_dim: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=cross_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    ).eval()


def tiny_text_encoder(vocab_size: int, seed: int = 0, hidden: int = 32, max_len: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=max_len, eos_token_id=vocab_size - 1,
                         bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1)
    return CLIPTextModel(cfg).eval()


def tiny_denoiser(seed: int = 0, cond_gain: float = 8.0):
    """A DiffusersDenoiser over a ~0.5 M-parameter UNet, a 2-layer CLIP and a DDPM schedule."""
    from diffusers import DDPMScheduler

    from spare_core import DiffusersDenoiser

    tok = char_tokenizer()
    te = tiny_text_encoder(len(tok.get_vocab()), seed=seed)
    unet = tiny_unet(seed)
    with torch.no_grad():  # random init barely conditions on text; make prompts matter
        te.final_layer_norm.weight.mul_(cond_gain)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    return DiffusersDenoiser(unet, te, tok, sched)
