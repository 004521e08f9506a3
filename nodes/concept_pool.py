"""The concept images ComputeSaliency sampled, carried to SelfDistillUnlearn on SparseLoRAInit's
adapter, so that the node path samples them once, as ``spare_core.spare.spare_unlearn`` does.

They ride on the in-memory objects only (an attribute of the SALIENCY and of the ADAPTER, never
saved); SelfDistillUnlearn takes them when it would sample the same thing: the same concept
lines, at least as many images per concept, the same DDIM steps, guidance and size, from the
same MODEL (its checkpoint's weights and its patches); otherwise it samples its own pool.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

_ATTR = "_spare_concept_pool"


@dataclass(frozen=True)
class SampledPool:
    """``latents`` ``[k * per_concept, C, H, W]`` (CPU, concept-major, in ``concepts``' order),
    sampled with ``steps`` DDIM steps at ``guidance`` and ``size`` (width, height) pixels by the
    MODEL whose :func:`~nodes.comfy_bridge.sampling_identity` is ``model``."""

    latents: Tensor
    concepts: tuple[str, ...]
    per_concept: int
    steps: int
    guidance: float
    size: tuple[int, int]
    model: str

    def take(self, concepts: Sequence[str], per_concept: int, steps: int, guidance: float,
             size: tuple[int, int], model: str) -> Tensor | None:
        """The first ``per_concept`` latents of each of ``concepts`` (``[len * per_concept, C, H,
        W]``), or None unless they were sampled as asked."""
        same = (int(steps), float(guidance), tuple(size), model) == (
            self.steps, self.guidance, self.size, self.model)
        if not same or per_concept > self.per_concept or not set(concepts) <= set(self.concepts):
            return None
        rows = [self.concepts.index(c) * self.per_concept for c in concepts]
        return torch.cat([self.latents[r:r + per_concept] for r in rows])


def carry(obj: object, pool: SampledPool | None) -> None:
    """Attach ``pool`` to a SALIENCY or ADAPTER object (None: nothing to carry)."""
    if pool is not None:
        setattr(obj, _ATTR, pool)


def carried(obj: object) -> SampledPool | None:
    """The pool attached to ``obj`` by :func:`carry`, if any."""
    pool = getattr(obj, _ATTR, None)
    return pool if isinstance(pool, SampledPool) else None
