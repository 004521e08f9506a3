"""Peak memory of each phase of the shipped workflow on an SD1.5-shaped UNet (860 M parameters,
random weights, real size) at 512 px, an SDXL-shaped one (2.6 B, two text encoders' context
and pooled/size conditioning) at 1024 px, or the published Flux.1-dev / SD3.5-large /
SD3.5-medium transformers at 1024 px, stored in their dtype or in fp8, with each memory control
on and off.

    python benchmarks/memory.py                          # --device meta: shapes only, seconds
    python benchmarks/memory.py --arch sdxl --size 1024  # the SDXL UNet at 1024 px
    python benchmarks/memory.py --arch flux --storage fp8 --size 1024   # minutes on meta
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
"host" is what the engine keeps in system RAM (saliency's float32 element scores, 4 bytes per
weight; rows whose element scores would not fit this machine's RAM are printed, not run). Both are
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
from spare_core.families.flux import FluxDenoiser  # noqa: E402
from spare_core.families.sd3 import SD3Denoiser  # noqa: E402
from spare_core.families.sdxl import SDXLDenoiser  # noqa: E402
from spare_core import compute_saliency, run_method, sample, unlearn  # noqa: E402
from spare_core.memory import TensorPeak, full_weight_bytes  # noqa: E402
from spare_core.families.unet import adaptable_modules  # noqa: E402
from spare_core.saliency import Saliency  # noqa: E402
from spare_core.localize import lora_size, select_modules  # noqa: E402
from spare_core.recipes import RECIPES, pool_guidance  # noqa: E402
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
# the published transformer configs (config.json of each repository's transformer/ folder)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                  attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                  caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                  pos_embed_max_size=192, qk_norm="rms_norm")
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                   pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
# name -> (diffusers class, config, text tokens (T5 sequence, + CLIP's 77 for SD3), pooled width)
DITS = {"flux": ("FluxTransformer2DModel", FLUX_DEV, 512, 768),
        "sd35-large": ("SD3Transformer2DModel", SD35_LARGE, 77 + 256, 2048),
        "sd35-medium": ("SD3Transformer2DModel", SD35_MEDIUM, 77 + 256, 2048)}
NAMES = {"sd15": "SD1.5-shaped UNet", "sdxl": "SDXL-shaped UNet", "flux": "Flux.1-dev transformer",
         "sd35-large": "SD3.5-large transformer", "sd35-medium": "SD3.5-medium transformer"}
SPARE = RECIPES["spare"]  # the shipped recipe, as every front end runs it
SAMPLES, BATCH, RANK = SPARE.num_samples, SPARE.batch_size, SPARE.hparams["rank"]
SELECTION, FRACTION = SPARE.hparams["module_selection"], SPARE.hparams["module_fraction"]
PRESERVE = 2  # preserved prompts of the shipped workflows (pools of SAMPLES latents each)


def fake_text(prompts, dim: int, tokens: int = 77) -> torch.Tensor:
    """A fixed random ``[N, tokens, dim]`` context per prompt (CLIP's sequence shape by default),
    on the host."""
    out = []
    for p in prompts:
        seed = int(hashlib.sha256(p.encode()).hexdigest()[:8], 16)
        out.append(torch.randn(tokens, dim, generator=torch.Generator().manual_seed(seed)))
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


def build(device: str, dtype: torch.dtype, size: int, arch: str = "sd15", fp8: bool = False):
    """The denoiser of ``arch`` at ``size`` px with random weights in ``dtype``; ``fp8``: its
    layers stored in float8_e4m3fn under diffusers' layerwise casting, computed in ``dtype``
    (ComfyUI's UNETLoader weight_dtype fp8_e4m3fn does the same with its manual cast)."""
    import diffusers

    if arch in DITS:
        cls, cfg, tokens, pooled = DITS[arch]
        with torch.device(device):
            net = getattr(diffusers, cls)(**cfg).to(dtype).eval()
    else:
        with torch.device(device):
            net = diffusers.UNet2DConditionModel(**{**ARCHS[arch], "sample_size": size // 8})
            net = net.to(dtype).eval()
    if fp8:  # every Linear/Conv, as ComfyUI's fp8 (diffusers' default skips e.g. Flux's norm1.linear)
        net._skip_layerwise_casting_patterns = None  # the documented switch for the model's own
        net.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype,
                                     skip_modules_pattern=())
    if arch not in DITS:
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012)
        return (BenchSDXLDenoiser if arch == "sdxl" else BenchDenoiser)(net, sched)

    def encode(prompts):
        seq = fake_text(prompts, 4096, tokens)
        return Context(seq, {"pooled": seq[:, 0, :pooled].clone()})

    shape = (16, size // 8, size // 8)
    if arch == "flux":  # the scheduler config of FLUX.1-dev (resolution-dependent shift)
        sched = diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
        return FluxDenoiser(net, encode, sched, shape, guidance=3.5, compute_dtype=dtype)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3.5's
    return SD3Denoiser(net, encode, sched, shape, compute_dtype=dtype)


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


def available_ram() -> int:
    """Bytes of system RAM available now (Linux ``MemAvailable``; unbounded elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


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


def data_step(den, checkpointing: bool, early_stop: bool = False) -> None:
    """One SISS step (LoRA r8, batch 2); ``early_stop``: the early stop's check only (on meta its
    ratio reads as ended, so the run stops there: the check's peak, no gradient)."""
    run_method("siss", den, forget=latents(den, 4, 5), keep=latents(den, 4, 6), steps=1,
               batch_size=2, parameterization="lora", rank=8,
               gradient_checkpointing=checkpointing, early_stop_every=1 if early_stop else 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="meta", choices=["meta", "cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--arch", default="sd15", choices=[*ARCHS, *DITS],
                    help="network shape: SD1.5 (860 M) or SDXL (2.6 B) UNets; Flux.1-dev (11.9 B), "
                         "SD3.5-large (8.1 B) or SD3.5-medium (2.5 B) transformers")
    ap.add_argument("--storage", default=None, choices=["fp8"],
                    help="store the network's layers in float8_e4m3fn (computed in --dtype), as "
                         "ComfyUI's UNETLoader weight_dtype fp8_e4m3fn; default: --dtype")
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
        den = build(a.device, dtype, a.size, a.arch, fp8=a.storage == "fp8")
        weights = sum(p.numel() * p.element_size() for p in den.unet.parameters())
        n_params = sum(p.numel() for p in den.unet.parameters())
        stored = sorted({str(p.dtype).replace("torch.", "") for p in den.unet.parameters()})
        print(f"{NAMES[a.arch]}: {n_params / 1e6:.1f} M parameters, weights stored in "
              f"{'/'.join(stored)} (compute {a.dtype}): {weights / 2**30:.2f} GB; {a.size} px "
              f"({a.size // 8}x{a.size // 8} latents); device {a.device}")
        cfg = pool_guidance(getattr(den, "family", "sd"))
        cfg_rows = 2 if cfg != 1.0 else 1
        shipped = select_modules(den.unet, SELECTION, saliency=fake_saliency(den), fraction=FRACTION)
        print(f"the recipe's LoRA ({SELECTION}, rank {RANK}): {len(shipped)} modules, "
              f"{lora_size(den.unet, shipped, RANK):,} trainable parameters")
        print(f"  {'phase':<22}{'setting':<44}{'device':>8}{'host':>8}{'seconds':>9}   (GB)")
        if "sampling" in phases:
            for mb, label in ((1, f"shipped: micro_batch 1 ({cfg_rows} rows, cfg {cfg})"),
                              (SAMPLES, f"controls off: all {SAMPLES} at once "
                                        f"({cfg_rows * SAMPLES} rows)")):
                row("concept sampling", label, lambda mb=mb: sample(
                    den, ["a cat"] * SAMPLES, steps=1, guidance=cfg, method="ddim",
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
                need = 4 * n_params if kw["element_scores"] else 0  # float32 sums, host RAM
                if need > 0.5 * available_ram():
                    print(f"  {'saliency':<22}{label:<44}  not run here: its element scores "
                          f"need {need / 2**30:.2f} GB of system RAM", flush=True)
                    continue
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
                if a.storage == "fp8" and kw.get("mode") == "merged":
                    print(f"  {'SPARE step':<22}{label:<44}  not possible: fp8 weights cannot "
                          "hold W + delta", flush=True)
                    continue
                row("SPARE step", label, lambda kw=kw: spare_step(den, sal, **kw))
        if "data" in phases:
            for flag, label in ((True, "shipped: LoRA r8, checkpointing"),
                                (False, "LoRA r8, no checkpointing")):
                row("DataUnlearn LoRA step", label, lambda flag=flag: data_step(den, flag))
            row("DataUnlearn check", "early stop: micro-batches of 2, no gradient",
                lambda: data_step(den, True, early_stop=True))
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
