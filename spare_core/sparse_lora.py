"""SPARE stage 1: turn a saliency map into a sparse LoRA adapter."""
from __future__ import annotations

import math

from torch import nn

from .adapter import UnlearnAdapter, init_sparse_lora
from .families import IO_LAYERS, adaptable_modules

IO_CONVS = IO_LAYERS  # the name the API has used since the UNet-only days
from .localize import select_modules  # noqa: E402
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


from .localize import LOCALIZATIONS as MODULE_SELECTIONS  # noqa: E402
from .localize import check_localization as check_selection  # noqa: E402,F401


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
        selection: a localisation of :mod:`spare_core.localize`: ``"saliency"`` (and
            ``"objective"`` / ``"contrastive"``, whose maps the caller computed) adapt the
            top-ranked modules; ``"random"`` as many modules drawn at random (seeded) from the
            same candidates, the control that tells what a ranking is worth; ``"text_kv"`` the
            projections that read the text; ``"all"`` every candidate.
        rank: must fit every chosen layer; checked before anything is allocated.
    """
    check_selection(selection)
    if top_modules is None and module_fraction is not None and not (0.0 < module_fraction <= 1.0):
        raise ValueError(f"module fraction must be in (0, 1], got {module_fraction}")
    modules = select_modules(unet, selection, saliency=saliency,
                             fraction=1.0 if module_fraction is None else module_fraction,
                             count=top_modules, seed=seed, reduce=module_reduce,
                             exclude=exclude)
    return sparse_lora_on(unet, modules, rank=rank, alpha=alpha, saliency=saliency,
                          mask_fraction=mask_fraction, mask_scope=mask_scope, seed=seed,
                          selection=selection)


def sparse_lora_on(unet: nn.Module, modules: list[str], *, rank: int = 4,
                   alpha: float | None = None, saliency: Saliency | None = None,
                   mask_fraction: float | None = None, mask_scope: str = "layer", seed: int = 0,
                   selection: str = "", clamp_rank: bool = False) -> UnlearnAdapter:
    """LoRA of ``rank`` on ``modules``; with ``mask_fraction`` < 1 each update is multiplied by
    the mask of ``saliency``'s most salient elements (which then needs element scores).
    ``clamp_rank``: a layer whose weight cannot hold ``rank`` gets the largest rank it allows
    (else ValueError)."""
    if mask_fraction is not None and not (0.0 < mask_fraction <= 1.0):
        raise ValueError(f"sparsity (mask fraction) must be in (0, 1], got {mask_fraction}")
    masks = None
    if mask_fraction is not None and mask_fraction < 1.0:
        if saliency is None:
            raise ValueError("an element mask (mask_fraction < 1) needs a saliency map")
        masks = saliency.mask(fraction=mask_fraction, scope=mask_scope, modules=modules)
    meta = {"concept": "" if saliency is None else saliency.concept, "rank": str(rank),
            "mask_fraction": "" if mask_fraction is None else repr(mask_fraction),
            "module_count": str(len(modules)), "module_selection": selection}
    return init_sparse_lora(unet, modules, rank=rank, alpha=alpha, masks=masks, seed=seed,
                            meta=meta, clamp_rank=clamp_rank)
