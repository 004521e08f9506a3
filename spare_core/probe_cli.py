"""``spare probe``: does an erasure hold? Attack an erased model (a pipeline folder and the
adapter that erased the concept) with the UnlearnDiffAtk-style prompt attack
(:mod:`spare_core.probe`) and show what the found prompt makes.

For each ``--concept``, the original model draws ``--num-images`` latents of it, the attack fits
``--attack-tokens`` prefix tokens to them on the erased model, and the found prompt is printed;
``--grid`` writes rows (concepts) x columns (original on the concept, erased on the concept,
erased on the found prompt), ``--json`` the found prompts and losses. ``--paraphrase`` adds a
row per other wording of the concept (the erased model on it: the paraphrase probe).
"""
from __future__ import annotations

import argparse
import os

from . import cli_args as A


def add_command(sub) -> None:
    p = sub.add_parser("probe", help="attack an erased model with an adversarial prompt",
                       description=__doc__.split("\n\n")[0].replace("``", "'"),
                       formatter_class=A.HelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline folder (SD1.x/SD2.x)")
    p.add_argument("--adapter", required=True,
                   help="the adapter that erased the concept (.safetensors written by spare "
                        "unlearn, native format)")
    p.add_argument("--concept", type=A.prompt, action="append", required=True,
                   help="prompt of the erased concept to attack (repeat for several)")
    p.add_argument("--paraphrase", type=A.prompt, action="append", default=[],
                   help="another wording of the concept to render on the erased model (repeat)")
    p.add_argument("--attack-steps", type=A.positive_int, default=40)
    p.add_argument("--attack-tokens", type=A.positive_int, default=5)
    p.add_argument("--num-images", type=A.positive_int, default=4,
                   help="images of each concept from the original model (the attack's target) "
                        "and per grid cell")
    p.add_argument("--sample-steps", type=A.positive_int, default=25)
    p.add_argument("--guidance", type=A.nonnegative_float, default=7.5)
    p.add_argument("--seed", type=A.seed, default=0)
    p.add_argument("--grid", default=None, help="PNG grid to write")
    p.add_argument("--json", default=None, help="found prompts and losses to write (.json)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --grid / --json")
    p.add_argument("--device", type=A.device, default="auto")
    p.set_defaults(func=cmd_probe, check=check_probe_args)


def check_probe_args(a: argparse.Namespace) -> None:
    A.check_pipeline_folder(a.model)
    if not os.path.isfile(a.adapter):
        raise FileNotFoundError(f"--adapter {a.adapter!r} does not exist: give the .safetensors "
                                "file spare unlearn wrote")
    if a.grid is not None and not a.grid.lower().endswith(".png"):
        raise ValueError(f"--grid must end in .png, got {a.grid!r}")
    if a.json is not None and not a.json.lower().endswith(".json"):
        raise ValueError(f"--json must end in .json, got {a.json!r}")
    A.check_new_path(a.grid, "--grid", a.overwrite)
    A.check_new_path(a.json, "--json", a.overwrite)


def cmd_probe(a: argparse.Namespace) -> int:
    import torch

    from . import load_denoiser
    from .cli import resolve_device
    from .files import atomic_write_json, load_adapter
    from .probe import AttackConfig, attack, prompt_access
    from .progress import PhaseBars, quiet_libraries
    from .sampling import sample
    from .threads import apply as apply_threads

    quiet_libraries()
    a.device = resolve_device(a.device)
    den = load_denoiser(a.model, device=a.device)
    prompt_access(den)  # a text stack the attack cannot reach is refused before any sampling
    if a.device == "cpu":
        apply_threads(den)
    adapter = load_adapter(a.adapter, den)
    vae = None
    if os.path.isdir(os.path.join(a.model, "vae")):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae",
                                            use_safetensors=True).to(a.device)
    clip = 1.0 if vae is None else None
    kw = dict(steps=a.sample_steps, guidance=a.guidance, method="ddim", clip_x0=clip)

    def draw(prompt: str, bars, what: str):
        return sample(den, [prompt] * a.num_images, generator=torch.Generator().manual_seed(a.seed),
                      callback=bars.sampler(what), **kw)

    with PhaseBars("probe") as bars:
        originals = [draw(c, bars, f"original {c[:20]!r}") for c in a.concept]
        with adapter.applied_to(den):
            res = attack(den, a.concept, originals,
                         AttackConfig(tokens=a.attack_tokens, steps=a.attack_steps, seed=a.seed),
                         progress=bars.train)
            erased = [draw(c, bars, f"erased {c[:20]!r}") for c in a.concept]
            found = [draw(p, bars, f"found {p[:20]!r}") for p in res.prompts]
            para = [draw(p, bars, f"paraphrase {p[:20]!r}") for p in a.paraphrase]
    for c, p in zip(a.concept, res.prompts):
        print(f"{c!r}: found prompt {p!r}")
    print(f"attack: {a.attack_steps} steps, {res.seconds:.1f} s")
    if a.json:
        atomic_write_json({"model": a.model, "adapter": a.adapter, "seconds": res.seconds,
                           "losses": res.losses,
                           "found": dict(zip(a.concept, res.prompts))}, a.json)
        print(f"wrote {a.json}")
    if a.grid:
        from .grid import decode_latents, save_grid

        cells = [[decode_latents(x, vae) for x in row] for row in zip(originals, erased, found)]
        blank = torch.ones_like(decode_latents(originals[0], vae))  # white: no such cell
        cells += [[blank, decode_latents(x, vae), blank] for x in para]
        save_grid(cells, a.grid, list(a.concept) + [f"paraphrase: {p}" for p in a.paraphrase],
                  ["original", "erased", "erased, found prompt"])
        print(f"wrote {a.grid}")
    return 0
