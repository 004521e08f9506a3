"""Sparse weight adapters: ``W' = W + strength * delta``, one delta per adapted Linear/Conv2d.

Two delta kinds share one mechanism:
- :class:`LoRADelta` (SPARE): ``delta = (alpha / r) * M * (B @ A)``, M an optional elementwise
  saliency mask (element-level sparsity) on a few salient modules (module-level sparsity).
- :class:`MaskedFullDelta` (SalUn's own parameterization): a trainable value per masked element,
  every other element of the weight stays bit-identical.

What an adapter edits is its ``root`` (metadata ``root``): the denoising network (``"unet"``,
also every file without the field) or, for the ``text_encoder`` localisation, the first block of
the CLIP text encoder (``"text_encoder"``, :mod:`spare_core.text_encoder`); ``root_of(denoiser)``
/ ``applied_to(denoiser)`` pick the module. Below, "UNet" stands for either.

How an attached adapter reaches the UNet (``attach(unet, mode=...)``):
- ``"unmerged"`` (default): a forward hook adds the adapter's own branch to each module's output,
  ``y = W x + s * B(A x)`` for a dense LoRA (as peft does), ``y = W x + delta x`` otherwise. The
  base weight is never touched or copied, so it may be stored in any dtype the host's layer can
  compute with (fp16, bf16, or fp8 cast by ComfyUI's manual-cast layers), and backward keeps no
  weight-sized tensor per dense-LoRA module.
- ``"merged"``: a weight parametrization ``W -> W + delta`` (materialises one weight-sized tensor
  per module per forward, kept for backward). Kept for comparison: benchmarks/memory.py measures
  both at SD1.5 size (figures in benchmarks/RESULTS.md).
The adapter's trainable tensors stay float32; branches compute in the input's dtype.

Written by hand instead of with peft's LoRA layers because (1) peft has no elementwise-masked
LoRA, (2) ComfyUI patches weights rather than swapping modules, and the same ``delta()`` must serve
both backends, and (3) the frozen teacher is the same UNet with the adapter switched off, which a
hook gives for free. The diffusers-format export (export.py) writes peft's key layout, and
diffusers loads it through peft (``pipe.load_lora_weights``; tests/test_cli.py).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .families.unet import adaptable_modules
from .text_encoder import TEXT_ENCODER, UNET, adapted_network, root_module


def _fan_in(shape: torch.Size | tuple[int, ...]) -> int:
    return int(math.prod(shape[1:]))


def check_shapes_fit(shapes: Mapping[str, tuple[int, ...]], unet: nn.Module) -> None:
    """ValueError unless every module named in ``shapes`` is a Linear/Conv2d of ``unet`` with that
    weight shape (what an adapter, or an adapter file's metadata before anything is allocated,
    needs of a model)."""
    mods = adaptable_modules(unet)
    missing = [n for n in shapes if n not in mods]
    if missing:
        raise ValueError(f"adapter was made for a model with different layers: {len(missing)} "
                         f"module(s) not in this UNet, e.g. {missing[0]!r}")
    for n, want in shapes.items():
        got = tuple(mods[n].weight.shape)
        if tuple(want) != got:
            raise ValueError(f"adapter was made for a model with different layer sizes: "
                             f"{n} has weight {list(got)}, adapter expects {list(want)}")


class LoRADelta(nn.Module):
    """Low-rank delta for one weight of shape ``[out, in]`` or ``[out, in, kh, kw]``.

    Parameters: ``lora_A`` ``[r, in*kh*kw]`` (Kaiming-uniform init, as peft), ``lora_B``
    ``[out, r]`` (zeros, so the adapter starts as the identity). Buffer ``mask``: bool,
    weight-shaped, or absent.
    """

    kind = "lora"

    def __init__(self, weight_shape: tuple[int, ...], rank: int, alpha: float,
                 mask: Tensor | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        out, fan_in = int(weight_shape[0]), _fan_in(weight_shape)
        if rank <= 0:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if rank > min(out, fan_in):
            raise ValueError(f"rank {rank} is larger than the layer allows (min(out={out}, "
                             f"in={fan_in}) = {min(out, fan_in)}); choose rank <= {min(out, fan_in)}")
        if mask is not None and tuple(mask.shape) != tuple(weight_shape):
            raise ValueError(f"mask shape {list(mask.shape)} != weight shape {list(weight_shape)}")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.rank, self.alpha = int(rank), float(alpha)
        a = torch.empty(rank, fan_in)
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) bound, as nn.Linear / peft
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(out, rank))
        self.register_buffer("mask", None if mask is None else mask.bool().clone())

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        d = (self.lora_B @ self.lora_A).view(self.weight_shape) * self.scale
        return d if self.mask is None else d * self.mask

    def num_trainable(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()

    def branch(self, module: nn.Module, x: Tensor) -> Tensor:
        """``delta`` applied to the module's input ``x``, in ``x``'s dtype: ``s * B(A x)``
        without forming ``B @ A`` when unmasked (Linear, or an ungrouped zero-padded Conv2d)."""
        if self.mask is not None or not _low_rank_ok(module):
            return _dense_branch(module, x, self.delta().to(x.dtype))
        a, b = self.lora_A.to(x.dtype), (self.lora_B * self.scale).to(x.dtype)
        if isinstance(module, nn.Conv2d):
            h = F.conv2d(x, a.view(self.rank, *self.weight_shape[1:]), None, module.stride,
                         module.padding, module.dilation)
            return F.conv2d(h, b.view(*b.shape, 1, 1))
        return F.linear(F.linear(x, a), b)


def is_dense_lora(d: nn.Module) -> bool:
    """A plain low-rank delta (a :class:`LoRADelta` without an element mask): what LoRA files
    hold as it is; every other delta is exported or fused through its dense form."""
    return isinstance(d, LoRADelta) and d.mask is None


def svd_factors(mat: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """``(A [r, in], B [out, r])``, float32, whose product ``B @ A`` is the best rank-``r``
    approximation of ``mat`` ``[out, in]`` (truncated SVD in float64); ``rank`` None: the
    numerical rank (singular values above 1e-7 of the largest), so the product is ``mat``."""
    m = mat.detach().double()
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    if rank is None:
        r = max(1, int((sv > sv.max() * 1e-7).sum())) if sv.numel() else 1
    else:
        r = max(1, min(int(rank), *m.shape))
    return vh[:r].float(), (u[:, :r] * sv[:r]).float()


class MaskedFullDelta(nn.Module):
    """Full-weight delta restricted to ``mask``: one trainable value per masked element.

    Sparse masks store ``values`` ``[nnz]`` and ``index`` ``[nnz]`` into the flat weight; an
    all-True mask (full fine-tuning of a module, e.g. ESD) stores ``values`` weight-shaped and no
    index, so it costs one copy of the weight and no int64 index.
    """

    kind = "full"

    def __init__(self, weight_shape: tuple[int, ...], mask: Tensor) -> None:
        super().__init__()
        if tuple(mask.shape) != tuple(weight_shape):
            raise ValueError(f"mask shape {list(mask.shape)} != weight shape {list(weight_shape)}")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        if bool(mask.all()):
            self.register_buffer("index", None)
            self.values = nn.Parameter(torch.zeros(self.weight_shape))
        else:
            index = mask.flatten().nonzero().squeeze(1)
            self.register_buffer("index", index)
            self.values = nn.Parameter(torch.zeros(index.numel()))

    def delta(self) -> Tensor:
        if self.index is None:
            return self.values
        flat = torch.zeros(math.prod(self.weight_shape), dtype=self.values.dtype,
                           device=self.values.device)
        return flat.index_put((self.index,), self.values).view(self.weight_shape)

    def num_trainable(self) -> int:
        return self.values.numel()

    def branch(self, module: nn.Module, x: Tensor) -> Tensor:
        """``delta x`` in ``x``'s dtype (the dense delta is formed: one weight-sized tensor)."""
        return _dense_branch(module, x, self.delta().to(x.dtype))


def _low_rank_ok(module: nn.Module) -> bool:
    """True where ``B(A x)`` equals ``(B @ A) x``: Linear, and Conv2d without groups or a
    non-zero padding mode."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return True


def _dense_branch(module: nn.Module, x: Tensor, delta: Tensor) -> Tensor:
    """The module's own linear map with weight ``delta`` and no bias, applied to ``x``."""
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d._conv_forward(module, x, delta, None)
    return F.linear(x, delta)


def _key(name: str) -> str:
    return name.replace(".", "::")  # nn.ModuleDict keys may not contain '.'


class _AddDelta(nn.Module):
    """Weight parametrization ``W -> W + adapter.delta(name)``; holds the adapter without
    registering it, so the UNet's parameters and state_dict stay its own."""

    def __init__(self, adapter: "UnlearnAdapter", name: str) -> None:
        super().__init__()
        object.__setattr__(self, "_adapter", adapter)
        self.name = name

    def forward(self, weight: Tensor) -> Tensor:
        d = self._adapter.scaled_delta(self.name)
        return weight if d is None else weight + d.to(weight.dtype)


class _AddBranch:
    """Forward hook ``y -> y + strength * branch(x)`` of one module (unmerged mode)."""

    def __init__(self, adapter: "UnlearnAdapter", name: str) -> None:
        self.adapter, self.name = adapter, name

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        ad = self.adapter
        if not ad.enabled or ad.strength == 0.0:
            return None
        y = ad[self.name].branch(module, args[0])
        return output + (y if ad.strength == 1.0 else y * ad.strength).to(output.dtype)


ATTACH_MODES = ("unmerged", "merged")


class UnlearnAdapter(nn.Module):
    """A set of per-module deltas plus a global ``strength`` and an on/off switch.

    ``attach(unet)`` applies it through forward hooks (or, ``mode="merged"``, weight
    parametrizations); the UNet's own tensors are never written, and ``detach(unet)`` removes
    every trace, so outputs are bit-identical.
    ``with adapter.disabled():`` gives the frozen teacher without a second copy of the UNet.
    """

    def __init__(self, deltas: Mapping[str, nn.Module], meta: Mapping[str, str] | None = None) -> None:
        super().__init__()
        if not deltas:
            raise ValueError("an adapter needs at least one module")
        self.deltas = nn.ModuleDict({_key(n): d for n, d in deltas.items()})
        self.names: list[str] = list(deltas)
        self.strength = 1.0
        self.enabled = True
        self.meta: dict[str, str] = dict(meta or {})
        self._attached: dict[int, tuple[str, list]] = {}  # id(unet) -> (mode, hook handles)

    def __getitem__(self, name: str) -> nn.Module:
        return self.deltas[_key(name)]

    def scaled_delta(self, name: str) -> Tensor | None:
        """``strength * delta`` of one module, or None while disabled."""
        if not self.enabled or self.strength == 0.0:
            return None
        d = self[name].delta()
        return d if self.strength == 1.0 else d * self.strength

    def merged(self, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Dense deltas (weight-shaped, detached, strength applied) by module name (of every
        module, or of ``names``)."""
        with torch.no_grad():
            return {n: self[n].delta().detach() * self.strength
                    for n in (self.names if names is None else names)}

    def num_trainable(self) -> int:
        return sum(self[n].num_trainable() for n in self.names)

    @property
    def root(self) -> str:
        """What the adapter edits: ``"unet"`` (the denoising network; files without the field)
        or ``"text_encoder"`` (the CLIP text encoder's first block)."""
        return self.meta.get("root", UNET)

    def network(self, model) -> nn.Module:
        """The module whose names this adapter addresses, from the module it is attached to (a
        text encoder resolves to its text transformer) or from a denoiser (by :attr:`root`)."""
        return adapted_network(model, self.root)

    def root_of(self, denoiser) -> nn.Module:
        """What this adapter attaches to on ``denoiser``: ``denoiser.unet``, or its
        ``text_encoder`` for a text-encoder adapter (ValueError for a backend without one)."""
        return root_module(denoiser, self.root)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Temporarily switch the adapter off (the teacher's view of the same UNet)."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    def check_compatible(self, unet: nn.Module) -> None:
        """Raise a clear error if a module is missing or has another weight shape."""
        try:
            check_shapes_fit({n: self[n].weight_shape for n in self.names}, self.network(unet))
        except ValueError as e:
            if self.root != TEXT_ENCODER:
                raise
            raise ValueError(f"{e}; this adapter edits the first block of a CLIP text encoder: "
                             "attach it to denoiser.text_encoder (adapter.applied_to(denoiser)), "
                             "or load its LoRA export with the text encoder (ComfyUI: the stock "
                             "LoraLoader's CLIP)") from e

    def attach(self, unet: nn.Module, mode: str = "unmerged") -> "UnlearnAdapter":
        """Patch ``unet`` (in place, reversibly) and move the adapter to its device.

        ``mode``: ``"unmerged"`` (forward hooks, the default) or ``"merged"`` (weight
        parametrizations); see the module docstring."""
        if mode not in ATTACH_MODES:
            raise ValueError(f"attach mode must be one of {list(ATTACH_MODES)}, got {mode!r}")
        if id(unet) in self._attached:
            raise RuntimeError("this adapter is already attached to this UNet")
        self.check_compatible(unet)
        mods = adaptable_modules(self.network(unet))
        for n in self.names:
            if parametrize.is_parametrized(mods[n], "weight"):
                raise RuntimeError(f"{n} already carries a weight parametrization; "
                                   "detach the other adapter first")
        w = mods[self.names[0]].weight
        if mode == "merged" and not (w.dtype.is_floating_point and w.element_size() >= 2):
            raise ValueError(f"mode='merged' adds the delta to weights stored in {w.dtype}, which "
                             "cannot hold it; use the default mode='unmerged'")
        self.to(w.device)
        handles = []
        for n in self.names:
            if mode == "merged":
                parametrize.register_parametrization(mods[n], "weight", _AddDelta(self, n))
            else:
                handles.append(mods[n].register_forward_hook(_AddBranch(self, n)))
        self._attached[id(unet)] = (mode, handles)
        return self

    def is_attached(self, unet: nn.Module) -> bool:
        """True while this adapter is attached to ``unet``."""
        return id(unet) in self._attached

    def detach(self, unet: nn.Module) -> None:
        """Remove the hooks or patches; the original weight Parameters are untouched."""
        mode, handles = self._attached.pop(id(unet), ("unmerged", []))
        for h in handles:
            h.remove()
        if mode == "merged":
            mods = adaptable_modules(self.network(unet))
            for n in self.names:
                m = mods.get(n)
                if m is not None and parametrize.is_parametrized(m, "weight"):
                    parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)

    @contextmanager
    def applied(self, unet: nn.Module, mode: str = "unmerged") -> Iterator["UnlearnAdapter"]:
        """``with adapter.applied(unet):`` attach for the block, detach after (also on error)."""
        self.attach(unet, mode)
        try:
            yield self
        finally:
            self.detach(unet)

    def applied_to(self, denoiser, mode: str = "unmerged"):
        """``with adapter.applied_to(denoiser):`` :meth:`applied` on what the adapter edits
        (:meth:`root_of`: the UNet, or the text encoder, which ``denoiser.encode`` then runs
        through)."""
        return self.applied(self.root_of(denoiser), mode)

    # ---- native serialization (the file I/O and validation live in files.py) ----
    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Native tensors (``<module>.lora_A/.lora_B/.mask`` or ``<module>.values/.index``) and
        string metadata (``modules``: JSON of kind/shape/rank/alpha per module)."""
        tensors: dict[str, Tensor] = {}
        layout = {}
        for n in self.names:
            d = self[n]
            entry = {"kind": d.kind, "shape": list(d.weight_shape)}
            if isinstance(d, LoRADelta):
                tensors[f"{n}.lora_A"] = d.lora_A.detach().float().cpu().contiguous()
                tensors[f"{n}.lora_B"] = d.lora_B.detach().float().cpu().contiguous()
                if d.mask is not None:
                    tensors[f"{n}.mask"] = d.mask.cpu().contiguous()
                entry.update(rank=d.rank, alpha=d.alpha)
            else:
                tensors[f"{n}.values"] = d.values.detach().float().cpu().contiguous()
                if d.index is not None:
                    tensors[f"{n}.index"] = d.index.cpu().contiguous()
            layout[n] = entry
        meta = dict(self.meta)
        meta["modules"] = json.dumps(layout)
        meta["strength"] = repr(float(self.strength))
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> "UnlearnAdapter":
        """Inverse of :meth:`to_tensors`; raises ValueError on a missing or misshaped tensor."""
        layout = json.loads(meta["modules"])
        deltas: dict[str, nn.Module] = {}
        for n, e in layout.items():
            shape = tuple(e["shape"])
            if e["kind"] == "lora":
                a, b = _need(tensors, f"{n}.lora_A"), _need(tensors, f"{n}.lora_B")
                if tuple(a.shape) != (e["rank"], _fan_in(shape)) or tuple(b.shape) != (shape[0], e["rank"]):
                    raise ValueError(f"{n}: lora_A/lora_B shapes {list(a.shape)}/{list(b.shape)} "
                                     f"do not fit weight {list(shape)} at rank {e['rank']}")
                d = LoRADelta(shape, e["rank"], e["alpha"], tensors.get(f"{n}.mask"))
                with torch.no_grad():
                    d.lora_A.copy_(a)
                    d.lora_B.copy_(b)
            elif e["kind"] == "full":
                vals = _need(tensors, f"{n}.values")
                if f"{n}.index" not in tensors:  # dense: every element trainable
                    if tuple(vals.shape) != shape:
                        raise ValueError(f"{n}: values {list(vals.shape)} do not fit weight {list(shape)}")
                    mask = torch.ones(math.prod(shape), dtype=torch.bool)
                else:
                    idx = tensors[f"{n}.index"]
                    if idx.numel() != vals.numel() or (idx.numel() and int(idx.max()) >= math.prod(shape)):
                        raise ValueError(f"{n}: index/values do not fit weight {list(shape)}")
                    mask = torch.zeros(math.prod(shape), dtype=torch.bool)
                    mask[idx.long()] = True
                d = MaskedFullDelta(shape, mask.view(shape))
                with torch.no_grad():
                    d.values.copy_(vals)
            else:
                raise ValueError(f"{n}: unknown delta kind {e['kind']!r}")
            deltas[n] = d
        adapter = cls(deltas, {k: v for k, v in meta.items() if k not in ("modules", "strength")})
        adapter.strength = float(meta.get("strength", 1.0))
        return adapter


def _need(tensors: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in tensors:
        raise ValueError(f"adapter file is missing tensor {key!r} (truncated or not a SPARE adapter)")
    return tensors[key]


def init_sparse_lora(unet: nn.Module, modules: list[str], rank: int = 4, alpha: float | None = None,
                     masks: Mapping[str, Tensor] | None = None, seed: int = 0,
                     meta: Mapping[str, str] | None = None,
                     clamp_rank: bool = False) -> UnlearnAdapter:
    """LoRA on ``modules`` of ``unet`` (optionally element-masked by ``masks[name]``).

    ``alpha`` defaults to the module's rank (scale 1). Raises ValueError for an unknown module or
    a rank that does not fit a layer, before anything is allocated; with ``clamp_rank`` such a
    layer gets the largest rank it allows instead (a full-rank update of a small layer, e.g.
    SD's 4-channel output convolution when every layer is adapted).
    """
    mods = adaptable_modules(unet)
    unknown = [m for m in modules if m not in mods]
    if unknown:
        raise ValueError(f"modules not Linear/Conv2d in this UNet: {unknown[:3]}")
    if not modules:
        raise ValueError("no modules selected for the adapter")
    if rank <= 0:
        raise ValueError(f"rank must be >= 1, got {rank}")
    ranks = {}
    for m in modules:
        shape = tuple(mods[m].weight.shape)
        limit = min(shape[0], _fan_in(shape))
        if rank > limit and not clamp_rank:
            raise ValueError(f"rank {rank} is larger than layer {m} allows "
                             f"(weight {list(shape)}: at most {limit})")
        ranks[m] = min(rank, limit)
    gen = torch.Generator().manual_seed(seed)
    deltas = {m: LoRADelta(tuple(mods[m].weight.shape), ranks[m],
                           float(ranks[m] if alpha is None else alpha),
                           None if masks is None else masks.get(m), gen) for m in modules}
    return UnlearnAdapter(deltas, meta)


def init_masked_full(unet: nn.Module, masks: Mapping[str, Tensor],
                     meta: Mapping[str, str] | None = None) -> UnlearnAdapter:
    """SalUn's parameterization: every masked element of each module's weight is trainable."""
    mods = adaptable_modules(unet)
    kept = {n: m for n, m in masks.items() if bool(m.any())}
    unknown = [n for n in kept if n not in mods]
    if unknown:
        raise ValueError(f"masks name modules not Linear/Conv2d in this UNet: {unknown[:3]}")
    return UnlearnAdapter({n: MaskedFullDelta(tuple(mods[n].weight.shape), m)
                           for n, m in kept.items()}, meta)
