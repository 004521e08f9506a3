"""SPARE stage 1: turn a saliency map into a sparse LoRA adapter."""
from __future__ import annotations

import math

import torch
from torch import nn

from .adapter import UnlearnAdapter, init_sparse_lora
from .families import IO_LAYERS, adaptable_modules

IO_CONVS = IO_LAYERS  # the name the API has used since the UNet-only days
from .saliency import Saliency


def check_rank(unet: nn.Module, rank: int, exclude: tuple[str, ...] = IO_CONVS) -> None:
    """Raise ValueError unless ``rank`` fits every module saliency may pick (checked up front,
    before any generation, since which modules are picked is known only after saliency)."""
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    for name, m in adaptable_modules(unet).items():
        if name in exclude:
            continue
        w = m.weight.shape
        limit = min(int(w[0]), int(math.prod(w[1:])))
        if rank > limit:
            raise ValueError(f"rank {rank} is larger than layer {name} allows (weight {list(w)}: "
                             f"at most {limit}); choose a lower rank")


MODULE_SELECTIONS = ("saliency", "random")


def check_selection(selection: str) -> None:
    """ValueError unless ``selection`` is one of :data:`MODULE_SELECTIONS`."""
    if selection not in MODULE_SELECTIONS:
        raise ValueError(f"module selection must be one of {list(MODULE_SELECTIONS)}, "
                         f"got {selection!r}")


def sparse_lora_from_saliency(unet: nn.Module, saliency: Saliency, *, rank: int = 4,
                              alpha: float | None = None, module_fraction: float | None = 0.25,
                              top_modules: int | None = None, mask_fraction: float | None = None,
                              mask_scope: str = "layer", module_reduce: str = "mean",
                              exclude: tuple[str, ...] = IO_CONVS, selection: str = "saliency",
                              seed: int = 0) -> UnlearnAdapter:
    """LoRA on the most salient modules, optionally element-masked.

    Args:
        module_fraction: share of Linear/Conv2d modules adapted, ranked by module saliency
            (ignored when ``top_modules`` is given).
        mask_fraction: if set, in (0, 1]: each adapted module's update is multiplied by a mask
            keeping this share of its most salient elements (``mask_scope='layer'``) or of all
            adapted elements ranked together (``'global'``). None: dense low-rank update.
        exclude: modules never adapted. Default: the UNet's input and output convolutions, which
            every denoising gradient passes through (they rank high for any concept), so adapting
            them would shift every output rather than the concept's.
        selection: ``"saliency"`` (SPARE) adapts the top-ranked modules; ``"random"`` adapts as
            many modules drawn uniformly at random (seeded) from the same candidates, the
            control that tells what the saliency ranking itself is worth.
        rank: must fit every chosen layer; checked before anything is allocated.
    """
    check_selection(selection)
    if mask_fraction is not None and not (0.0 < mask_fraction <= 1.0):
        raise ValueError(f"sparsity (mask fraction) must be in (0, 1], got {mask_fraction}")
    if top_modules is None and module_fraction is not None and not (0.0 < module_fraction <= 1.0):
        raise ValueError(f"module fraction must be in (0, 1], got {module_fraction}")
    modules = saliency.top_modules(count=top_modules,
                                   fraction=None if top_modules is not None else module_fraction,
                                   reduce=module_reduce, exclude=exclude)
    if selection == "random":
        pool = [n for n in saliency.modules if n not in set(exclude)]
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
        modules = [pool[i] for i in order[:len(modules)].tolist()]
    masks = None
    if mask_fraction is not None and mask_fraction < 1.0:
        masks = saliency.mask(fraction=mask_fraction, scope=mask_scope, modules=modules)
    meta = {"concept": saliency.concept, "rank": str(rank),
            "mask_fraction": "" if mask_fraction is None else repr(mask_fraction),
            "module_count": str(len(modules)), "module_selection": selection}
    return init_sparse_lora(unet, modules, rank=rank, alpha=alpha, masks=masks, seed=seed, meta=meta)
