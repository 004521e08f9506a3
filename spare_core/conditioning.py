"""Conditioning that is more than one text sequence, carried through methods untouched.

SD1.x/SD2.x condition on one tensor ``[B, L, D]`` and their backends return exactly that from
``encode``. SDXL adds a pooled text vector and size/crop ids, SD3 a pooled vector beside the
joint CLIP+T5 sequence, Flux a pooled CLIP vector and a guidance value. Their backends return a
:class:`Context`: the sequence plus named per-sample tensors. It behaves like the batch-first
tensor the methods already handle (``shape``, ``expand``, indexing, ``to``, ``chunk``,
``torch.cat``, ``torch.equal``), so no method has to know which family it conditions; only the
backend that made it reads its fields.

Written as a small tensor-like class (PyTorch's ``__torch_function__`` protocol for non-tensor
types) rather than a tensor subclass, so that no autograd or dtype rule of torch applies to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class Context:
    """``seq`` ``[B, L, D]`` text sequence and ``extras``: name -> ``[B, ...]`` tensors (e.g.
    ``pooled`` ``[B, P]``, ``time_ids`` ``[B, 6]``, ``guidance`` ``[B]``)."""

    seq: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b = self.seq.shape[0]
        for k, v in self.extras.items():
            if v.shape[0] != b:
                raise ValueError(f"context field {k!r} has batch {v.shape[0]}, the sequence {b}")

    # -- tensor-like surface ------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.seq.shape

    @property
    def device(self) -> torch.device:
        return self.seq.device

    def __len__(self) -> int:
        return self.seq.shape[0]

    def _map(self, fn) -> "Context":
        return Context(fn(self.seq), {k: fn(v) for k, v in self.extras.items()})

    def expand(self, n: int, *rest) -> "Context":
        """``n`` copies of a batch-of-one context (``expand(n, -1, -1)`` as on a tensor)."""
        return self._map(lambda v: v.expand(n, *v.shape[1:]))

    def __getitem__(self, idx) -> "Context":
        """Batch indexing only (an int keeps the batch dim: ``ctx[i]`` is a context of one)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        if isinstance(idx, list):
            idx = torch.tensor(idx, dtype=torch.long)
        return self._map(lambda v: v[idx.to(v.device) if isinstance(idx, Tensor) else idx])

    def to(self, *args, **kwargs) -> "Context":
        """Device moves apply to every field; a dtype applies to floating fields only (ids stay
        as they are unless floating)."""
        return self._map(lambda v: v.to(*args, **kwargs) if v.is_floating_point()
                         else v.to(*[a for a in args if not isinstance(a, torch.dtype)],
                                   **{k: a for k, a in kwargs.items() if k != "dtype"}))

    def chunk(self, n: int) -> tuple["Context", ...]:
        parts = [torch.chunk(self.seq, n)] + [torch.chunk(v, n) for v in self.extras.values()]
        keys = list(self.extras)
        return tuple(Context(p[0], dict(zip(keys, p[1:]))) for p in zip(*parts))

    def field(self, name: str) -> Tensor:
        """One extra field, with an error naming what the backend should have encoded."""
        if name not in self.extras:
            raise KeyError(f"this context has no {name!r} (fields: {sorted(self.extras)}); it was "
                           "encoded by a backend of another model family")
        return self.extras[name]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.cat, torch.concat):
            return cat(*args, **kwargs)
        if func is torch.equal:
            a, b = args
            return equal(a, b)
        if func is torch.chunk:
            return args[0].chunk(*args[1:])
        raise TypeError(f"{func.__name__} is not defined on a Context (only cat, equal, chunk)")


def cat(xs, dim: int = 0):
    """``torch.cat`` of contexts (or of tensors) along the batch dim."""
    xs = list(xs)
    if not any(isinstance(x, Context) for x in xs):
        return torch.cat(xs, dim=dim)
    if dim != 0 or not all(isinstance(x, Context) for x in xs):
        raise TypeError("contexts concatenate with contexts only, along the batch dim")
    keys = list(xs[0].extras)
    if any(list(x.extras) != keys for x in xs):
        raise ValueError("cannot concatenate contexts with different fields")
    return Context(torch.cat([x.seq for x in xs]),
                   {k: torch.cat([x.extras[k] for x in xs]) for k in keys})


def equal(a, b) -> bool:
    """``torch.equal`` on contexts: same fields, every one equal."""
    if isinstance(a, Context) != isinstance(b, Context):
        return False
    if not isinstance(a, Context):
        return torch.equal(a, b)
    return (list(a.extras) == list(b.extras) and torch.equal(a.seq, b.seq)
            and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras))


def text_sequence(ctx) -> Tensor:
    """The text sequence ``[B, L, D]`` of a tensor or :class:`Context`."""
    return ctx.seq if isinstance(ctx, Context) else ctx


def per_latent_context(denoiser, prompts: Sequence[str], n: int):
    """Context ``[1, L, D]`` when ``prompts`` hold one distinct prompt, else one row per latent
    ``[n, L, D]`` (each distinct prompt encoded once)."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) == 1:  # one concept: its [1, L, D] context, expanded where it is used
        return denoiser.encode(distinct)
    ctx = denoiser.encode(distinct)
    return ctx[torch.tensor([distinct.index(p) for p in prompts])]


def context_rows(context, lo: int, m: int, n: int):
    """Rows ``lo:lo+m`` of a per-latent context ``[n, ...]``, or a ``[1, ...]`` context
    expanded to ``m`` rows."""
    if context.shape[0] == n and n != 1:
        return context[lo:lo + m]
    return context.expand(m, -1, -1)
