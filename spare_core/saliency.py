"""Gradient weight saliency (SalUn; SPARE stage 1).

``s = |sum_n grad_W L_forget(n)|`` per weight element, where ``L_forget`` is the denoising MSE on
latents of the concept conditioned on the concept prompt, summed over N samples and timesteps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .denoiser import Denoiser, device_of
from .sampling import q_sample

ADAPTABLE = (nn.Linear, nn.Conv2d)


def adaptable_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d modules of ``unet`` by qualified name (what adapters and saliency address)."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, ADAPTABLE)}


@dataclass
class Saliency:
    """Per-element saliency scores of the UNet's Linear/Conv2d weights.

    Attributes:
        scores: module name -> ``|sum grad|`` with the shape of that module's weight (float32, CPU).
        concept: the prompt the gradients were taken for.
        num_samples: how many (latent, timestep) pairs were summed.
    """

    scores: dict[str, Tensor]
    concept: str = ""
    num_samples: int = 0
    meta: dict[str, str] = field(default_factory=dict)

    def total_elements(self) -> int:
        return sum(s.numel() for s in self.scores.values())

    def mask(self, fraction: float | None = None, threshold: float | None = None,
             scope: str = "global", modules: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Binary masks (bool, weight-shaped) keeping the most salient elements.

        Args:
            fraction: keep the top ``fraction`` in (0, 1] of elements (ties at the cut kept).
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
        names = list(self.scores) if modules is None else list(modules)
        missing = [n for n in names if n not in self.scores]
        if missing:
            raise KeyError(f"no saliency for modules {missing[:3]}")
        if threshold is not None:
            return {n: self.scores[n] >= threshold for n in names}
        if scope == "layer":
            return {n: _top_fraction(self.scores[n], fraction) for n in names}
        flat = torch.cat([self.scores[n].flatten() for n in names])
        cut = _kth_largest(flat, fraction)
        return {n: self.scores[n] >= cut for n in names}

    def module_scores(self, reduce: str = "mean") -> dict[str, float]:
        """One score per module: ``mean`` or ``max`` of its element scores."""
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
        fn = torch.mean if reduce == "mean" else torch.amax
        return {n: float(fn(s)) for n, s in self.scores.items()}

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


def _kth_largest(flat: Tensor, fraction: float) -> Tensor:
    k = max(1, int(round(fraction * flat.numel())))
    return torch.topk(flat.float(), k, sorted=False).values.min()


def _top_fraction(scores: Tensor, fraction: float) -> Tensor:
    return scores >= _kth_largest(scores.flatten(), fraction)


def compute_saliency(denoiser: Denoiser, concept: str, latents: Tensor, *,
                     timesteps: Tensor | None = None, batch_size: int = 8,
                     modules: Sequence[str] | None = None, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> Saliency:
    """Accumulate ``grad_W`` of the denoising MSE on ``latents`` ``[N, C, H, W]`` of the concept,
    conditioned on ``concept``, and return ``|sum|`` per element.

    Each latent gets one timestep: ``timesteps`` ``[N]`` if given, else uniform random (seeded).
    The UNet's weights and ``requires_grad`` flags are restored afterwards; its ``.grad`` fields are
    left as they were.
    """
    if not concept or not concept.strip():
        raise ValueError("concept prompt is empty: type the concept to forget, e.g. 'Van Gogh style'")
    if latents.dim() != 4 or tuple(latents.shape[1:]) != tuple(denoiser.latent_shape):
        raise ValueError(f"latents must be [N, {', '.join(map(str, denoiser.latent_shape))}], "
                         f"got {list(latents.shape)}")
    unet = denoiser.unet
    targets = adaptable_modules(unet)
    if modules is not None:
        unknown = [m for m in modules if m not in targets]
        if unknown:
            raise KeyError(f"modules not Linear/Conv2d in this UNet: {unknown[:3]}")
        targets = {m: targets[m] for m in modules}
    dev = device_of(denoiser)
    n = latents.shape[0]
    gen = torch.Generator().manual_seed(seed)
    T = denoiser.alphas_cumprod.numel()
    if timesteps is None:
        timesteps = torch.randint(0, T, (n,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    context = denoiser.encode([concept])

    saved_flags = {p: p.requires_grad for p in unet.parameters()}
    weights = {name: m.weight for name, m in targets.items()}
    unet.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    try:
        done = 0
        for lo in range(0, n, batch_size):
            if should_stop is not None and should_stop():
                raise InterruptedError("saliency computation was cancelled")
            x0 = latents[lo:lo + batch_size].to(dev)
            t = timesteps[lo:lo + batch_size].to(dev)
            eps = noise[lo:lo + batch_size].to(dev)
            dtype = next(unet.parameters()).dtype
            x_t = q_sample(x0.float(), t, eps.float(), denoiser.alphas_cumprod).to(dtype)
            with torch.enable_grad():
                pred = denoiser.eps(x_t, t, context.expand(x0.shape[0], -1, -1).to(dev))
                # sum over the batch of per-sample MSE: gradients add over samples as in SalUn
                loss = ((pred.float() - eps.float()) ** 2).mean(dim=(1, 2, 3)).sum()
                grads = torch.autograd.grad(loss, list(weights.values()))
            for name, g in zip(weights, grads):
                sums[name] += g.float()
            done += x0.shape[0]
            if progress is not None:
                progress(done, n)
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
    return Saliency({k: v.abs().cpu() for k, v in sums.items()}, concept=concept, num_samples=n)


def save_saliency(sal: Saliency, path: str) -> None:
    """Write scores to ``.safetensors`` (atomic)."""
    from .files import atomic_save_safetensors
    meta = {"format": "spare_saliency", "concept": sal.concept, "num_samples": str(sal.num_samples)}
    meta.update(sal.meta)
    atomic_save_safetensors({k: v.contiguous() for k, v in sal.scores.items()}, path, meta)


def load_saliency(path: str) -> Saliency:
    """Read a file written by :func:`save_saliency`."""
    from .files import read_safetensors
    tensors, meta = read_safetensors(path)
    if meta.get("format") != "spare_saliency":
        raise ValueError(f"{path} is not a saliency file (format={meta.get('format')!r})")
    return Saliency(tensors, concept=meta.get("concept", ""),
                    num_samples=int(meta.get("num_samples", 0)),
                    meta={k: v for k, v in meta.items()
                          if k not in ("format", "concept", "num_samples")})
