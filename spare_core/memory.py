"""Memory: estimates the engine checks before long work, and a peak-bytes meter for benchmarks.

- :func:`adapter_training_bytes` / :func:`full_weight_bytes`: what training an adapter holds
  beyond the model (values, gradients, AdamW's two moments: 16 bytes per trainable float32), so a
  full-weight run can be refused up front.
- :class:`TensorPeak`: counts the bytes of every tensor storage alive, per device type, and keeps
  the peak (a ``TorchDispatchMode``; works for CPU, CUDA and ``meta`` tensors). It counts tensors,
  not allocator blocks: no fragmentation or workspace. With ``meta=True`` it also answers the
  scalar reads (``.item()``, ``bool()``, ``torch.equal``: finite, true) and host copies a meta
  tensor cannot, so the engine's own code runs shape-only in seconds on an SD-sized UNet (values
  are meaningless then: only the byte counts are); ``flash_attention()`` routes
  ``scaled_dot_product_attention`` to the flash kernel (memory linear in sequence length, as
  CUDA's flash/memory-efficient kernels and CPU's flash kernel).

Written here rather than with ``torch.distributed._tools.mem_tracker`` because that tool needs
torch.distributed and has no meta shims; the counting idea (weak references to storages) is
the same.
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

TRAINABLE_BYTES = 16
"""float32 value + float32 gradient + AdamW's exp_avg and exp_avg_sq (4 bytes each)."""


def adapter_training_bytes(num_trainable: int) -> int:
    """Bytes an adapter with ``num_trainable`` float32 parameters holds while training."""
    return int(num_trainable) * TRAINABLE_BYTES


def format_bytes(n: float) -> str:
    """Bytes as ``1.23 GB`` (GiB, 2**30 bytes, as nvidia-smi and torch report them)."""
    return f"{n / 2**30:.2f} GB"


class TensorPeak(TorchDispatchMode):
    """Live and peak bytes of tensor storages created inside the ``with`` block, per device type.

    ``track(tensors)`` adds tensors made before the block (the model's weights). ``reset_peak()``
    starts a new phase from the current live bytes. Attributes ``current`` and ``peak`` map a
    device type (``"cpu"``, ``"cuda"``, ``"meta"``) to bytes.
    """

    def __init__(self, meta: bool = False) -> None:
        super().__init__()
        self.meta = meta
        self.current: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._seen = WeakIdKeyDictionary()

    def track(self, *tensors: Tensor) -> None:
        for t in tensors:
            self._add(t)

    def reset_peak(self) -> None:
        self.peak = dict(self.current)

    def _add(self, t: Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        nbytes, dev = st.nbytes(), t.device.type
        self._seen[st] = nbytes
        cur = self.current
        cur[dev] = cur.get(dev, 0) + nbytes
        self.peak[dev] = max(self.peak.get(dev, 0), cur[dev])
        weakref.finalize(st, _release, cur, dev, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.meta:
            first = args[0] if args else None
            if func is torch.ops.aten._local_scalar_dense.default and first.device.type == "meta":
                return 1.0 if first.dtype.is_floating_point else 1  # finite, true, non-zero
            if func is torch.ops.aten.equal.default and first.device.type == "meta":
                return True
            if (func is torch.ops.aten._to_copy.default and first.device.type == "meta"
                    and kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "meta"):
                out = torch.zeros(first.shape, dtype=kwargs.get("dtype") or first.dtype,
                                  device=kwargs["device"])
                self._add(out)
                return out
        out = func(*args, **kwargs)
        tree_map_only(Tensor, self._add, out)
        return out

    @contextmanager
    def flash_attention(self) -> Iterator[None]:
        """Route ``F.scaled_dot_product_attention`` to the flash kernel (meta runs only)."""
        original = F.scaled_dot_product_attention

        def sdpa(query=None, key=None, value=None, attn_mask=None, dropout_p=0.0,
                 is_causal=False, scale=None, enable_gqa=False, **kw):
            # diffusers' attention dispatch passes query= / key= / value= by name
            q, k, v = query, key, value
            if q.device.type != "meta" or attn_mask is not None or enable_gqa or kw:
                return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, **kw)
            out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, is_causal, scale=scale)
            return out

        F.scaled_dot_product_attention = sdpa
        try:
            yield
        finally:
            F.scaled_dot_product_attention = original


def _release(current: dict[str, int], dev: str, nbytes: int) -> None:
    current[dev] = current.get(dev, 0) - nbytes


def full_weight_bytes(shapes: list[tuple[int, ...]]) -> int:
    """:func:`adapter_training_bytes` of a full-weight adapter over weights of ``shapes``."""
    return adapter_training_bytes(sum(math.prod(s) for s in shapes))
