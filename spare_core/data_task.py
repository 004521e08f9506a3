"""Data unlearning: forget a set of training images A while keeping a set X.

:class:`DataTask` has the interface of :class:`~spare_core.tasks.ConceptTask` (``validate``,
``prepare``, ``batch``) so the one loop (:func:`spare_core.loop.unlearn`) runs SISS, NegGrad,
EraseDiff and naive deletion. Each batch pairs ``B`` keep samples with ``B`` forget samples that
share their noise and timestep (as in the SISS code) and carries in ``Batch.extras``:

- ``mixture_x_t`` ``[B, C, H, W]``: SISS's sample ``m_t ~ q_lambda = (1 - lambda) q(m_t|x) +
  lambda q(m_t|a)``: per pair, the forget sample's ``x_t`` with probability ``lambda``, else the
  keep sample's;
- ``mixture_from_forget`` ``[B]`` bool: which component each ``m_t`` came from;
- ``mixture_lambda``: float;
- ``uniform_noise`` ``[B, C, H, W]``: ``U[0, 1)`` noise (EraseDiff's forget target).

The task also carries the early stop's probe (:meth:`DataTask.stop_probe`): the denoising loss of
a few forget images against that of a few keep images held out of training, at fixed timesteps
and noise. A memorised image is denoised far better than unseen data of its kind; once the forget
images' loss is no longer below the held-out keep images' (ratio >= ``stop_ratio``), the model
no longer reproduces them and training can stop (measured on the pattern model:
benchmarks/RESULTS.md, "Data unlearning").

Images come as tensors or as folders of PNG/JPEG files. They are used as latents directly
(pixel-space models such as the embedded 8x8 digits model, whose latents are the images in
``[-1, 1]``, shape ``[N, 1, 8, 8]``), or passed through ``encode`` (e.g. a VAE encoder times its
scaling factor) for latent models. Prompts are optional: None is the empty prompt
(unconditional models).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from .denoiser import Denoiser, compute_dtype_of, device_of
from .objectives import Batch, Part
from .process import process_of
from .timesteps import UniformSampler

ImageSource = Union[Tensor, str, os.PathLike]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PROBE_IMAGES = 8
"""Forget images and held-out keep images the early stop's probe denoises (each at every probe
timestep, with the same noise for the two sets)."""
PROBE_TIMESTEPS = 8
"""Probe timesteps, one at the centre of each of as many equal strata of ``[0, T)``."""
PROBE_BATCH = 64
"""Latents per probe call (four timesteps of the two sets at a time)."""
PROBE_SEED = 7919
"""Offset of the probe's generator from the run's seed (its noise never draws from training's)."""


def load_image_folder(path: str | os.PathLike, channels: int | None = None,
                      size: int | tuple[int, int] | None = None) -> Tensor:
    """All images in ``path`` (sorted by file name) as ``[N, C, H, W]`` float32 in ``[-1, 1]``.

    Args:
        channels: 1 (grayscale), 3 (RGB) or 4 (RGBA); None keeps the first image's mode
            (grayscale stays one channel, anything else becomes RGB).
        size: resize every image to ``size`` (``int`` or ``(H, W)``); None requires equal sizes.
    """
    from PIL import Image

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"image folder {path!r} does not exist")
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) in {path!r}")
    if channels not in (None, 1, 3, 4):
        raise ValueError(f"channels must be 1, 3 or 4, got {channels}")
    hw = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    out, mode = [], None
    for name in files:
        with Image.open(os.path.join(path, name)) as im:
            if mode is None:
                mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels] if channels else \
                    ("L" if im.mode in ("L", "1", "I", "I;16", "F") else "RGB")
            im = im.convert(mode)
            if hw is not None and im.size != (hw[1], hw[0]):
                im = im.resize((hw[1], hw[0]), Image.BICUBIC)
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            x = x.view(im.size[1], im.size[0], len(mode)).permute(2, 0, 1).float()
        if out and x.shape != out[0].shape:
            raise ValueError(f"{name} is {list(x.shape[1:])} but {files[0]} is "
                             f"{list(out[0].shape[1:])}: pass size= to resize")
        out.append(x)
    return torch.stack(out) / 127.5 - 1.0


def _prompt_list(prompts: str | Sequence[str] | None, n: int, what: str) -> list[str]:
    if prompts is None:
        return [""] * n
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"{what} prompts: got {len(prompts)} for {n} images; give one per image, "
                         "one string for all, or None (unconditional)")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} prompts must be strings")
    return prompts


def probe_summary(history: dict) -> str:
    """One line on a run's early stop from its history (``stopped_at``, ``probe``): where it
    stopped, and the probe's forget/keep losses then and at step 0 (the keep loss is the cost)."""
    checks = history["probe"]
    first, last = checks[0], checks[-1]
    stop = history.get("stopped_at")
    where = (f"early stop at step {stop}: the forget images are no longer memorised"
             if stop is not None else f"no early stop in {last['step']} steps")
    return (f"{where} (probe forget/keep loss {last['forget']:.4g}/{last['keep']:.4g}, ratio "
            f"{last['ratio']:.2f}; at step 0 {first['forget']:.4g}/{first['keep']:.4g}, ratio "
            f"{first['ratio']:.2f})")


@dataclass
class DataTask:
    """Forget the images ``forget_latents`` (set A) while keeping ``keep_latents`` (set X).

    Args:
        forget_latents: ``[N, C, H, W]`` tensor or a folder of images.
        keep_latents: ``[M, C, H, W]`` tensor, a folder, or None (only NegGrad works without it).
        forget_prompts / keep_prompts: None (empty prompt), one string for all, or one per image.
        encode: ``images [N, C, H, W] in [-1, 1] -> latents``; applied to both sets when given.
            None: the inputs already are latents (or the model is pixel-space).
        mixture_lambda: SISS's ``lambda`` in (0, 1): probability that ``m_t`` is drawn from the
            forget component (default 0.5, the SISS paper's setting).
        image_channels / image_size: how folders are read (see :func:`load_image_folder`).
        stop_ratio: the early stop's threshold: the forget set counts as gone once the probe's
            forget loss is at least ``stop_ratio`` times its keep loss (:meth:`stop_probe`).

    A keep set of at least ``4 * PROBE_IMAGES`` images gives ``PROBE_IMAGES`` of them to the probe
    and trains on the rest (smaller sets: the probe reads training images; ``probe_held_out``).
    """

    forget_latents: ImageSource
    keep_latents: ImageSource | None
    forget_prompts: str | Sequence[str] | None = None
    keep_prompts: str | Sequence[str] | None = None
    encode: Callable[[Tensor], Tensor] | None = None
    mixture_lambda: float = 0.5
    image_channels: int | None = None
    image_size: int | tuple[int, int] | None = None
    stop_ratio: float = 1.0

    # ---- input checks (before any long work) -------------------------------------------------
    def _load(self, src: ImageSource | None, what: str) -> Tensor | None:
        if src is None:
            return None
        if isinstance(src, Tensor):
            x = src.detach()
        elif isinstance(src, (str, os.PathLike)):
            x = load_image_folder(src, self.image_channels, self.image_size)
        else:
            raise ValueError(f"{what} set must be a tensor [N, C, H, W] or a folder of images, "
                             f"got {type(src).__name__}")
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"{what} set must be a non-empty [N, C, H, W] tensor, got {list(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{what} set contains NaN/inf values")
        return x.float().cpu()

    def validate(self, denoiser: Denoiser | None = None) -> None:
        """Raise ValueError for bad input (reads image folders, checks shapes and prompts)."""
        lam = self.mixture_lambda
        if not isinstance(lam, (int, float)) or not 0.0 < float(lam) < 1.0:
            raise ValueError(f"mixture lambda must be in (0, 1) (SISS default 0.5), got {lam!r}")
        r = self.stop_ratio
        if not isinstance(r, (int, float)) or not 0.0 < float(r) < float("inf"):
            raise ValueError(f"stop_ratio must be a positive number (default 1.0), got {r!r}")
        self._forget = self._load(self.forget_latents, "forget")
        self._keep = self._load(self.keep_latents, "keep")
        self._keep_all = None  # the keep set before the probe's hold-out (set by prepare)
        self._fp = _prompt_list(self.forget_prompts, self._forget.shape[0], "forget")
        self._kp = None if self._keep is None else \
            _prompt_list(self.keep_prompts, self._keep.shape[0], "keep")
        if self._keep is None and self.keep_prompts is not None:
            raise ValueError("keep prompts given without a keep set")
        if self._keep is not None and self._keep.shape[1:] != self._forget.shape[1:]:
            raise ValueError(f"forget images {list(self._forget.shape[1:])} and keep images "
                             f"{list(self._keep.shape[1:])} differ in shape")
        if denoiser is not None and self.encode is None:
            self._check_shape(denoiser)

    def _check_shape(self, denoiser: Denoiser) -> None:
        shape = tuple(denoiser.latent_shape)
        for x, what in ((self._forget, "forget"), (self._keep, "keep")):
            if x is not None and tuple(x.shape[1:]) != shape:
                hint = ("pass encode= (e.g. a VAE encoder) to turn images into latents"
                        if self.encode is None else "encode returned latents of the wrong shape")
                raise ValueError(f"{what} latents are {list(x.shape[1:])} but the model denoises "
                                 f"{list(shape)}: {hint}")

    # ---- once per run -----------------------------------------------------------------------
    def prepare(self, denoiser: Denoiser, timestep_sampler: str, seed: int,
                progress: Callable[[str, int, int], None] | None = None) -> None:
        """Encode images (if ``encode``) and prompts, build the (uniform) timestep sampler."""
        if not hasattr(self, "_forget"):
            self.validate(denoiser)
        if self.encode is not None:
            with torch.no_grad():
                self._forget = self._encode(self._forget, "forget", progress)
                if self._keep is not None:
                    self._keep = self._encode(self._keep, "keep", progress)
            self._check_shape(denoiser)
        prompts = sorted(set(self._fp) | set(self._kp or []))
        ctx = denoiser.encode(prompts)
        index = {p: i for i, p in enumerate(prompts)}
        self._ctx = ctx
        self._fidx = torch.tensor([index[p] for p in self._fp], dtype=torch.long)
        self._kidx = None if self._kp is None else torch.tensor([index[p] for p in self._kp],
                                                                dtype=torch.long)
        self._uncond = denoiser.encode([""])
        if timestep_sampler == "concept":
            warnings.warn("the 'concept' timestep sampler measures a concept prompt against a "
                          "surrogate and does not apply to data unlearning; using 'uniform' "
                          "(pass timestep_sampler='uniform' to silence this)", stacklevel=3)
        elif timestep_sampler != "uniform":
            raise ValueError(f"unknown timestep sampler {timestep_sampler!r} for a data task; "
                             "use 'uniform'")
        self.timestep_sampler = "uniform"
        self.sampler = UniformSampler(process_of(denoiser).num_steps)
        self._build_probe(denoiser, seed)

    def _build_probe(self, denoiser: Denoiser, seed: int) -> None:
        """The probe's fixed inputs (and the keep images it holds out of training)."""
        self._probe = None
        self.probe_held_out = False
        if self._keep is None:
            return
        if getattr(self, "_keep_all", None) is None:  # a second prepare splits the same set again
            self._keep_all = (self._keep, self._kidx)
        keep, kidx = self._keep_all
        g = torch.Generator().manual_seed(int(seed) + PROBE_SEED)
        n = PROBE_IMAGES
        if keep.shape[0] >= 4 * n:  # hold out: the probe reads images training never sees
            perm = torch.randperm(keep.shape[0], generator=g)
            held, rest = perm[:n].sort().values, perm[n:].sort().values
            keep_x, keep_c = keep[held], kidx[held]
            self._keep, self._kidx = keep[rest], kidx[rest]
            self.probe_held_out = True
        else:
            idx = torch.arange(n) % keep.shape[0]
            keep_x, keep_c = keep[idx], kidx[idx]
        fidx = torch.arange(n) % self._forget.shape[0]
        proc = process_of(denoiser)
        T = proc.num_steps
        ts = [min(T - 1, int((k + 0.5) * T / PROBE_TIMESTEPS)) for k in range(PROBE_TIMESTEPS)]
        noise = torch.randn((len(ts), n, *self._forget.shape[1:]), generator=g)
        self._probe = (self._forget[fidx], self._fidx[fidx], keep_x, keep_c, ts, noise)

    def _encode(self, x: Tensor, what: str, progress) -> Tensor:
        outs, n, bs = [], x.shape[0], 16
        for lo in range(0, n, bs):
            outs.append(self.encode(x[lo:lo + bs]).detach().float().cpu())
            if progress is not None:
                progress(f"encode {what}", min(lo + bs, n), n)
        return torch.cat(outs)

    @property
    def forget_set(self) -> Tensor:
        """The forget latents ``[N, C, H, W]`` (after validate/prepare)."""
        return self._forget

    @property
    def keep_set(self) -> Tensor | None:
        """The keep latents ``[M, C, H, W]`` that training draws from, or None (after
        validate/prepare; without the probe's held-out images)."""
        return self._keep

    @property
    def has_probe(self) -> bool:
        """Whether :meth:`stop_probe` can run (it needs a keep set; after prepare)."""
        return getattr(self, "_probe", None) is not None

    @torch.no_grad()
    def stop_probe(self, denoiser: Denoiser, predict: Callable[[Tensor, Tensor, Tensor], Tensor],
                   max_rows: int = PROBE_BATCH) -> dict:
        """Is the forget set gone? ``predict(x_t, t, ctx)`` is the model being trained.

        Denoises ``PROBE_IMAGES`` forget images and as many held-out keep images at the
        ``PROBE_TIMESTEPS`` fixed timesteps with the same fixed noise, at most ``max_rows``
        latents per call (the training run's micro-batch: at 1024 px on a 12 B DiT, 64 rows at
        once would hold 40 GB of activations). Returns ``forget`` and ``keep`` (mean squared
        error of the prediction to its
        target, averaged over timesteps and images), ``ratio`` (forget / keep) and ``gone``
        (``ratio >= stop_ratio``): a memorised image has a far lower loss than unseen data
        (ratio well below 1), an image the model does not reproduce does not.
        """
        if self._probe is None:
            raise ValueError("the early stop needs a keep set: its probe compares the forget "
                             "images' denoising loss with held-out keep images'")
        fx, fc, kx, kc, ts, noise = self._probe
        dev, dtype, proc = device_of(denoiser), compute_dtype_of(denoiser), process_of(denoiser)
        n = fx.shape[0]
        x0, cidx = torch.cat([fx, kx]), torch.cat([fc, kc])
        per_t = []
        group = max(1, PROBE_BATCH // (2 * n))  # timesteps per group (calls: max_rows each)
        for lo in range(0, len(ts), group):
            tg, ng = ts[lo:lo + group], noise[lo:lo + group]
            nz = torch.cat([torch.cat([z, z]) for z in ng])  # forget and keep share the noise
            tt = torch.tensor([t for t in tg for _ in range(2 * n)], dtype=torch.long)
            xs = x0.repeat(len(tg), 1, 1, 1)
            ctx = self._ctx[cidx.repeat(len(tg))]
            x_t = proc.q_sample(xs, tt, nz)
            pred = torch.cat([predict(x_t[a:a + max_rows].to(dev, dtype), tt[a:a + max_rows].to(dev),
                                      ctx[a:a + max_rows].to(dev, dtype)).float()
                              for a in range(0, xs.shape[0], max_rows)])
            err = ((pred - proc.target(xs, nz).to(dev)) ** 2).flatten(1).mean(1).view(len(tg), 2, n)
            per_t += [[t, float(e[0].mean()), float(e[1].mean())] for t, e in zip(tg, err)]
        lf = sum(f for _, f, _ in per_t) / len(per_t)
        lk = sum(k for _, _, k in per_t) / len(per_t)
        ratio = lf / lk if lk > 0 else float("inf")
        return {"forget": lf, "keep": lk, "ratio": ratio, "per_t": per_t,
                "gone": ratio >= float(self.stop_ratio)}

    # ---- per step ---------------------------------------------------------------------------
    def batch(self, denoiser: Denoiser, batch_size: int, gen: torch.Generator) -> Batch:
        """``batch_size`` forget/keep pairs sharing noise and timestep, plus SISS's mixture
        sample and EraseDiff's uniform noise in ``extras``."""
        dev = device_of(denoiser)
        dtype = compute_dtype_of(denoiser)
        proc = process_of(denoiser)
        B = batch_size
        ia = torch.randint(0, self._forget.shape[0], (B,), generator=gen)
        t = self.sampler(B, gen)
        noise = torch.randn((B, *self._forget.shape[1:]), generator=gen)
        a0 = self._forget[ia]
        a_t = proc.q_sample(a0, t, noise)

        def part(x0: Tensor, x_t: Tensor, ctx_idx: Tensor) -> Part:
            # x0, noise and target stay float32; the network's inputs take its dtype
            return Part(x0.to(dev, torch.float32), noise.to(dev), t.to(dev), x_t.to(dev, dtype),
                        self._ctx[ctx_idx].to(dev, dtype), proc.target(x0, noise).to(dev))

        forget = part(a0, a_t, self._fidx[ia])
        keep, extras = None, {"uniform_noise": torch.rand(noise.shape, generator=gen).to(dev)}
        if self._keep is not None:
            ix = torch.randint(0, self._keep.shape[0], (B,), generator=gen)
            x0 = self._keep[ix]
            x_t = proc.q_sample(x0, t, noise)
            keep = part(x0, x_t, self._kidx[ix])
            lam = float(self.mixture_lambda)
            from_a = torch.rand(B, generator=gen) < lam
            m = torch.where(from_a.view(-1, 1, 1, 1), a_t, x_t)
            extras.update(mixture_x_t=m.to(dev), mixture_from_forget=from_a.to(dev),
                          mixture_lambda=lam)
        uncond = self._uncond.to(dev, dtype)
        return Batch(forget, keep, uncond.expand(B, -1, -1), uncond, proc, extras)
