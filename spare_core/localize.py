"""Localisation: which modules an adapter trains (SPARE stage 1 as a pluggable, measured choice).

Each localisation names a module set of the network; the adapter (``spare_core.sparse_lora``)
then puts a LoRA of one rank on it. Compared at an equal trainable-parameter budget in
``benchmarks/localisation.py`` (tables in benchmarks/RESULTS.md, "Localisation"). All but
``text_encoder`` pick modules of the denoising network (UNet or DiT); ``text_encoder`` picks
the CLIP text encoder's instead and leaves the network untouched (:func:`network_for` gives
the module a selection picks from).

================  =========================================================================
name              module set
================  =========================================================================
saliency          top ``module_fraction`` of modules by ``|sum grad|`` of the plain denoising
                  loss on the concept's images under the concept prompt (SalUn, SPARE's code)
objective         the same ranking for the unlearning objective's own first-step gradient: the
                  concept prediction's distance to the frozen model's surrogate prediction
                  (ranks the weights that move the concept toward the surrogate)
contrastive       ranked by concept saliency over saliency of the same images under the
                  preserved prompts (weights that react to the concept's words, not to images)
text_kv           the projections that read the text (cross-attention to_k / to_v; on DiTs the
                  text stream's key/value projections), as UCE, MACE and ESD-x edit
random            as many modules as ``module_fraction`` gives, drawn at random (seeded): the
                  control for any ranking
all               every adaptable module but the input/output layers
text_encoder      the linear layers (self-attention q/k/v/out, MLP fc1/fc2) of the first block
                  of the CLIP text encoder, not of the UNet (HiRM); the student's prompts are
                  re-encoded through it at every step, the frozen teacher keeps the original
                  encodings (:mod:`spare_core.text_encoder`). Diffusers SD1.x/SD2.x only; dense
                  LoRA (no element mask), no adversarial training
================  =========================================================================

The first three need a saliency map (:func:`needs_saliency`); the others are fixed by the
network's names.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .families import IO_LAYERS, adaptable_modules, is_text_projection
from .recipes import LOCALIZATIONS, RANKED  # torch-free: the CLI reads them before torch loads
from .text_encoder import TEXT_ENCODER, UNET, adapted_network, first_block


def check_localization(name: str) -> None:
    """ValueError unless ``name`` is one of :data:`LOCALIZATIONS`."""
    if name not in LOCALIZATIONS:
        raise ValueError(f"module selection must be one of {list(LOCALIZATIONS)}, got {name!r}")


def needs_saliency(name: str) -> bool:
    """True when the localisation ranks modules by a saliency map."""
    return name in RANKED


def network_for(denoiser, how: str) -> nn.Module:
    """The module localisation ``how`` picks modules of (and the adapter addresses by name):
    ``denoiser.unet``, or for ``text_encoder`` the CLIP text transformer of
    ``denoiser.text_encoder`` (ValueError, before any work, for a backend without one)."""
    check_localization(how)
    return adapted_network(denoiser, TEXT_ENCODER if how == TEXT_ENCODER else UNET)


def candidates(unet: nn.Module, exclude: Sequence[str] = IO_LAYERS) -> list[str]:
    """Adaptable modules (Linear / Conv2d) of ``unet`` that a localisation may pick, in network
    order."""
    skip = set(exclude)
    return [n for n in adaptable_modules(unet) if n not in skip]


def text_projections(unet: nn.Module) -> list[str]:
    """The modules that read the text (see :func:`spare_core.families.is_text_projection`);
    ValueError if the network has none."""
    names = [n for n in adaptable_modules(unet) if is_text_projection(n)]
    if not names:
        raise ValueError(f"{type(unet).__name__} has no text key/value projections "
                         "(cross-attention to_k/to_v): use another module selection")
    return names


def select_modules(unet: nn.Module, how: str, *, saliency=None, fraction: float = 0.25,
                   count: int | None = None, seed: int = 0, reduce: str = "mean",
                   exclude: Sequence[str] = IO_LAYERS) -> list[str]:
    """Module names of ``unet`` for localisation ``how`` (:data:`LOCALIZATIONS`); for
    ``text_encoder``, ``unet`` is the CLIP text transformer (:func:`network_for`) and the names
    are its first block's linear layers.

    ``saliency``: a :class:`~spare_core.saliency.Saliency` whose module scores rank the modules
    (``saliency``, ``objective``, ``contrastive``: the caller computed it with the matching
    loss, see :func:`spare_core.saliency.compute_saliency`); ``fraction`` of the candidates are
    kept for those and for ``random`` (or exactly ``count`` of them, when given); ``reduce``
    (``mean`` / ``max``) turns a ranking's element scores into module scores."""
    check_localization(how)
    if how == "text_kv":
        return text_projections(unet)
    if how == TEXT_ENCODER:
        return first_block(unet)
    pool = candidates(unet, exclude)
    if how == "all":
        return pool
    if count is None:
        if not (0.0 < fraction <= 1.0):
            raise ValueError(f"module fraction must be in (0, 1], got {fraction}")
        count = max(1, round(fraction * len(pool)))
    elif count < 1:
        raise ValueError(f"module count must be >= 1, got {count}")
    if how == "random":
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
        return [pool[i] for i in order[:count].tolist()]
    if saliency is None:
        raise ValueError(f"module selection {how!r} ranks modules by saliency: compute it first")
    return saliency.top_modules(count=count, reduce=reduce, exclude=exclude)


def contrast(concept, preserve):
    """Per-module contrastive scores: concept saliency over preserve saliency (module means),
    as a :class:`~spare_core.saliency.Saliency` with per-module stats only."""
    from .saliency import Saliency

    c, p = concept.module_scores("mean"), preserve.module_scores("mean")
    tiny = 1e-12 + 1e-6 * max(p.values(), default=0.0)
    stats = {n: {"mean": c[n] / (p.get(n, 0.0) + tiny), "max": c[n] / (p.get(n, 0.0) + tiny)}
             for n in c}
    return Saliency({}, concept=concept.concept, num_samples=concept.num_samples, stats=stats,
                    shapes=dict(concept.shapes))


def lora_size(unet: nn.Module, modules: Sequence[str], rank: int) -> int:
    """Trainable parameters of a rank-``rank`` LoRA on ``modules`` (each clamped to the largest
    rank its layer allows): ``sum r_m (out_m + fan_in_m)``."""
    mods = adaptable_modules(unet)
    total = 0
    for n in modules:
        shape = tuple(mods[n].weight.shape)
        fan_in = math.prod(shape[1:])
        total += min(rank, shape[0], fan_in) * (shape[0] + fan_in)
    return total


def rank_for_budget(unet: nn.Module, modules: Sequence[str], budget: int) -> int:
    """The rank whose LoRA on ``modules`` comes closest to ``budget`` trainable parameters (ranks
    clamp per layer, see :func:`lora_size`); at least 1."""
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive number of parameters, got {budget!r}")
    mods = adaptable_modules(unet)
    top = max(min(int(mods[n].weight.shape[0]), math.prod(mods[n].weight.shape[1:]))
              for n in modules)
    best = min(range(1, top + 1), key=lambda r: (abs(lora_size(unet, modules, r) - budget), r))
    return best


def ranking_saliency(denoiser, how: str, prompts: Sequence[str], latents, *,
                     surrogates: Sequence[str] = ("",), preserve: Sequence[str] = (),
                     element_scores: bool = False, **saliency_kwargs):
    """The saliency map localisation ``how`` ranks modules by (:data:`RANKED`), for concept
    latents ``[N, C, H, W]`` with their ``prompts`` (one per latent) and ``surrogates`` (one per
    latent, or one for all). ``saliency_kwargs`` go to
    :func:`~spare_core.saliency.compute_saliency` (seed, batch_size, progress, ...).

    - ``saliency``: the plain denoising loss under the concept prompts;
    - ``objective``: the pull of the concept's prediction toward the frozen model's surrogate
      prediction (``target_prompts=surrogates``);
    - ``contrastive``: the plain map over the map of the same images and timesteps (same seed)
      under the preserved prompts, cycled over the latents; per-module scores only, so element
      masks cannot be drawn from it."""
    from .saliency import compute_saliency

    if how not in RANKED:
        raise ValueError(f"{how!r} ranks no saliency; rankings are {list(RANKED)}")
    check_ranking_inputs(how, preserve, element_scores)
    if how == "objective":
        return compute_saliency(denoiser, prompts, latents, target_prompts=list(surrogates),
                                element_scores=element_scores, **saliency_kwargs)
    plain = compute_saliency(denoiser, prompts, latents, element_scores=element_scores,
                             **saliency_kwargs)
    if how == "saliency":
        return plain
    others = [preserve[i % len(preserve)] for i in range(latents.shape[0])]
    return contrast(plain, compute_saliency(denoiser, others, latents, element_scores=False,
                                            **saliency_kwargs))


def check_ranking_inputs(how: str, preserve: Sequence[str], element_scores: bool = False) -> None:
    """ValueError (raised before any sampling) when localisation ``how`` lacks an input, or
    is asked for element scores it cannot give (contrastive keeps per-module ratios only, so
    no element mask can be drawn from it)."""
    check_localization(how)
    if how == "contrastive" and not [p for p in preserve if p.strip()]:
        raise ValueError("module selection 'contrastive' contrasts the concept with the preserved "
                         "prompts: give at least one preserve prompt, or choose another selection")
    if how == "contrastive" and element_scores:
        raise ValueError("contrastive saliency keeps one score per module, so it cannot mask "
                         "weight elements: keep the update dense (no mask fraction; ComfyUI: "
                         "element_scores off, mask_fraction 1) or rank by saliency or objective")
