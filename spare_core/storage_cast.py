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

:func:`gradient_taps` gives saliency the gradient of weights that cannot hold one (fp8 storage):
each named layer computes on an upcast copy passed through an identity whose backward hands the
copy's gradient (the weight's gradient in compute precision) to a callback, then drops it. The
copy is not a leaf, so nothing keeps it alive past the backward that reads it (with gradient
checkpointing, one block's worth at a time). Layers under diffusers' layerwise casting are tapped
through the rerouted hook above; any other layer (ComfyUI's manual-cast layers, which cast the
weight inside their own forward) through a torch parametrization of ``weight`` (read inside the
layer's forward, so a checkpointed block's recomputation taps it again), which the layer's own
cast then leaves as it is.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

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


class _GradTap(torch.autograd.Function):
    """Identity on a weight copy; backward hands the incoming gradient to ``sink`` and passes no
    gradient on (the copy's source, the stored weight, takes none). ``anchor`` is a scalar leaf
    that requires grad, so the output is part of the graph although the weight is not."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, anchor: torch.Tensor, sink) -> torch.Tensor:
        ctx.sink = sink
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.sink(grad)
        return None, None, None


class _TappedCopy(nn.Module):
    """Parametrization of a layer's ``weight``: the stored tensor -> a ``compute_dtype`` copy
    through :class:`_GradTap` (a plain copy when no gradient is being recorded)."""

    def __init__(self, compute_dtype: torch.dtype, tap: Callable[[torch.Tensor], None],
                 anchor: torch.Tensor) -> None:
        super().__init__()
        self.compute_dtype, self.tap, self.anchor = compute_dtype, tap, anchor

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        copy = stored.detach().to(self.compute_dtype)
        return _GradTap.apply(copy, self.anchor, self.tap) if torch.is_grad_enabled() else copy


class _CopyCast:
    """pre/post forward of one layer: swap in upcast copies, then put the stored tensors back.
    With ``tap``, the weight's copy goes through :class:`_GradTap` (see :func:`gradient_taps`)."""

    def __init__(self, compute_dtype: torch.dtype, tap: Callable[[torch.Tensor], None] | None = None,
                 anchor: torch.Tensor | None = None) -> None:
        self.compute_dtype = compute_dtype
        self.tap, self.anchor = tap, anchor
        self.stored: list[tuple[nn.Module, dict, dict]] = []  # a stack: a layer may nest

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        params = {n: p for n, p in module._parameters.items() if p is not None}
        buffers = {n: b for n, b in module._buffers.items()
                   if b is not None and b.is_floating_point()}
        self.stored.append((module, params, buffers))
        # plain tensors in _parameters: nn.Module's __getattr__ hands them to the layer's forward
        # (torch.func.functional_call swaps parameters the same way)
        for n, p in params.items():
            copy = p.to(self.compute_dtype)
            if self.tap is not None and n == "weight" and torch.is_grad_enabled():
                copy = _GradTap.apply(copy.detach(), self.anchor, self.tap)
            module._parameters[n] = copy
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
def upcast_copies(network: nn.Module,
                  taps: Mapping[nn.Module, Callable[[torch.Tensor], None]] | None = None,
                  anchor: torch.Tensor | None = None) -> Iterator[int]:
    """``with upcast_copies(unet):`` every layer under diffusers' layerwise casting computes on
    upcast copies of its weights (see the module docstring); yields how many layers were
    rerouted (0: nothing to do). Enter it around any forward whose graph will be differentiated,
    and keep it open through backward when gradient checkpointing recomputes the forward there.
    ``taps`` (layer -> callback) and ``anchor``: see :func:`gradient_taps`."""
    taps = taps or {}
    rerouted = []
    for module, hook in layerwise_cast_hooks(network):
        ref = hook.fn_ref
        copy = _CopyCast(hook.compute_dtype, taps.get(module), anchor)
        rerouted.append((ref, ref.pre_forward, ref.post_forward, copy))
        ref.pre_forward, ref.post_forward = copy.pre_forward, copy.post_forward
    try:
        yield len(rerouted)
    finally:
        for ref, pre, post, copy in rerouted:
            while copy.stored:  # a forward that raised never reached its post_forward
                copy.restore_last()
            ref.pre_forward, ref.post_forward = pre, post


@contextmanager
def gradient_taps(network: nn.Module, layers: Mapping[str, nn.Module], compute_dtype: torch.dtype,
                  sink: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """``with gradient_taps(unet, {name: layer}, bf16, sink):`` each backward through a named
    layer calls ``sink(name, grad)`` with the gradient of its weight (``[*weight.shape]``, in
    ``compute_dtype``) however the weight is stored (fp8 included); the stored weights are never
    written and need no ``requires_grad``. Every other layer under diffusers' layerwise casting
    computes on upcast copies as in :func:`upcast_copies`. Keep the block open through backward."""
    anchor = torch.zeros((), requires_grad=True)
    taps = {layer: (lambda g, _n=name: sink(_n, g)) for name, layer in layers.items()}
    hooked = {m for m, _ in layerwise_cast_hooks(network)}
    own = [layer for layer in taps if layer not in hooked]
    order = {layer: list(layer._parameters) for layer in own}
    for layer in own:  # unsafe: the parametrized weight is wider than the stored one, by design
        parametrize.register_parametrization(
            layer, "weight", _TappedCopy(compute_dtype, taps[layer], anchor), unsafe=True)
    try:
        with upcast_copies(network, taps, anchor):
            yield
    finally:
        for layer in own:  # the stored Parameter object itself goes back, in its place
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            params = layer._parameters
            for key in order[layer]:
                params[key] = params.pop(key)
