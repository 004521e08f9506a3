"""Peak memory of each phase of the shipped workflow on an SD1.5-shaped UNet (860 M parameters,
random weights, real size) at 512 px, or an SDXL-shaped one (2.6 B, two text encoders' context
and pooled/size conditioning) at 1024 px, with each memory control on and off.

    python benchmarks/memory.py                          # --device meta: shapes only, seconds
    python benchmarks/memory.py --arch sdxl --size 1024  # the SDXL UNet at 1024 px
    python benchmarks/memory.py --device cpu --time      # real compute (slow on a CPU)
    python benchmarks/memory.py --device cuda --time     # on a GPU: max_memory_allocated

Phases, at the shipped recipe (spare_core.recipes, which the nodes and the CLI read):
- concept sampling: one DDIM step (the peak of every step) for the concept images, CFG;
- saliency: ComputeSaliency over them (only the ranked module selections run it);
- timestep gaps: the concept sampler's forward passes over the pool;
- SPARE step: one SelfDistillUnlearn step (the recipe's LoRA on its module selection, its batch
  of forget + preserve latents, student and teacher);
- DataUnlearn LoRA step: one SISS step (LoRA r8 on every Linear/Conv2d, batch 2).
"device" is what the device (GPU) holds: the UNet's weights plus everything the phase makes;
"host" is what the engine keeps in system RAM (saliency's float32 element scores). Both are
tensor bytes (``spare_core.memory.TensorPeak``; on CUDA ``max_memory_allocated``), not allocator
blocks. On ``meta`` no number is computed, so the run takes seconds; attention is counted as the
flash kernel does (linear in sequence length, as CUDA's flash/memory-efficient kernels). The CLIP
text encoder is not counted (ComfyUI offloads it; prompts are encoded before the UNet loads).
``--time`` adds the step time of the SPARE step with and without gradient checkpointing (and
with the merged vs unmerged adapter) as ratios, measured in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spare_core import ConceptTask, DiffusersDenoiser, PoolConfig, UnlearnConfig  # noqa: E402
from spare_core.conditioning import Context  # noqa: E402
from spare_core.families.sdxl import SDXLDenoiser  # noqa: E402
from spare_core import compute_saliency, run_method, sample, unlearn  # noqa: E402
from spare_core.memory import TensorPeak, full_weight_bytes  # noqa: E402
from spare_core.families.unet import adaptable_modules  # noqa: E402
from spare_core.saliency import Saliency  # noqa: E402
from spare_core.localize import lora_size, select_modules  # noqa: E402
from spare_core.recipes import RECIPES  # noqa: E402
from spare_core.sparse_lora import sparse_lora_on  # noqa: E402
from spare_core.timesteps import concept_gaps  # noqa: E402

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
ARCHS = {"sd15": SD15, "sdxl": SDXL}
SPARE = RECIPES["spare"]  # the shipped recipe, as every front end runs it
SAMPLES, BATCH, RANK = SPARE.num_samples, SPARE.batch_size, SPARE.hparams["rank"]
SELECTION, FRACTION = SPARE.hparams["module_selection"], SPARE.hparams["module_fraction"]
PRESERVE = 2  # preserved prompts of the shipped workflows (pools of SAMPLES latents each)


def fake_text(prompts, dim: int) -> torch.Tensor:
    """A fixed random ``[N, 77, dim]`` context per prompt (CLIP's sequence shape), on the host."""
    out = []
    for p in prompts:
        seed = int(hashlib.sha256(p.encode()).hexdigest()[:8], 16)
        out.append(torch.randn(77, dim, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(out)


class BenchDenoiser(DiffusersDenoiser):
    """The diffusers backend with a stand-in text encoder: each prompt maps to a fixed random
    ``[77, 768]`` context (CLIP-L's shape), made on the host."""

    def __init__(self, unet, scheduler) -> None:
        super().__init__(unet, torch.nn.Identity(), None, scheduler)

    def encode(self, prompts):
        return fake_text(prompts, 768)


class BenchSDXLDenoiser(SDXLDenoiser):
    """The SDXL backend with stand-in encoders: ``[77, 2048]`` sequence (CLIP-L + CLIP-G) and a
    ``[1280]`` pooled vector per prompt, on the host."""

    def __init__(self, unet, scheduler) -> None:
        def encode(prompts):
            seq = fake_text(prompts, 2048)
            return Context(seq, {"pooled": seq[:, 0, :1280].clone()})

        super().__init__(unet, encode, scheduler)


def build(device: str, dtype: torch.dtype, size: int, arch: str = "sd15"):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**{**ARCHS[arch], "sample_size": size // 8}).to(dtype).eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    return (BenchSDXLDenoiser if arch == "sdxl" else BenchDenoiser)(unet, sched)


class Meter:
    """Peak device and host bytes of a block: TensorPeak (meta, cpu) or CUDA's allocator stats."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = TensorPeak(meta=device == "meta")

    @contextlib.contextmanager
    def phase(self, out: dict):
        gc.collect()
        self.peak.reset_peak()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        if self.device == "cuda":
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t0
        if self.device == "cuda":
            out["device"] = torch.cuda.max_memory_allocated()
            out["host"] = self.peak.peak.get("cpu", 0)
        elif self.device == "cpu":  # one memory: report it all as the device's
            out["device"], out["host"] = self.peak.peak.get("cpu", 0), 0
        else:
            out["device"], out["host"] = self.peak.peak.get("meta", 0), self.peak.peak.get("cpu", 0)


def latents(den, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *den.latent_shape, generator=torch.Generator().manual_seed(seed))


def fake_saliency(den) -> Saliency:
    """Per-module scores (random, seeded) for placing the LoRA without a saliency pass."""
    g = torch.Generator().manual_seed(0)
    mods = adaptable_modules(den.unet)
    stats = {n: {"mean": float(torch.rand((), generator=g)), "max": 1.0} for n in mods}
    return Saliency({}, concept="a cat", stats=stats,
                    shapes={n: tuple(m.weight.shape) for n, m in mods.items()})


def spare_step(den, sal, *, checkpointing: bool, split: bool, mode: str = "unmerged",
               steps: int = 1, times: list | None = None, micro: int = BATCH) -> None:
    """``steps`` SelfDistillUnlearn steps of the recipe's batch, in micro-batches of ``micro``
    latents (gradients accumulated, as the node does with its micro_batch input)."""
    modules = select_modules(den.unet, SELECTION, saliency=sal, fraction=FRACTION)
    ad = sparse_lora_on(den.unet, modules, rank=RANK, clamp_rank=True)
    task = ConceptTask("a cat", "a dog", [f"preserve {i}" for i in range(PRESERVE)],
                       concept_latents=latents(den, SAMPLES, 1),
                       preserve_latents=[latents(den, SAMPLES, 2 + i) for i in range(PRESERVE)],
                       pool=PoolConfig(size=SAMPLES))
    stamps = []
    unlearn(den, ad, task, "self_distill",
            UnlearnConfig(steps=steps, batch_size=micro, grad_accum=-(-BATCH // micro),
                          timestep_sampler="uniform",
                          gradient_checkpointing=checkpointing, backward_per_term=split,
                          attach_mode=mode),
            progress=lambda i, n, loss: stamps.append(time.perf_counter()))
    if times is not None and len(stamps) > 1:
        times.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))


def data_step(den, checkpointing: bool) -> None:
    run_method("siss", den, forget=latents(den, 4, 5), keep=latents(den, 4, 6), steps=1,
               batch_size=2, parameterization="lora", rank=8,
               gradient_checkpointing=checkpointing)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="meta", choices=["meta", "cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--arch", default="sd15", choices=sorted(ARCHS),
                    help="UNet shape: SD1.5 (860 M) or SDXL (2.6 B, pooled + size conditioning)")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (latents / 8)")
    ap.add_argument("--time", action="store_true",
                    help="also time the SPARE step with and without checkpointing")
    ap.add_argument("--time-steps", type=int, default=3,
                    help="steps per timed run (the first is not counted)")
    ap.add_argument("--phases", default="sampling,saliency,gaps,spare,data",
                    help="comma-separated subset of the phases")
    a = ap.parse_args(argv)
    if a.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    dtype = getattr(torch, a.dtype)
    meter = Meter(a.device)
    phases = [p for p in a.phases.split(",") if p]
    rows = []

    def row(phase: str, setting: str, fn) -> None:
        out = {}
        with meter.phase(out):
            fn()
        rows.append((phase, setting, out))
        print(f"  {phase:<22}{setting:<44}{out['device'] / 2**30:>8.2f}{out['host'] / 2**30:>8.2f}"
              f"{out['seconds']:>9.1f}", flush=True)

    attention = meter.peak.flash_attention() if a.device == "meta" else contextlib.nullcontext()
    with meter.peak, attention:
        den = build(a.device, dtype, a.size, a.arch)
        weights = sum(p.numel() * p.element_size() for p in den.unet.parameters())
        n_params = sum(p.numel() for p in den.unet.parameters())
        print(f"{'SDXL' if a.arch == 'sdxl' else 'SD1.5'}-shaped UNet: {n_params / 1e6:.1f} M "
              f"parameters, {a.dtype} weights "
              f"{weights / 2**30:.2f} GB; {a.size} px ({a.size // 8}x{a.size // 8} latents); "
              f"device {a.device}")
        shipped = select_modules(den.unet, SELECTION, saliency=fake_saliency(den), fraction=FRACTION)
        print(f"the recipe's LoRA ({SELECTION}, rank {RANK}): {len(shipped)} modules, "
              f"{lora_size(den.unet, shipped, RANK):,} trainable parameters")
        print(f"  {'phase':<22}{'setting':<44}{'device':>8}{'host':>8}{'seconds':>9}   (GB)")
        if "sampling" in phases:
            for mb, label in ((1, "shipped: micro_batch 1 (2 with CFG)"),
                              (SAMPLES, f"controls off: all {SAMPLES} at once ({2 * SAMPLES} with CFG)")):
                row("concept sampling", label, lambda mb=mb: sample(
                    den, ["a cat"] * SAMPLES, steps=1, guidance=7.5, method="ddim",
                    batch_size=mb, generator=torch.Generator().manual_seed(0)))
        if "saliency" in phases:
            lat = latents(den, SAMPLES, 0)
            for kw, label in (
                    (dict(batch_size=1, gradient_checkpointing=True, element_scores=False),
                     "shipped: micro_batch 1, checkpointing, per-module"),
                    (dict(batch_size=1, gradient_checkpointing=False, element_scores=False),
                     "micro_batch 1, no checkpointing"),
                    (dict(batch_size=1, gradient_checkpointing=True, element_scores=True),
                     "micro_batch 1, checkpointing, element scores"),
                    (dict(batch_size=SAMPLES, gradient_checkpointing=False, element_scores=True),
                     f"controls off: batch {SAMPLES}, element scores")):
                row("saliency", label, lambda kw=kw: compute_saliency(den, "a cat", lat, **kw))
        if "gaps" in phases:
            ctx = den.encode(["a cat", "a dog"])
            for mb, label in ((1, "shipped: micro_batch 1"), (SAMPLES, f"all {SAMPLES} at once")):
                row("timestep gaps", label, lambda mb=mb: concept_gaps(
                    den, latents(den, SAMPLES, 0), ctx[:1], ctx[1:], bins=1, batch_size=mb))
        sal = fake_saliency(den)
        if "spare" in phases:
            for kw, label in (
                    (dict(checkpointing=True, split=True, micro=1),
                     f"shipped: micro_batch 1 (x{BATCH}), checkpointing, split"),
                    (dict(checkpointing=True, split=True),
                     f"batch {BATCH} at once, checkpointing, split"),
                    (dict(checkpointing=False, split=True), "no checkpointing, split backward"),
                    (dict(checkpointing=True, split=False), "checkpointing, one backward"),
                    (dict(checkpointing=False, split=False), "controls off"),
                    (dict(checkpointing=False, split=False, mode="merged"),
                     "controls off, merged W + delta adapter")):
                row("SPARE step", label, lambda kw=kw: spare_step(den, sal, **kw))
        if "data" in phases:
            for flag, label in ((True, "shipped: LoRA r8, checkpointing"),
                                (False, "LoRA r8, no checkpointing")):
                row("DataUnlearn LoRA step", label, lambda flag=flag: data_step(den, flag))
            shapes = [tuple(m.weight.shape) for m in adaptable_modules(den.unet).values()]
            print(f"  DataUnlearn full weights: refused up front where it cannot fit; needs "
                  f"{full_weight_bytes(shapes) / 2**30:.2f} GB beyond the weights "
                  "(float32 value, gradient, 2 AdamW moments per weight)")
        if a.time:
            if a.device == "meta":
                print("--time needs real compute: --device cpu or cuda")
            else:
                times = {}
                for label, kw in (("checkpointing", dict(checkpointing=True, split=True)),
                                  ("no checkpointing", dict(checkpointing=False, split=True)),
                                  ("merged adapter", dict(checkpointing=False, split=True,
                                                          mode="merged"))):
                    t = []
                    spare_step(den, sal, steps=a.time_steps, times=t, **kw)
                    times[label] = t[0]
                base = times["no checkpointing"]
                print(f"SPARE step time (mean of steps 2-{a.time_steps}):")
                for label, t in times.items():
                    print(f"  {label:<20}{t:>8.2f} s  {t / base:>5.2f}x no checkpointing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
