"""``spare`` command line: ``spare unlearn`` (any method of :data:`spare_core.methods.METHODS`),
``spare demo``, ``spare bench``."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

import torch

from .methods import parse_options


def _add_unlearn(sub) -> None:
    from .methods import CONCEPT_METHODS, DATA_METHODS, METHODS

    p = sub.add_parser("unlearn", help="forget a concept or a set of images in a diffusers "
                                       "pipeline folder (offline)")
    p.add_argument("--model", required=True, help="folder written by pipe.save_pretrained()")
    p.add_argument("--method", choices=list(METHODS), default="spare",
                   help=f"concept methods {', '.join(CONCEPT_METHODS)} take --concept; data "
                        f"methods {', '.join(DATA_METHODS)} take --forget-images/--keep-images")
    p.add_argument("--concept", default=None, help="prompt of the concept to forget")
    p.add_argument("--surrogate", default="", help="what the concept becomes ('' = unconditional)")
    p.add_argument("--preserve", action="append", default=[], help="prompt to keep (repeatable)")
    p.add_argument("--forget-images", default=None, help="folder of the images to forget (data methods)")
    p.add_argument("--keep-images", default=None, help="folder of the images to keep (data methods)")
    p.add_argument("--forget-prompt", default=None, help="prompt of the forget images ('' if unset)")
    p.add_argument("--keep-prompt", default=None, help="prompt of the keep images ('' if unset)")
    p.add_argument("--out", default="spare_adapter.safetensors", help="adapter file to write")
    p.add_argument("--format", choices=["native", "comfy", "diffusers"], default="native",
                   help="native SPARE adapter, ComfyUI/kohya LoRA, or diffusers/PEFT LoRA")
    p.add_argument("--grid", default=None, help="before/after PNG grid to write")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=None,
                   help="default: 1e-3 for spare, the paper's lr x steps budget for the others")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (spare)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (spare; default = rank)")
    p.add_argument("--module-fraction", type=float, default=0.25,
                   help="share of Linear/Conv2d modules adapted, ranked by saliency (spare)")
    p.add_argument("--mask-fraction", type=float, default=None,
                   help="element sparsity in (0, 1]: spare default dense LoRA, salun default 0.5")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the method (repeatable), e.g. --param eta=2 for esd, "
                        "--param lambda_=0.5 for siss; see spare_core.methods.METHODS")
    p.add_argument("--num-samples", type=int, default=16, help="concept samples for saliency")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps to generate them")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--timestep-sampler", choices=["concept", "uniform"], default=None,
                   help="default: concept for spare, uniform for the others")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")


def method_hparams(a: argparse.Namespace) -> dict:
    """The method's own options from the flags: spare's LoRA flags, salun's mask fraction, and
    every ``--param KEY=VALUE`` (unknown keys are refused by ``run_method``)."""
    hp = {}
    if a.method == "spare":
        hp.update(rank=a.rank, alpha=a.alpha, module_fraction=a.module_fraction,
                  mask_fraction=a.mask_fraction)
    elif a.method == "salun" and a.mask_fraction is not None:
        hp["mask_fraction"] = a.mask_fraction
    hp.update(parse_options(a.param, "--param"))
    return hp


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, unit="step")

    def cb(i: int, n: int, loss: float) -> None:
        bar.update(i - bar.n)
        bar.set_postfix(loss=f"{loss:.4g}")
    return bar, cb


def _check_unlearn_args(a: argparse.Namespace) -> None:
    from .methods import METHODS

    if not a.out.endswith(".safetensors"):
        raise ValueError(f"--out must end in .safetensors, got {a.out!r}")
    if METHODS[a.method].kind == "concept":
        if a.concept is None:
            raise ValueError(f"{a.method} forgets a concept: give --concept \"...\"")
        if a.forget_images or a.keep_images:
            raise ValueError(f"{a.method} forgets a concept prompt; --forget-images/--keep-images "
                             "are for the data methods (--method siss, ...)")
    else:
        if a.concept is not None:
            raise ValueError(f"{a.method} forgets images: give --forget-images DIR (and "
                             "--keep-images DIR) instead of --concept")
        if not a.forget_images:
            raise ValueError(f"{a.method} needs --forget-images DIR (the images to forget)")


def _image_size(den, vae) -> int:
    """Pixel size the UNet expects: its sample size, times the VAE's downscale if any."""
    size = int(den.unet.config.sample_size)
    if vae is not None:
        size *= 2 ** (len(vae.config.block_out_channels) - 1)
    return size


def _vae_encoder(vae, device: str):
    """``images [N, 3, H, W] in [-1, 1] -> latents [N, 4, H/8, W/8]`` (mean of the posterior,
    times the VAE's scaling factor, as diffusers' training scripts do)."""
    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vae.encode(x.to(device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    return encode


def _run(a: argparse.Namespace, den, vae, clip, cb):
    from .data_task import load_image_folder
    from .methods import METHODS, run_method

    common = dict(steps=a.steps, lr=a.lr, batch_size=a.batch_size, seed=a.seed,
                  timestep_sampler=a.timestep_sampler, progress=cb, **method_hparams(a))
    if METHODS[a.method].kind == "concept":
        return run_method(a.method, den, concept=a.concept, surrogate=a.surrogate,
                          preserve=a.preserve, num_samples=a.num_samples,
                          sample_steps=a.sample_steps, guidance=a.guidance, clip_x0=clip, **common)
    channels = 3 if vae is not None else int(den.unet.config.in_channels)
    size = _image_size(den, vae)
    forget = load_image_folder(a.forget_images, channels=channels, size=size)
    keep = load_image_folder(a.keep_images, channels=channels, size=size) if a.keep_images else None
    encode = _vae_encoder(vae, a.device) if vae is not None else None
    return run_method(a.method, den, forget=forget, keep=keep, forget_prompts=a.forget_prompt,
                      keep_prompts=a.keep_prompt, encode=encode, **common)


def cmd_unlearn(a: argparse.Namespace) -> int:
    from . import DiffusersDenoiser, save_adapter, to_comfy_lora, to_diffusers_lora
    from .files import atomic_save_safetensors
    from .grid import decode_latents, save_grid
    from .sampling import sample

    _check_unlearn_args(a)
    den = DiffusersDenoiser.from_pretrained(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    vae = None
    if os.path.isdir(os.path.join(a.model, "vae")):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae").to(a.device)
    clip = 1.0 if vae is None else None
    bar, cb = _progress_bar(a.steps, a.method)
    try:
        res = _run(a, den, vae, clip, cb)
    finally:
        bar.close()
    if a.concept is not None:
        meta = dict(method=a.method, concept=a.concept, surrogate=a.surrogate)
        prompts = [a.concept] + ([a.surrogate] if a.surrogate else []) + list(a.preserve)
    else:
        meta = dict(method=a.method, forget_images=os.path.abspath(a.forget_images))
        prompts = list(dict.fromkeys([a.forget_prompt or "", a.keep_prompt or ""]))
    if a.format == "native":
        save_adapter(res.adapter, a.out, unet=den.unet, **meta)
    else:
        sd = to_comfy_lora(res.adapter) if a.format == "comfy" else to_diffusers_lora(res.adapter)
        atomic_save_safetensors(sd, a.out, meta)
    print(f"wrote {a.out}: {a.method}, {res.history['trainable_params']} trainable parameters, "
          f"{res.history['seconds']:.1f} s, final loss {res.history['loss'][-1]:.4g}")
    if a.grid:
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
        save_grid(cells, a.grid, [p or "(empty prompt)" for p in prompts], ["before", "after"])
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
    a.argv = list(sys.argv[1:] if argv is None else argv)  # for reports that quote their command
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
