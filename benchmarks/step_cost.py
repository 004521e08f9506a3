"""Per-step cost of each parameterization on one UNet, in one run.

Prints the median wall time of: plain forward+backward (all weights), a full fine-tune step
(forward+backward+AdamW on all weights), a LoRA step (rank r on every attention projection), a
sparse-LoRA step (SPARE: rank r on the top saliency modules, element-masked), the saliency pass
per sample, and a SPARE self-distillation step (student + frozen teacher, one batched forward
each); with ratios to plain forward+backward and trainable-parameter counts.

    python benchmarks/step_cost.py                 # tiny UNet, CPU
    python benchmarks/step_cost.py --size sd15 --device cuda --batch 4   # SD1.5-shaped, random init
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from spare_core import (ConceptTask, compute_saliency, init_sparse_lora,
                        sparse_lora_from_saliency)
from spare_core.objectives import SelfDistill
from spare_core.families.unet import adaptable_modules
from spare_core.sampling import q_sample

SIZES = {
    "tiny": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8),
    "small": dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(64, 128, 128), norm_num_groups=32, cross_attention_dim=128,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=8),
    "sd15": dict(sample_size=64, cross_attention_dim=768),  # diffusers' defaults are SD1.5's UNet
}


class RandomTextDenoiser:
    """Denoiser over a random-init UNet with fixed random contexts per prompt (no text encoder:
    the step cost is the UNet's)."""

    def __init__(self, unet, ctx_len: int = 77):
        self.unet = unet
        self.alphas_cumprod = torch.cumprod(1 - torch.linspace(0.00085 ** .5, 0.012 ** .5, 1000) ** 2, 0)
        c = unet.config
        self.latent_shape = (c.in_channels, c.sample_size, c.sample_size)
        self.dim, self.len = c.cross_attention_dim, ctx_len
        self.dev = next(unet.parameters()).device

    def eps(self, x, t, ctx):
        return self.unet(x, t, encoder_hidden_states=ctx).sample

    def encode(self, prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(abs(hash(p)) % 2**31)
            out.append(torch.randn(self.len, self.dim, generator=g))
        return torch.stack(out).to(self.dev, next(self.unet.parameters()).dtype)


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--module-fraction", type=float, default=0.25)
    ap.add_argument("--mask-fraction", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SIZES[a.size]).to(a.device).train(False)
    den = RandomTextDenoiser(unet)
    B = a.batch
    x0 = torch.randn(B, *den.latent_shape, device=a.device)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (B,), device=a.device)
    x_t = q_sample(x0, t, noise, den.alphas_cumprod)
    ctx = den.encode(["concept"] * B)
    n_unet = sum(p.numel() for p in unet.parameters())

    def loss():
        return ((den.eps(x_t, t, ctx) - noise) ** 2).mean()

    rows = []
    unet.requires_grad_(True)
    rows.append(("plain forward+backward", timed(lambda: loss().backward(), a.repeats, a.device), n_unet))
    unet.zero_grad(set_to_none=True)

    opt = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}

    def full_step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
    rows.append(("full fine-tune step", timed(full_step, a.repeats, a.device), n_unet))
    unet.load_state_dict(state)
    del opt, state
    unet.zero_grad(set_to_none=True)
    unet.requires_grad_(False)

    def adapter_step_time(adapter) -> float:
        opt = torch.optim.AdamW(adapter.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()
        with adapter.applied(unet):
            return timed(step, a.repeats, a.device)

    attn = [n for n in adaptable_modules(unet) if ".attn1." in n or ".attn2." in n]
    lora = init_sparse_lora(unet, attn, rank=a.rank)
    rows.append((f"LoRA step (r={a.rank}, all {len(attn)} attention projections)",
                 adapter_step_time(lora), lora.num_trainable()))

    n_sal = max(2, B)
    sal_lat = torch.randn(n_sal, *den.latent_shape)
    t0 = time.perf_counter()
    sal = compute_saliency(den, "concept", sal_lat, batch_size=B)
    if a.device == "cuda":
        torch.cuda.synchronize()
    sal_per = (time.perf_counter() - t0) / n_sal
    sparse = sparse_lora_from_saliency(unet, sal, rank=a.rank, module_fraction=a.module_fraction,
                                       mask_fraction=a.mask_fraction)
    rows.append((f"sparse-LoRA step (r={a.rank}, {len(sparse.names)} modules, mask {a.mask_fraction})",
                 adapter_step_time(sparse), sparse.num_trainable()))
    rows.append(("saliency pass, per sample", sal_per, 0))

    task = ConceptTask("concept", "surrogate", ["keep"], concept_latents=x0.cpu(),
                       preserve_latents=[x0.cpu()])
    task.prepare(den, "uniform", 0)
    obj = SelfDistill()
    opt = torch.optim.AdamW(sparse.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def teacher(x, tt, c):
        with torch.no_grad(), sparse.disabled():
            return den.eps(x, tt, c)

    def spare_step():
        opt.zero_grad(set_to_none=True)
        batch = task.batch(den, B // 2 or 1, gen)
        obj(den.eps, teacher, batch)[0].backward()
        opt.step()
    with sparse.applied(unet):
        rows.append((f"SPARE self-distill step (student+teacher, batch {B // 2 or 1}+{B // 2 or 1})",
                     timed(spare_step, a.repeats, a.device), sparse.num_trainable()))

    base = rows[0][1]
    dev_name = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"UNet '{a.size}': {n_unet / 1e6:.2f} M parameters, batch {B}, latent {den.latent_shape}, {dev_name}")
    print(f"{'what':<70} {'ms':>9} {'x plain':>8} {'trainable':>11} {'% of UNet':>9}")
    for name, sec, n in rows:
        pct = f"{100 * n / n_unet:.3f}" if n else "-"
        print(f"{name:<70} {sec * 1e3:9.2f} {sec / base:8.2f} {n:11d} {pct:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
