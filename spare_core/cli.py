"""``spare`` command line: ``spare unlearn``, ``spare demo``, ``spare bench``."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

import torch


def _add_unlearn(sub) -> None:
    p = sub.add_parser("unlearn", help="forget a concept in a diffusers pipeline folder (offline)")
    p.add_argument("--model", required=True, help="folder written by pipe.save_pretrained()")
    p.add_argument("--concept", required=True, help="prompt of the concept to forget")
    p.add_argument("--surrogate", default="", help="what the concept becomes ('' = unconditional)")
    p.add_argument("--preserve", action="append", default=[], help="prompt to keep (repeatable)")
    p.add_argument("--out", default="spare_adapter.safetensors", help="adapter file to write")
    p.add_argument("--format", choices=["native", "comfy", "diffusers"], default="native",
                   help="native SPARE adapter, ComfyUI/kohya LoRA, or diffusers/PEFT LoRA")
    p.add_argument("--grid", default=None, help="before/after PNG grid to write")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--module-fraction", type=float, default=0.25,
                   help="share of Linear/Conv2d modules adapted (ranked by saliency)")
    p.add_argument("--mask-fraction", type=float, default=None,
                   help="element sparsity inside adapted modules, in (0, 1]; default dense LoRA")
    p.add_argument("--num-samples", type=int, default=16, help="concept samples for saliency")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps to generate them")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--timestep-sampler", choices=["concept", "uniform"], default="concept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, unit="step")

    def cb(i: int, n: int, loss: float) -> None:
        bar.update(i - bar.n)
        bar.set_postfix(loss=f"{loss:.4g}")
    return bar, cb


def cmd_unlearn(a: argparse.Namespace) -> int:
    from . import DiffusersDenoiser, save_adapter, spare_unlearn, to_comfy_lora, to_diffusers_lora
    from .files import atomic_save_safetensors
    from .grid import decode_latents, save_grid
    from .sampling import sample

    if not a.out.endswith(".safetensors"):
        raise SystemExit(f"--out must end in .safetensors, got {a.out!r}")
    den = DiffusersDenoiser.from_pretrained(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    vae = None
    if os.path.isdir(os.path.join(a.model, "vae")):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae").to(a.device)
    clip = 1.0 if vae is None else None
    bar, cb = _progress_bar(a.steps, "unlearning")
    try:
        res = spare_unlearn(den, a.concept, a.surrogate, a.preserve, num_samples=a.num_samples,
                            sample_steps=a.sample_steps, guidance=a.guidance, clip_x0=clip,
                            rank=a.rank, alpha=a.alpha, module_fraction=a.module_fraction,
                            mask_fraction=a.mask_fraction, steps=a.steps, lr=a.lr,
                            batch_size=a.batch_size, timestep_sampler=a.timestep_sampler,
                            seed=a.seed, progress=cb)
    finally:
        bar.close()
    meta = dict(method="spare", concept=a.concept, surrogate=a.surrogate)
    if a.format == "native":
        save_adapter(res.adapter, a.out, unet=den.unet, **meta)
    else:
        sd = to_comfy_lora(res.adapter) if a.format == "comfy" else to_diffusers_lora(res.adapter)
        atomic_save_safetensors(sd, a.out, meta)
    print(f"wrote {a.out}: {res.history['trainable_params']} trainable parameters, "
          f"{res.history['seconds']:.1f} s, final loss {res.history['loss'][-1]:.4g}")
    if a.grid:
        prompts = [a.concept] + ([a.surrogate] if a.surrogate else []) + list(a.preserve)
        cells = []
        for p in prompts:
            row = []
            for ctx in (nullcontext(), res.adapter.applied(den.unet)):  # before, after
                with ctx:
                    lat = sample(den, [p] * 4, steps=a.sample_steps, guidance=a.guidance,
                                 method="ddim", generator=torch.Generator().manual_seed(a.seed),
                                 clip_x0=clip)
                row.append(decode_latents(lat, vae))
            cells.append(row)
        save_grid(cells, a.grid, prompts, ["before", "after"])
        print(f"wrote {a.grid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spare", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_unlearn(sub)
    from . import bench, demo  # both on the embedded digits model
    demo.add_command(sub)
    bench.add_command(sub)
    a = parser.parse_args(argv)
    try:
        if a.cmd == "unlearn":
            return cmd_unlearn(a)
        return a.func(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
