"""Cost of the prompt attack (``spare_core.probe``) on an SD1.5-sized model: seconds and peak
memory per attack step, at several attack batches, with and without gradient checkpointing.

    python benchmarks/attack_cost.py --device cuda --dtype float16
    python benchmarks/attack_cost.py --device cpu --batch 1 --steps 1    # slow on a CPU

The model is SD1.5's shape with random weights (nothing is downloaded): the UNet of
``benchmarks/memory.py`` (860 M parameters, 512 px) and a CLIP-L-shaped text encoder (12 layers,
width 768, 77 positions, a 49,408-token table). The tokenizer is a local one over a few words, so
the projection onto the vocabulary runs over those words only (a real CLIP tokenizer offers about
32 k whole words: one [k, 768] x [768, 32 k] product per step, small beside the UNet). Peak
memory on CUDA is ``max_memory_allocated`` (weights included); on the CPU no memory is printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spare_core.denoiser import DiffusersDenoiser, gradient_checkpointing  # noqa: E402
from spare_core.probe import AttackConfig, PrefixAttack  # noqa: E402

WORDS = ["a", "painting", "photo", "of", "city", "van", "gogh", "style", "starry", "night",
         "cat", "dog", "portrait", "oil", "sky"]


def build(device: str, dtype: torch.dtype) -> DiffusersDenoiser:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.memory import SD15
    from spare_core.digits.tokenizer import build_tokenizer

    tok = build_tokenizer(77, WORDS, ["van gogh style", "a painting"])
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15).to(dtype).eval()
        te = CLIPTextModel(cfg).to(dtype).eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    return DiffusersDenoiser(unet, te, tok, sched)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 4, 1],
                    help="attack batches (fixed noisy images per step) to measure")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one)")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    den = build(a.device, dtype)
    images = torch.randn(4, *den.latent_shape)  # stand-ins for the concept's latents
    cuda = a.device.startswith("cuda")
    print(f"SD1.5-shaped UNet + CLIP-L-shaped text encoder, {a.dtype}, {a.device}, 5 tokens")
    print("| attack batch | checkpointing | s / step | peak GB |")
    print("|---:|---|---:|---:|")
    for b in a.batch:
        for ckpt in (False, True):
            run = PrefixAttack(den, ["van gogh style"], images,
                               AttackConfig(tokens=5, steps=a.steps, batch_size=b))
            with gradient_checkpointing(den, ckpt):
                run.step()  # warm-up (kernels, allocator)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    run.step()
                if cuda:
                    torch.cuda.synchronize()
            secs = (time.perf_counter() - t0) / a.steps
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else "-"
            print(f"| {b} | {'on' if ckpt else 'off'} | {secs:.3f} | {peak} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
