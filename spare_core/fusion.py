"""Fusing several adapters (one per concept) into one :class:`~spare_core.adapter.UnlearnAdapter`.

Every fusion reads the adapters' dense deltas ``D_i`` (``adapter.merged()``, weight-shaped) per
module, over the union of the modules they adapt (a module an adapter lacks counts as ``D_i = 0``):

- ``sum``: ``D = sum_i D_i``. Dense LoRAs are concatenated (``A = [A_1; A_2; ...]``,
  ``B = [s_1 B_1, s_2 B_2, ...]``), which is the sum exactly, at rank ``sum_i r_i``;
- ``ties``: TIES-merging (Yadav et al. 2023): keep each ``D_i``'s top ``density`` share by
  magnitude, elect each element's sign by the summed trimmed values, average the values that agree
  with it (peft's ``peft.utils.merge_utils.ties``, a dependency of this package);
- ``least_squares``: MACE's closed form (Lu et al. 2024). For a Linear weight ``W`` it finds
  ``W' = W + D`` minimising ``sum_i ||W' X_i - (W + D_i) X_i||^2 + w ||W' X_p - W X_p||^2
  + lambda ||D||^2`` over concept ``i``'s own inputs ``X_i`` and the preserved prompts' inputs
  ``X_p``, i.e. ``D (sum_i G_i + w G_p + lambda I) = sum_i D_i G_i`` with Gram matrices
  ``G = X X^T / n``; ``lambda = ridge * trace(sum G) / in``. Conv2d weights (whose inputs are
  image patches, Grams of in*kh*kw squared) are summed instead.

``sum`` of dense LoRAs stays a LoRA exactly; any other result is refactored to a LoRA by
truncated SVD at ``rank`` (default: the sum of the contributors' ranks, capped by the layer;
a module with a masked or full contributor is kept dense by default) or, ``rank=0``, kept dense (a ``full`` delta; the native file holds it and the ComfyUI export writes
it as ``.diff`` keys). The fused adapter is an ordinary UnlearnAdapter: save_adapter,
load_adapter, to_comfy_lora and to_diffusers_lora take it unchanged.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .adapter import LoRADelta, MaskedFullDelta, UnlearnAdapter, is_dense_lora, svd_factors
from .concept_list import FUSIONS  # noqa: F401  (defined torch-free, for the CLI)

TIES_DENSITY = 0.2
"""TIES-merging's default share of each delta kept (the TIES paper's top 20%)."""
LS_RIDGE = 1e-3
"""The least-squares fusion's ridge, relative to the Grams' mean diagonal."""


def check_fusion(name: str) -> None:
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; choose one of {list(FUSIONS)}")


def union_names(adapters: Sequence[UnlearnAdapter]) -> list[str]:
    """Module names adapted by any adapter, in first-seen order; ValueError when the adapters edit
    different networks (UNet vs text encoder) or give one module two shapes."""
    if not adapters:
        raise ValueError("nothing to fuse: no adapters")
    roots = {a.root for a in adapters}
    if len(roots) > 1:
        raise ValueError(f"cannot fuse adapters of different networks: {sorted(roots)}")
    shapes: dict[str, tuple] = {}
    for a in adapters:
        for n in a.names:
            s = tuple(a[n].weight_shape)
            if shapes.setdefault(n, s) != s:
                raise ValueError(f"adapters disagree on the shape of {n}: {list(shapes[n])} vs {list(s)}")
    return list(shapes)


def _rank_of(d) -> int:
    return d.rank if isinstance(d, LoRADelta) else min(d.weight_shape[0],
                                                        math.prod(d.weight_shape[1:]))


def lora_from_dense(delta: Tensor, rank: int) -> LoRADelta:
    """The best rank-``rank`` LoRA (truncated SVD, alpha = rank: scale 1) of a weight-shaped
    ``delta``."""
    shape = tuple(delta.shape)
    a, b = svd_factors(delta.reshape(shape[0], -1), rank)
    d = LoRADelta(shape, a.shape[0], float(a.shape[0]))
    with torch.no_grad():
        d.lora_A.copy_(a)
        d.lora_B.copy_(b)
    return d


def full_from_dense(delta: Tensor) -> MaskedFullDelta:
    """A dense ``full`` delta holding ``delta`` as it is."""
    d = MaskedFullDelta(tuple(delta.shape), torch.ones(delta.shape, dtype=torch.bool))
    with torch.no_grad():
        d.values.copy_(delta.float())
    return d


def _concat_loras(parts: Sequence[tuple[LoRADelta, float]]) -> LoRADelta:
    """The exact sum of dense LoRAs (each with its strength) as one LoRA of the summed rank."""
    shape = parts[0][0].weight_shape
    r = sum(p.rank for p, _ in parts)
    out = LoRADelta(shape, r, float(r))  # scale 1: the contributors' scales go into B
    with torch.no_grad():
        out.lora_A.copy_(torch.cat([p.lora_A.detach().float() for p, _ in parts]))
        out.lora_B.copy_(torch.cat([p.lora_B.detach().float() * (p.scale * s) for p, s in parts], 1))
    return out


def _pack(dense: Tensor, rank: int | None, contributors: Sequence) -> torch.nn.Module:
    if rank == 0 or (rank is None and not all(is_dense_lora(c) for c in contributors)):
        return full_from_dense(dense)  # asked for, or a masked / full contributor: exact
    r = sum(_rank_of(c) for c in contributors) if rank is None else rank
    return lora_from_dense(dense, r)


def _meta(adapters: Sequence[UnlearnAdapter], fusion: str, meta: Mapping[str, str] | None) -> dict:
    out = dict(adapters[0].meta)
    out.update(fusion=fusion, fused_adapters=str(len(adapters)))
    out.update(meta or {})
    return out


def fuse_sum(adapters: Sequence[UnlearnAdapter], rank: int | None = None,
             meta: Mapping[str, str] | None = None) -> UnlearnAdapter:
    """``sum_i D_i`` per module; dense LoRAs are concatenated (exact) unless ``rank`` is given."""
    names = union_names(adapters)
    merged = [a.merged() for a in adapters]  # dense deltas, strength applied
    deltas = {}
    for n in names:
        parts = [(a[n], float(a.strength)) for a in adapters if n in a.names]
        if rank is None and all(is_dense_lora(p) for p, _ in parts):
            deltas[n] = _concat_loras(parts)
        else:
            deltas[n] = _pack(_summed(merged, n), rank, [p for p, _ in parts])
    return UnlearnAdapter(deltas, _meta(adapters, "sum", meta))


def _summed(merged: Sequence[Mapping[str, Tensor]], n: str) -> Tensor:
    """``sum_i D_i`` of module ``n`` over the adapters' dense deltas that have it (float32)."""
    return sum(m[n].float() for m in merged if n in m)


def ties_merge(deltas: Sequence[Tensor], density: float = TIES_DENSITY) -> Tensor:
    """TIES-merging of same-shaped tensors: trim each to its top ``density`` share by magnitude,
    elect the sign of the summed trimmed values, average the kept values that agree with it
    (zero where none does). peft's implementation, weights 1."""
    from peft.utils.merge_utils import ties

    if not 0.0 < density <= 1.0:
        raise ValueError(f"ties density must be in (0, 1], got {density!r}")
    stacked = [d.float() for d in deltas]
    return ties(stacked, torch.ones(len(stacked)), density=density)


def fuse_ties(adapters: Sequence[UnlearnAdapter], density: float = TIES_DENSITY,
              rank: int | None = None, meta: Mapping[str, str] | None = None) -> UnlearnAdapter:
    """:func:`ties_merge` of the dense deltas per module (a missing module counts as zeros)."""
    names = union_names(adapters)
    merged = [a.merged() for a in adapters]
    deltas = {}
    for n in names:
        shape = next(a[n].weight_shape for a in adapters if n in a.names)
        dense = [m[n].float() if n in m else torch.zeros(shape) for m in merged]
        deltas[n] = _pack(ties_merge(dense, density), rank,
                          [a[n] for a in adapters if n in a.names])
    return UnlearnAdapter(deltas, _meta(adapters, "ties", {"ties_density": repr(density),
                                                          **(meta or {})}))


def least_squares_solve(numerator: Tensor, gram: Tensor, ridge: float = LS_RIDGE) -> Tensor:
    """``D`` with ``D (gram + lambda I) = numerator`` (``[out, in]``, ``[in, in]``), lambda =
    ``ridge`` times the mean diagonal of ``gram``; solved in float64."""
    g = gram.double()
    lam = float(ridge) * float(torch.diagonal(g).mean().clamp_min(1e-12))
    g = g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    # D G = N  <=>  G^T D^T = N^T (G symmetric)
    return torch.linalg.solve(g, numerator.double().T).T.float()


class GramSums:
    """The least-squares fusion's sufficient statistics per Linear module: ``numerator`` =
    ``sum_i D_i G_i`` ``[out, in]`` and ``gram`` = ``sum_i G_i`` ``[in, in]`` over the concepts
    added so far (float64), plus the preserved prompts' ``G_p`` (:meth:`set_preserve`). Partial
    sums of different processes add up (``torch.distributed.reduce``)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], device="cpu") -> None:
        self.shapes = {n: tuple(s) for n, s in shapes.items() if len(s) == 2}  # Linear only
        self.numerator = {n: torch.zeros(s, dtype=torch.float64, device=device)
                          for n, s in self.shapes.items()}
        self.gram = {n: torch.zeros(s[1], s[1], dtype=torch.float64, device=device)
                     for n, s in self.shapes.items()}
        self.preserve: dict[str, Tensor] = {}
        self.preserve_weight = 1.0

    def add(self, deltas: Mapping[str, Tensor], grams: Mapping[str, Tensor]) -> None:
        """One concept: its dense deltas (missing = 0) and its inputs' Grams per module."""
        for n in self.shapes:
            g = grams[n].to(self.gram[n])
            self.gram[n] += g
            if n in deltas:
                self.numerator[n] += deltas[n].to(g).reshape(self.shapes[n]) @ g

    def tensors(self) -> list[Tensor]:
        """Every statistic in a fixed order (what is reduced across processes)."""
        return [t for n in self.shapes for t in (self.numerator[n], self.gram[n])]

    def set_preserve(self, grams: Mapping[str, Tensor], weight: float = 1.0) -> None:
        """The preserved prompts' Grams (kept unweighted) and their ``weight`` in the solve
        (``preserve_weight`` may be changed afterwards to solve again at another weight)."""
        self.preserve = {n: grams[n].double() for n in self.shapes}
        self.preserve_weight = float(weight)

    def solve(self, ridge: float = LS_RIDGE) -> dict[str, Tensor]:
        out = {}
        for n in self.shapes:
            g = self.gram[n] + self.preserve_weight * self.preserve.get(n, 0.0)
            out[n] = least_squares_solve(self.numerator[n], g, ridge).cpu()
        return out


def fuse_least_squares(adapters: Sequence[UnlearnAdapter], sums: GramSums,
                       ridge: float = LS_RIDGE, rank: int | None = None,
                       meta: Mapping[str, str] | None = None) -> UnlearnAdapter:
    """MACE's closed form on the Linear modules (``sums`` holds every concept's Grams and the
    preserved prompts'); Conv2d modules and any module ``sums`` lacks are summed."""
    names = union_names(adapters)
    solved = sums.solve(ridge)
    merged = [a.merged() for a in adapters]
    deltas = {}
    for n in names:
        contributors = [a[n] for a in adapters if n in a.names]
        dense = (solved[n].reshape(contributors[0].weight_shape) if n in solved
                 else _summed(merged, n))
        deltas[n] = _pack(dense, rank, contributors)
    return UnlearnAdapter(deltas, _meta(adapters, "least_squares",
                                        {"ls_ridge": repr(ridge), **(meta or {})}))


def fuse(fusion: str, adapters: Sequence[UnlearnAdapter], *, rank: int | None = None,
         density: float = TIES_DENSITY, sums: GramSums | None = None, ridge: float = LS_RIDGE,
         meta: Mapping[str, str] | None = None) -> UnlearnAdapter:
    """Fusion ``fusion`` (:data:`FUSIONS`) of ``adapters``; ``least_squares`` needs ``sums``
    (the Grams of :func:`spare_core.multi_concept.input_grams`)."""
    check_fusion(fusion)
    if fusion == "sum":
        return fuse_sum(adapters, rank, meta)
    if fusion == "ties":
        return fuse_ties(adapters, density, rank, meta)
    if sums is None:
        raise ValueError("the least-squares fusion needs the layers' input Grams (sums=...)")
    return fuse_least_squares(adapters, sums, ridge, rank, meta)
