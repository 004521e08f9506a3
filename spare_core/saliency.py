"""Gradient weight saliency (SalUn; SPARE stage 1).

``s = |sum_n grad_W L_forget(n)|`` per weight element, where ``L_forget`` is the denoising MSE on
latents of the concept conditioned on the concept prompt, summed over N samples and timesteps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from .denoiser import (TRAIN_DTYPES, Denoiser, check_checkpointing, compute_dtype_of, device_of,
                       gradient_checkpointing as checkpointing, prediction)
from .conditioning import context_rows, per_latent_context
from .families.unet import adaptable_modules
from .process import process_of
from .recipes import SALIENCY_MICRO_BATCH
from .storage_cast import gradient_taps


class SaliencyError(FloatingPointError):
    """A loss or gradient became NaN/inf while computing saliency (nothing was changed)."""


@dataclass
class Saliency:
    """Saliency of the UNet's Linear/Conv2d weights: per element, or per module only.

    Attributes:
        scores: module name -> ``|sum grad|`` with the shape of that module's weight (float32,
            CPU). Empty when only per-module scores were kept (``element_scores=False``).
        concept: the prompt the gradients were taken for.
        num_samples: how many (latent, timestep) pairs were summed.
        stats: module name -> ``{"mean": ..., "max": ...}`` of its element scores; always set by
            :func:`compute_saliency`, derived from ``scores`` when absent.
        shapes: module name -> weight shape.
    """

    scores: dict[str, Tensor]
    concept: str = ""
    num_samples: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for n, sc in self.scores.items():
            self.shapes.setdefault(n, tuple(int(d) for d in sc.shape))
            if n not in self.stats:
                self.stats[n] = {"mean": float(sc.float().mean()), "max": float(sc.float().amax())}

    @property
    def modules(self) -> list[str]:
        """Names of every module with a score."""
        return list(self.stats)

    @property
    def has_elements(self) -> bool:
        """True when per-element scores were kept (needed for masks)."""
        return bool(self.scores)

    def total_elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def mask(self, fraction: float | None = None, threshold: float | None = None,
             scope: str = "global", modules: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Binary masks (bool, weight-shaped) keeping the most salient elements.

        Args:
            fraction: keep exactly ``round(fraction * n)`` (at least 1) of the ``n`` elements
                ranked, ``fraction`` in (0, 1]; ties at the cut are broken by position (modules
                in the order given, then flat index), so masks never grow past the fraction
                when many scores are equal (e.g. zero).
            threshold: keep elements with score >= threshold (instead of fraction).
            scope: ``"global"`` ranks all elements together; ``"layer"`` keeps the top fraction of
                each module separately.
            modules: restrict to these module names (default: all).
        """
        if (fraction is None) == (threshold is None):
            raise ValueError("give exactly one of fraction= or threshold=")
        if fraction is not None and not (0.0 < fraction <= 1.0):
            raise ValueError(f"mask fraction must be in (0, 1], got {fraction}")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        if not self.has_elements:
            raise ValueError("this saliency kept per-module scores only; compute it with "
                             "element_scores=True (ComputeSaliency: element_scores on) to mask "
                             "weight elements")
        names = list(self.scores) if modules is None else list(modules)
        missing = [n for n in names if n not in self.scores]
        if missing:
            raise KeyError(f"no saliency for modules {missing[:3]}")
        if threshold is not None:
            return {n: self.scores[n] >= threshold for n in names}
        if scope == "layer":
            return {n: top_k_masks([self.scores[n]], _count(fraction, self.scores[n].numel()))[0]
                    for n in names}
        tensors = [self.scores[n] for n in names]
        k = _count(fraction, sum(t.numel() for t in tensors))
        return dict(zip(names, top_k_masks(tensors, k)))

    def module_scores(self, reduce: str = "mean") -> dict[str, float]:
        """One score per module: ``mean`` or ``max`` of its element scores."""
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
        return {n: st[reduce] for n, st in self.stats.items()}

    def top_modules(self, count: int | None = None, fraction: float | None = None,
                    reduce: str = "mean", exclude: Iterable[str] = ()) -> list[str]:
        """Module names ranked by module score, highest first: the top ``count`` or ``fraction``
        of the modules not named in ``exclude``."""
        skip = set(exclude)
        ranked = sorted(((n, v) for n, v in self.module_scores(reduce).items() if n not in skip),
                        key=lambda kv: -kv[1])
        if count is None and fraction is None:
            return [n for n, _ in ranked]
        if fraction is not None:
            if not (0.0 < fraction <= 1.0):
                raise ValueError(f"module fraction must be in (0, 1], got {fraction}")
            count = max(1, round(fraction * len(ranked)))
        if count is None or count < 1:
            raise ValueError(f"module count must be >= 1, got {count}")
        return [n for n, _ in ranked[:count]]


def _count(fraction: float, n: int) -> int:
    return min(n, max(1, int(round(fraction * n))))


_EXACT_LIMIT = 1 << 24  # up to this many elements, one concatenated kthvalue (64 MB float32)


def kth_largest(tensors: Sequence[Tensor], k: int) -> float:
    """The ``k``-th largest value (1 = the maximum) over non-negative float tensors.

    Small inputs: one ``kthvalue`` over their concatenation. Large ones (an SD UNet has 860 M
    weights): a bisection on the float32 bit pattern, counting ``>=`` per tensor, so no
    concatenated copy and no ``topk`` over every weight is ever formed (32 counting passes)."""
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in 1..{total}, got {k}")
    if total <= _EXACT_LIMIT:
        flat = torch.cat([t.detach().flatten().float().cpu() for t in tensors])
        return float(flat.kthvalue(total - k + 1).values)
    lo, hi = 0, 0x7F800000  # bit patterns of +0.0 and +inf; non-negative floats sort as ints

    def count_ge(bits: int) -> int:
        v = float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))
        return sum(int((t >= v).sum()) for t in tensors)

    while lo < hi:  # largest bit pattern whose value still has >= k elements at or above it
        mid = (lo + hi + 1) // 2
        if count_ge(mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    return float(torch.tensor(lo, dtype=torch.int32).view(torch.float32))


def top_k_masks(tensors: Sequence[Tensor], k: int) -> list[Tensor]:
    """Bool masks keeping exactly ``k`` largest elements over ``tensors`` ranked together; ties at
    the cut go to the earliest positions (tensor order, then flat index)."""
    cut = kth_largest(tensors, k)
    masks = [t > cut for t in tensors]
    need = k - sum(int(m.sum()) for m in masks)
    for t, m in zip(tensors, masks):
        if need <= 0:
            break
        tied = (t == cut).flatten().nonzero().squeeze(1)[:need]
        m.view(-1)[tied] = True
        need -= tied.numel()
    return masks


def compute_saliency(denoiser: Denoiser, concept: str | Sequence[str], latents: Tensor, *,
                     timesteps: Tensor | None = None, batch_size: int = SALIENCY_MICRO_BATCH,
                     modules: Sequence[str] | None = None, seed: int = 0,
                     element_scores: bool = True, gradient_checkpointing: bool = False,
                     target_prompts: str | Sequence[str] | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> Saliency:
    """Accumulate ``grad_W`` of the denoising MSE on ``latents`` ``[N, C, H, W]`` of the concept,
    conditioned on ``concept``, and return ``|sum|`` per element (and per-module mean/max).
    ``concept`` may also be one prompt per latent (several concepts erased together: the sum then
    runs over all of them).

    Each latent gets one timestep: ``timesteps`` ``[N]`` if given, else uniform random (seeded).
    Memory: ``batch_size`` latents go through the UNet at a time (micro-batches; any N). Each
    weight's gradient is used the moment backward produces it and then freed, so no full set of
    weight gradients is ever held on the device. ``element_scores=True`` (what masks need) adds
    it to a float32 running sum per weight in system RAM (4 bytes per weight: exact ``|sum|``).
    ``element_scores=False`` keeps no per-weight buffer anywhere: each micro-batch's gradient is
    reduced at once to its module's ``mean |g|`` (summed over micro-batches) and ``max |g|`` (the
    largest), a SALIENCY of kilobytes; with one micro-batch for all N latents these equal the mean
    and max of ``|sum|`` exactly, with several they are the per-batch magnitudes (on the canvas
    model, the top 10-50% of modules by either statistic overlapped 92-100%). ``gradient_checkpointing`` recomputes activations in
    backward (needs a denoiser with ``enable_gradient_checkpointing``). Weights stored in float16 are handled with
    loss scaling (gradients of the UNet underflow float16 otherwise). The UNet runs in eval mode;
    its weights, ``requires_grad`` flags, ``.grad`` fields and mode are restored afterwards.
    Raises :class:`SaliencyError` if a loss or gradient is not finite.

    ``target_prompts`` (one, or one per latent; ``""`` is the unconditional prompt) replaces the
    regression target: the MSE is then to the model's own prediction (no gradient) under those
    prompts instead of to the noise. With the surrogates, that is the gradient of SPARE's first
    self-distillation step (the concept's prediction pulled toward the surrogate's), which ranks
    the weights that move the concept rather than those that denoise its images.
    """
    prompts = [concept] if isinstance(concept, str) else list(concept)
    if not prompts or any(not p or not p.strip() for p in prompts):
        raise ValueError("concept prompt is empty: type the concept to forget, e.g. 'Van Gogh style'")
    if len(prompts) not in (1, latents.shape[0]):
        raise ValueError(f"give one concept prompt, or one per latent ({latents.shape[0]}); got "
                         f"{len(prompts)}")
    if latents.dim() != 4 or tuple(latents.shape[1:]) != tuple(denoiser.latent_shape):
        raise ValueError(f"latents must be [N, {', '.join(map(str, denoiser.latent_shape))}], "
                         f"got {list(latents.shape)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if target_prompts is not None:
        target_prompts = [target_prompts] if isinstance(target_prompts, str) else list(target_prompts)
        if len(target_prompts) not in (1, latents.shape[0]):
            raise ValueError(f"give one target prompt, or one per latent ({latents.shape[0]}); "
                             f"got {len(target_prompts)}")
    check_checkpointing(denoiser, gradient_checkpointing)
    unet = denoiser.unet
    targets = adaptable_modules(unet)
    if modules is not None:
        unknown = [m for m in modules if m not in targets]
        if unknown:
            raise KeyError(f"modules not Linear/Conv2d in this UNet: {unknown[:3]}")
        targets = {m: targets[m] for m in modules}
    weights = {name: m.weight for name, m in targets.items()}
    # weights stored narrower than any training dtype (fp8) cannot hold a gradient: theirs is
    # taken from the upcast copy each forward computes on (storage_cast.gradient_taps)
    tapped = {name: targets[name] for name, w in weights.items() if w.dtype not in TRAIN_DTYPES}
    held = {name: w for name, w in weights.items() if name not in tapped}
    storage = {w.dtype for w in held.values()}
    dev = device_of(denoiser)
    dtype = compute_dtype_of(denoiser)
    n = latents.shape[0]
    gen = torch.Generator().manual_seed(seed)
    T = process_of(denoiser).num_steps
    if timesteps is None:
        timesteps = torch.randint(0, T, (n,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    context = per_latent_context(denoiser, prompts, n)
    target_context = (None if target_prompts is None
                      else per_latent_context(denoiser, target_prompts, n))
    fp16 = torch.float16 in storage or dtype == torch.float16

    saved_flags = {p: p.requires_grad for p in unet.parameters()}
    saved_grads = {name: w.grad for name, w in held.items()}
    was_training = unet.training
    unet.requires_grad_(False)
    unet.eval()
    for w in held.values():
        w.requires_grad_(True)
        w.grad = None
    try:
        # float16: back-propagate loss * scale; divide it by 16 and start again on overflow
        scale = 2.0 ** 16 if fp16 else 1.0
        for _ in range(32):
            with checkpointing(denoiser, gradient_checkpointing):
                sums = _accumulate(denoiser, weights, held, tapped, latents, timesteps, noise,
                                   context, batch_size, scale, element_scores, dev, dtype,
                                   progress, should_stop, target_context)
            if sums is not None:
                break
            if not fp16:
                raise SaliencyError("a gradient became NaN/inf while computing saliency: check the "
                                    "model's outputs (float32 or bfloat16 compute); nothing was "
                                    "changed")
            scale /= 2.0 ** 4
        else:
            raise SaliencyError("float16 gradients overflowed at every loss scale; load the model "
                                "in bfloat16 or float32")
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        for name, w in held.items():
            w.grad = saved_grads[name]
        unet.train(was_training)
    shapes = {k: tuple(int(d) for d in w.shape) for k, w in weights.items()}
    label = "\n".join(dict.fromkeys(prompts))  # the distinct concepts, one per line
    if element_scores:
        return Saliency({k: v.abs_() for k, v in sums.items()}, concept=label, num_samples=n,
                        shapes=shapes)
    stats = {k: {"mean": float(r[0]), "max": float(r[1])} for k, r in sums.items()}
    return Saliency({}, concept=label, num_samples=n, stats=stats, shapes=shapes)


def _accumulate(denoiser, weights, held, tapped, latents, timesteps, noise, context, batch_size,
                scale, element_scores, dev, dtype, progress, should_stop,
                target_context=None) -> dict[str, Tensor] | None:
    """One pass over the micro-batches, or None if a gradient overflowed: the summed gradients
    (``element_scores``), else per module ``[sum of mean |g|, max |g|]``. ``held``: weights that
    take their own gradient; ``tapped``: layers whose weight gradient is read from their
    compute-precision copy (fp8 storage)."""
    # the device holds one weight's gradient at a time: summed into system RAM, or reduced
    if element_scores:
        sums = {k: torch.zeros(w.shape, dtype=torch.float32) for k, w in weights.items()}
    else:
        # float32, not float64: some devices (MPS) have no float64
        sums = {k: torch.zeros(2, dtype=torch.float32, device=dev) for k in weights}
    finite = torch.ones((), dtype=torch.bool, device=dev)

    def add(name: str, g: Tensor) -> None:
        finite.logical_and_(torch.isfinite(g).all())
        acc = sums[name]
        if element_scores:
            acc.add_(g.to(acc.device, acc.dtype), alpha=1.0 / scale)  # scale: a power of two
            return
        a = g.detach().abs()
        acc[0] += a.mean(dtype=torch.float32) / scale
        acc[1] = torch.maximum(acc[1], a.amax().float() / scale)

    def take(name: str):
        def hook(param: Tensor) -> None:
            g = param.grad
            param.grad = None  # freed as soon as it is summed
            add(name, g)
        return hook

    handles = [w.register_post_accumulate_grad_hook(take(k)) for k, w in held.items()]
    n = latents.shape[0]
    proc = process_of(denoiser)
    try:
        with gradient_taps(denoiser.unet, tapped, dtype, add):
            for lo in range(0, n, batch_size):
                if should_stop is not None and should_stop():
                    raise InterruptedError("saliency computation was cancelled")
                x0 = latents[lo:lo + batch_size]
                t = timesteps[lo:lo + batch_size]
                eps = noise[lo:lo + batch_size].float()
                x_t = proc.q_sample(x0.float(), t, eps).to(dev, dtype)
                if target_context is None:  # the family's own training target
                    target = proc.target(x0.float(), eps).to(dev)
                else:  # the model's own prediction under the target prompts (the objective's pull)
                    with torch.no_grad():
                        rows = context_rows(target_context, lo, x0.shape[0], n).to(dev)
                        target = prediction(denoiser, x_t, t.to(dev), rows).float()
                with torch.enable_grad():
                    pred = prediction(denoiser, x_t, t.to(dev),
                                      context_rows(context, lo, x0.shape[0], n).to(dev))
                    # sum over the batch of per-sample MSE: gradients add over samples as in SalUn
                    loss = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3)).sum()
                    if not torch.isfinite(loss):
                        raise SaliencyError(f"the denoising loss became {float(loss.detach())} on the concept's "
                                            "latents: the model's outputs are not finite in "
                                            f"{dtype}; try float32 or bfloat16. Nothing was changed")
                    (loss * scale if scale != 1.0 else loss).backward()
                if not bool(finite):
                    return None
                if progress is not None:
                    progress(min(lo + batch_size, n), n)
    finally:
        for h in handles:
            h.remove()
    return sums


def save_saliency(sal: Saliency, path: str) -> None:
    """Write scores (and per-module stats and shapes, as JSON metadata) to ``.safetensors``
    (atomic)."""
    import json

    from .files import atomic_save_safetensors
    meta = {"format": "spare_saliency", "concept": sal.concept, "num_samples": str(sal.num_samples),
            "stats": json.dumps(sal.stats), "shapes": json.dumps(sal.shapes)}
    meta.update(sal.meta)
    atomic_save_safetensors({k: v.contiguous() for k, v in sal.scores.items()}, path, meta)


def load_saliency(path: str) -> Saliency:
    """Read a file written by :func:`save_saliency`."""
    import json

    from .files import read_safetensors
    tensors, meta = read_safetensors(path)
    if meta.get("format") != "spare_saliency":
        raise ValueError(f"{path} is not a saliency file (format={meta.get('format')!r})")
    stats = json.loads(meta.get("stats", "{}"))
    shapes = {k: tuple(v) for k, v in json.loads(meta.get("shapes", "{}")).items()}
    return Saliency(tensors, concept=meta.get("concept", ""),
                    num_samples=int(meta.get("num_samples", 0)),
                    meta={k: v for k, v in meta.items()
                          if k not in ("format", "concept", "num_samples", "stats", "shapes")},
                    stats=stats, shapes=shapes)
