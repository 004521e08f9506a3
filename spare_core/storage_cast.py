"""Backward through weights stored narrower than they compute in (fp8 storage, diffusers side).

diffusers' layerwise casting (``model.enable_layerwise_casting(storage_dtype=float8_e4m3fn,
compute_dtype=bfloat16)``) upcasts each layer's weights *in place* before its forward
(``module.to(compute_dtype)``) and casts them back after it. That is right for inference, but
autograd saved the weight *object* for backward, so backward reads it after the cast back: fp8
data where the kernel expects bf16. Whether that raises ("expected scalar type BFloat16 but found
Float8_e4m3fn") or happens to work depends on which kernel the CPU or GPU picks (it passed on an
AVX-512 Xeon and failed on an AVX2-only EPYC), so the engine never relies on it.

:func:`upcast_copies` reroutes those hooks for the length of a block: each layer computes on
upcast *copies* of its parameters (``p.to(compute_dtype)``, a fresh tensor that autograd owns, as
ComfyUI's manual-cast layers do), and the stored parameters are never written. The values are the
same (an upcast from fp8 is exact), so the forward is unchanged; backward reads the copy. Memory:
the copies that backward needs live until backward (with gradient checkpointing, one block's
worth), as on ComfyUI.

The hook is rerouted through diffusers' own mutable ``fn_ref`` (``HookFunctionReference``, which
diffusers keeps so hooks can be swapped without rebuilding the forward chain) rather than by
removing and re-adding hooks: nothing of the user's model is replaced, and leaving the block puts
every reference back, also after an error.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

LAYERWISE_CASTING_HOOK = "layerwise_casting"  # the name diffusers registers the hook under


def layerwise_cast_hooks(network: nn.Module) -> list[tuple[nn.Module, object]]:
    """``(module, hook)`` for every module of ``network`` that carries diffusers' layerwise
    casting hook (empty for a model without it)."""
    found = []
    for module in network.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(LAYERWISE_CASTING_HOOK) if registry is not None else None
        if hook is not None and getattr(hook, "fn_ref", None) is not None:
            found.append((module, hook))
    return found


class _CopyCast:
    """pre/post forward of one layer: swap in upcast copies, then put the stored tensors back."""

    def __init__(self, compute_dtype: torch.dtype) -> None:
        self.compute_dtype = compute_dtype
        self.stored: list[tuple[nn.Module, dict, dict]] = []  # a stack: a layer may nest

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        params = {n: p for n, p in module._parameters.items() if p is not None}
        buffers = {n: b for n, b in module._buffers.items()
                   if b is not None and b.is_floating_point()}
        self.stored.append((module, params, buffers))
        # plain tensors in _parameters: nn.Module's __getattr__ hands them to the layer's forward
        # (torch.func.functional_call swaps parameters the same way)
        for n, p in params.items():
            module._parameters[n] = p.to(self.compute_dtype)
        for n, b in buffers.items():
            module._buffers[n] = b.to(self.compute_dtype)
        return args, kwargs

    def post_forward(self, module: nn.Module, output):
        self.restore_last()
        return output

    def restore_last(self) -> None:
        module, params, buffers = self.stored.pop()
        module._parameters.update(params)
        module._buffers.update(buffers)


@contextmanager
def upcast_copies(network: nn.Module) -> Iterator[int]:
    """``with upcast_copies(unet):`` every layer under diffusers' layerwise casting computes on
    upcast copies of its weights (see the module docstring); yields how many layers were
    rerouted (0: nothing to do). Enter it around any forward whose graph will be differentiated,
    and keep it open through backward when gradient checkpointing recomputes the forward there."""
    rerouted = []
    for module, hook in layerwise_cast_hooks(network):
        ref = hook.fn_ref
        copy = _CopyCast(hook.compute_dtype)
        rerouted.append((ref, ref.pre_forward, ref.post_forward, copy))
        ref.pre_forward, ref.post_forward = copy.pre_forward, copy.post_forward
    try:
        yield len(rerouted)
    finally:
        for ref, pre, post, copy in rerouted:
            while copy.stored:  # a forward that raised never reached its post_forward
                copy.restore_last()
            ref.pre_forward, ref.post_forward = pre, post
