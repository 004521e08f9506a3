"""The ``spare`` command line: spare unlearn (any method of the engine), spare demo, spare bench,
spare probe.

Every argument is checked before torch is imported (a bad one costs a fraction of a second);
existing files are never replaced without ``--overwrite``; Ctrl-C exits with status 130 and one
line; each phase of a run draws its own progress bar.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

from . import auto_settings
from . import cli_args as A
from . import concept_list
from .cli_args import CONCEPT_METHODS, DATA_METHODS, METHOD_NAMES
from .recipes import (FAMILY_GUIDANCE, LOCALIZATIONS, RECIPES, SALIENCY_MICRO_BATCH, guidance_for,
                      recipe)

_SPARE = RECIPES["spare"]

DESCRIPTION = ("Make text-to-image diffusion models forget a concept or a set of images "
               "(SPARE: saliency + sparse LoRA + self-distillation; SalUn, ESD, SISS, ...). "
               "Run 'spare COMMAND --help' for a command's options.")
INTERRUPTED = 130


def _add_unlearn(sub) -> None:
    p = sub.add_parser(
        "unlearn", help="forget a concept or a set of images in a diffusers pipeline folder "
                        "(offline)", formatter_class=A.HelpFormatter,
        description="Forget a concept (spare, salun, esd, esd_u) or a set of images (siss, "
                    "neggrad, erasediff, naive_deletion) in a diffusers pipeline folder, offline; "
                    "write the adapter (--out), optionally a before/after grid (--grid) and the "
                    "pipeline with the adapter baked into its UNet (--merged-out).")
    p.add_argument("--model", required=True,
                   help="pipeline folder written by pipe.save_pretrained(): SD1.x, SD2.x, SDXL, SD3 or Flux (read offline)")
    p.add_argument("--method", choices=METHOD_NAMES, default="spare",
                   help=f"concept methods {', '.join(CONCEPT_METHODS)} take --concept; data "
                        f"methods {', '.join(DATA_METHODS)} take --forget-images/--keep-images")
    p.add_argument("--concept", type=A.prompt, action="append", default=None,
                   help="prompt of the concept to forget; repeat it (or put one per line) to "
                        "erase several (spare: one adapter per concept, fused; --shared for one "
                        "adapter)")
    p.add_argument("--surrogate", action="append", default=None,
                   help="what the concept becomes ('' = the unconditional prediction); repeat "
                        "it once per --concept, or give one for all")
    p.add_argument("--preserve", type=A.prompt, action="append", default=[],
                   help="prompt whose images must not change (repeatable)")
    concept_list.add_arguments(p)  # --concept-list, --per-concept, --fusion, --processes
    p.add_argument("--forget-images", default=None,
                   help="folder of the images to forget (data methods)")
    p.add_argument("--keep-images", default=None,
                   help="folder of the images to keep (data methods)")
    p.add_argument("--forget-prompt", default=None, help="prompt of the forget images ('' if unset)")
    p.add_argument("--keep-prompt", default=None, help="prompt of the keep images ('' if unset)")
    p.add_argument("--out", default="spare_adapter.safetensors",
                   help="adapter file to write (.safetensors)")
    p.add_argument("--format", choices=["native", "comfy", "diffusers"], default="native",
                   help="native SPARE adapter, ComfyUI/kohya LoRA, or diffusers/PEFT LoRA")
    p.add_argument("--grid", default=None, help="before/after PNG grid to write (.png)")
    p.add_argument("--merged-out", default=None, metavar="DIR",
                   help="also write the pipeline folder with the adapter baked into the UNet "
                        "weights (or the text encoder's, for --module-selection text_encoder; "
                        "what one ships: nothing to unplug)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out, --grid and --merged-out if they exist")
    p.add_argument("--steps", type=A.positive_int, default=None,
                   help=f"training steps (default: the method's recipe, spare {_SPARE.steps})")
    p.add_argument("--lr", type=A.positive_float, default=None,
                   help=f"learning rate (default: the method's recipe, spare {_SPARE.lr}; the "
                        "others their paper's lr x steps budget)")
    p.add_argument("--batch-size", type=A.positive_int, default=None,
                   help="latents per training step, forget and keep each (default: the method's "
                        f"recipe, spare {_SPARE.batch_size})")
    p.add_argument("--module-selection", choices=LOCALIZATIONS, default=None,
                   help="which modules the LoRA adapts (spare; spare_core.localize; "
                        "text_encoder: the first block of the CLIP text encoder, SD1.x/SD2.x; "
                        f"default {_SPARE.hparams['module_selection']})")
    p.add_argument("--rank", type=A.positive_int, default=None,
                   help=f"LoRA rank (spare; default {_SPARE.hparams['rank']})")
    p.add_argument("--alpha", type=A.positive_float, default=None,
                   help="LoRA alpha (spare; default: the rank, i.e. scale 1)")
    p.add_argument("--module-fraction", type=A.fraction, default=None,
                   help="share of the candidate modules a ranked or random selection adapts "
                        f"(spare; default {_SPARE.hparams['module_fraction']})")
    p.add_argument("--mask-fraction", type=A.fraction, default=None,
                   help="share of each adapted weight's elements kept by a saliency mask, in "
                        "(0, 1] (default: spare none, i.e. a dense LoRA; salun 0.5)")
    p.add_argument("--param", type=A.key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the method (repeatable), e.g. --param eta=2 for esd, "
                        "--param lambda_=0.5 for siss; see spare_core.methods.METHODS")
    p.add_argument("--num-samples", type=A.positive_int, default=None,
                   help="images generated per concept (and per preserved prompt) for training "
                        f"(default: the method's recipe, spare {_SPARE.num_samples})")
    p.add_argument("--sample-steps", type=A.positive_int, default=None,
                   help="DDIM steps to generate them and the grid (default: the method's "
                        f"recipe, spare {_SPARE.sample_steps})")
    p.add_argument("--guidance", type=A.nonnegative_float, default=None,
                   help="classifier-free guidance of those samples (default: by model family: "
                        + ", ".join(f"{k} {v}" for k, v in FAMILY_GUIDANCE.items()) + ")")
    p.add_argument("--timestep-sampler", choices=["concept", "uniform"], default=None,
                   help="training timesteps (default: concept for spare, uniform for the others)")
    p.add_argument("--seed", type=A.seed, default=0, help="seed of sampling and training")
    p.add_argument("--device", type=A.device, default="auto",
                   help="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="dtype the model is loaded and computed in (the adapter trains in float32; "
                        "float16 uses dynamic loss scaling); auto: bfloat16 on GPUs that compute "
                        "it, float16 on other GPUs, float32 on the CPU")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="recompute activations in backward: far less memory, ~1.2-1.4x the time "
                        "(default: on when the device's free memory is under "
                        f"{auto_settings.CONTROLS_OFF_FACTOR:g}x the weights' size)")
    p.add_argument("--split-backward", action=argparse.BooleanOptionalAction, default=None,
                   help="back-propagate the forget and preserve terms one at a time (spare; "
                        "default: as --gradient-checkpointing)")
    p.add_argument("--text-encoders", choices=["auto", "device", "cpu"], default="auto",
                   help="where the pipeline's text encoders live (they encode the run's prompts "
                        "once per use; T5-XXL is 8.87 GB in bf16); auto: the CPU where the "
                        "memory controls are on for a GPU, else the device")
    p.add_argument("--micro-batch", type=A.positive_int, default=None,
                   help="concept images per saliency forward/backward (spare, salun; default: 1 "
                        f"where the memory controls are on, else {SALIENCY_MICRO_BATCH})")
    p.add_argument("--early-stop-every", type=int, default=None, metavar="N",
                   help="data methods: every N steps, check whether the forget images are still "
                        "memorised and stop once they are not (0 = off; default: the method's "
                        f"recipe, siss {RECIPES['siss'].hparams['early_stop_every']})")
    p.set_defaults(func=cmd_unlearn, check=check_unlearn_args)


def check_unlearn_args(a: argparse.Namespace) -> None:
    """Every check of ``spare unlearn`` that needs no torch (ValueError/FileNotFoundError naming
    the fix)."""
    from .threads import requested_threads

    requested_threads()
    if not a.out.endswith(".safetensors"):
        raise ValueError(f"--out must end in .safetensors, got {a.out!r}")
    if a.grid is not None and not a.grid.lower().endswith(".png"):
        raise ValueError(f"--grid must end in .png, got {a.grid!r}")
    A.check_pipeline_folder(a.model)
    # repeated --concept / --surrogate: one per line, as the engine takes several concepts
    if isinstance(a.concept, list):
        a.concept = "\n".join(a.concept)
    if not isinstance(a.surrogate, str):
        a.surrogate = "\n".join(a.surrogate or [""])
    concept_list.check_arguments(a)
    if a.per_concept and a.method not in CONCEPT_METHODS:
        raise ValueError(f"--per-concept trains one adapter per concept: a concept method "
                         f"({', '.join(CONCEPT_METHODS)})")
    if a.method in CONCEPT_METHODS:
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
        A.check_image_folder(a.forget_images, "--forget-images")
        A.check_image_folder(a.keep_images, "--keep-images")
    if a.merged_out and os.path.abspath(a.merged_out) == os.path.abspath(a.model):
        raise ValueError("--merged-out must differ from --model (the original stays untouched)")
    A.check_new_path(a.out, "--out", a.overwrite)
    A.check_new_path(a.grid, "--grid", a.overwrite)
    A.check_new_path(a.merged_out, "--merged-out", a.overwrite)
    every = getattr(a, "early_stop_every", None)
    if every is not None and (every < 0 or a.method in CONCEPT_METHODS):
        raise ValueError(f"--early-stop-every takes an integer >= 0 (0 = off) and applies to the "
                         f"data methods {', '.join(DATA_METHODS)}")


def _needs_text_encoder(method: str, hp: dict) -> bool:
    """Whether the run differentiates through the text encoder on the device: SPARE's
    ``text_encoder`` localisation trains it, and the adversarial option's attack back-propagates
    through it to its prompt tokens (the recipe's values where ``hp`` names none)."""
    from .methods import METHODS

    full = {**METHODS[method].hparams, **hp}
    return full.get("module_selection") == "text_encoder" or bool(full.get("adversarial"))


def method_hparams(a: argparse.Namespace) -> dict:
    """The method's own options from the flags: spare's LoRA flags, salun's mask fraction, and
    every ``--param KEY=VALUE``; ValueError for a key the method does not take."""
    from .methods import METHODS, parse_options

    hp = {}
    if a.method == "spare":
        given = dict(rank=a.rank, alpha=a.alpha, module_fraction=a.module_fraction,
                     mask_fraction=a.mask_fraction, module_selection=a.module_selection)
        hp.update({k: v for k, v in given.items() if v is not None})
    elif a.method == "salun" and a.mask_fraction is not None:
        hp["mask_fraction"] = a.mask_fraction
    if getattr(a, "early_stop_every", None) is not None:
        hp["early_stop_every"] = a.early_stop_every
    hp.update(parse_options(a.param, "--param", METHODS[a.method].hparams))
    unknown = sorted(set(hp) - set(METHODS[a.method].hparams))
    if unknown:
        raise ValueError(f"{a.method} does not take {unknown}; its options are "
                         f"{sorted(METHODS[a.method].hparams)}")
    return hp


def resolve_device(name: str) -> str:
    """``auto`` -> cuda if available else cpu; ValueError if the named device is unavailable."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        idx = int(name.partition(":")[2] or 0)
        if idx >= n:
            raise ValueError(f"--device {name}: torch sees {n} CUDA device(s); use --device cpu "
                             "or --device auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available; use --device cpu or --device auto")
    return name


def _image_size(den, vae) -> int:
    """Pixel size the network expects: its latent size, times the VAE's downscale if any."""
    size = int(den.latent_shape[1])
    if vae is not None:
        size *= 2 ** (len(vae.config.block_out_channels) - 1)
    return size


def _vae_encoder(vae, device: str):
    """``images [N, 3, H, W] in [-1, 1] -> latents [N, C, H/8, W/8]`` (mean of the posterior,
    minus the VAE's shift factor (SD3, Flux), times its scaling factor, as diffusers' training
    scripts do)."""
    import torch

    shift = getattr(vae.config, "shift_factor", None) or 0.0

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            mean = vae.encode(x.to(device, vae.dtype)).latent_dist.mean
            return (mean - shift) * vae.config.scaling_factor
    return encode


def _run(a: argparse.Namespace, den, vae, clip, hp: dict, bars):
    from .data_task import load_image_folder
    from .methods import METHODS, run_method

    common = dict(steps=a.steps, lr=a.lr, batch_size=a.batch_size, seed=a.seed,
                  timestep_sampler=a.timestep_sampler, progress=bars.train,
                  phase_progress=bars.phase, gradient_checkpointing=a.gradient_checkpointing,
                  backward_per_term=a.split_backward, saliency_batch_size=a.micro_batch, **hp)
    concept_run = dict(preserve=list(a.preserve), num_samples=a.num_samples,
                       sample_steps=a.sample_steps, guidance=a.guidance, clip_x0=clip)
    if a.per_concept:  # one adapter per concept, fused (spread over torchrun's processes)
        from .multi_concept import unlearn_concepts
        from .tasks import concept_pairs
        per_job = {k: v for k, v in common.items() if k not in ("progress", "phase_progress")}
        return unlearn_concepts(a.method, den, concept_pairs(a.concept, a.surrogate),
                                fusion=a.fusion, fused_rank=a.fused_rank, bars=True,  # per rank
                                **concept_run, **per_job)
    if METHODS[a.method].kind == "concept":
        return run_method(a.method, den, concept=a.concept, surrogate=a.surrogate,
                          **concept_run, **common)
    channels = 3 if vae is not None else int(den.latent_shape[0])
    size = _image_size(den, vae)
    forget = load_image_folder(a.forget_images, channels=channels, size=size)
    keep = load_image_folder(a.keep_images, channels=channels, size=size) if a.keep_images else None
    encode = _vae_encoder(vae, a.device) if vae is not None else None
    return run_method(a.method, den, forget=forget, keep=keep, forget_prompts=a.forget_prompt,
                      keep_prompts=a.keep_prompt, encode=encode, **common)


def _write_grid(a: argparse.Namespace, den, vae, clip, adapter, prompts, bars) -> None:
    import torch

    from .grid import decode_latents, save_grid
    from .sampling import sample

    cells = []
    for p in prompts:
        row = []
        for when, ctx in (("before", nullcontext()), ("after", adapter.applied_to(den))):
            with ctx:
                lat = sample(den, [p] * 4, steps=a.sample_steps, guidance=a.guidance,
                             method="ddim", generator=torch.Generator().manual_seed(a.seed),
                             clip_x0=clip, callback=bars.sampler(f"grid {p[:20]!r} {when}"))
            row.append(decode_latents(lat, vae))
        cells.append(row)
    bars.close()
    save_grid(cells, a.grid, [p or "(empty prompt)" for p in prompts], ["before", "after"])


def cmd_unlearn(a: argparse.Namespace) -> int:
    import torch

    from . import load_denoiser, save_adapter, to_comfy_lora, to_diffusers_lora
    from .export import save_merged_pipeline
    from .files import atomic_save_safetensors
    from .progress import PhaseBars, quiet_libraries
    from .threads import apply as apply_threads

    quiet_libraries()
    hp = method_hparams(a)
    a.device = resolve_device(a.device)
    launch = concept_list.torchrun_arguments(a)
    if launch is not None:  # --processes N: the same command under torchrun (its Python API)
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import get_args_parser, run as torchrun
        try:
            torchrun(get_args_parser().parse_args(launch))
        except ChildFailedError:  # each failing rank has printed its error
            return 1
        return 0
    if a.per_concept:
        from .multi_concept import init_distributed, rank_device
        a.device = rank_device(a.device)
        init_distributed(a.device)
    auto = auto_settings.choose(a.device, auto_settings.network_parameters(a.model),
                                dtype=a.dtype, gradient_checkpointing=a.gradient_checkpointing,
                                split_backward=a.split_backward, micro_batch=a.micro_batch,
                                text_encoders=a.text_encoders,
                                needs_text_encoder=_needs_text_encoder(a.method, hp))
    a.dtype, a.micro_batch = auto.dtype, auto.micro_batch
    a.gradient_checkpointing, a.split_backward = auto.gradient_checkpointing, auto.split_backward
    for reason in auto.reasons:  # what "auto" chose, and why
        print(f"spare unlearn: auto: {reason}", file=sys.stderr)
    den = load_denoiser(a.model, dtype=getattr(torch, a.dtype), device=a.device,
                        text_encoders_device="cpu" if auto.text_encoders == "cpu" else None)
    if a.device == "cpu":
        apply_threads(den)
    # unset sampling flags: the method's recipe, the family's guidance (also for --grid)
    a.sample_steps = a.sample_steps or recipe(a.method).sample_steps
    a.guidance = guidance_for(den, a.guidance)
    vae = None
    if os.path.isdir(os.path.join(a.model, "vae")):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae",
                                            use_safetensors=True).to(a.device)
    clip = 1.0 if vae is None else None
    from .multi_concept import ConceptJobError
    try:
        with PhaseBars(a.method) as bars:
            res = _run(a, den, vae, clip, hp, bars)
    except ConceptJobError as e:  # a per-concept job failed (on some rank): nothing written
        print(f"spare unlearn: error: {e}", file=sys.stderr)
        return 1
    if res is None:  # a torchrun rank other than 0: rank 0 fuses and writes
        return 0
    if a.concept is not None:
        meta = dict(method=a.method, concept=a.concept, surrogate=a.surrogate)
        from .tasks import concept_pairs
        lines = [x for pair in concept_pairs(a.concept, a.surrogate) for x in pair if x]
        prompts = list(dict.fromkeys(lines)) + list(a.preserve)
    else:
        meta = dict(method=a.method, forget_images=os.path.abspath(a.forget_images))
        prompts = list(dict.fromkeys([a.forget_prompt or "", a.keep_prompt or ""]))
    if a.format == "native":
        save_adapter(res.adapter, a.out, unet=res.adapter.root_of(den), **meta)
    else:
        sd = to_comfy_lora(res.adapter) if a.format == "comfy" else to_diffusers_lora(res.adapter)
        atomic_save_safetensors(sd, a.out, meta)
    print(f"wrote {a.out}: {a.method}, {res.history['trainable_params']} trainable parameters, "
          f"{res.history['seconds']:.1f} s"
          + (f", final loss {res.history['loss'][-1]:.4g}" if res.history["loss"] else
             f" (fused by {res.history['fusion']})" if "fusion" in res.history else
             " (closed form)" if "probe" not in res.history else ""))
    if res.history.get("probe"):  # data methods: where the early stop ended it, and the cost
        from .data_task import probe_summary
        print(probe_summary(res.history))
    if a.grid:
        with PhaseBars() as bars:
            _write_grid(a, den, vae, clip, res.adapter, prompts, bars)
        print(f"wrote {a.grid}")
    if a.merged_out:
        save_merged_pipeline(a.model, res.adapter, a.merged_out, overwrite=a.overwrite)
        where = "text encoder" if res.adapter.root == "text_encoder" else "UNet"
        print(f"wrote {a.merged_out}: the pipeline with the adapter merged into its {where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``spare`` parser (building it imports no torch)."""
    from . import bench, demo, probe_cli  # torch-free at import

    parser = argparse.ArgumentParser(prog="spare", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _add_unlearn(sub)
    demo.add_command(sub)
    bench.add_command(sub)
    probe_cli.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``spare``; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    try:
        parser = build_parser()
        try:
            a = parser.parse_args(argv)
        except SystemExit as e:  # --help (0) or an argparse error (2, already printed)
            return int(e.code or 0)
        a.argv = list(sys.argv[1:] if argv is None else argv)  # for reports quoting the command
        try:
            a.check(a)
            return a.func(a)
        except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
            print(f"spare {a.cmd}: error: {e}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print("\nspare: interrupted (Ctrl-C); files are written atomically, so nothing was left "
              "half-written", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
