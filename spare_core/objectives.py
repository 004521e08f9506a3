"""Unlearning objectives: each is a function of (student, frozen teacher, batch).

``student(x_t, t, ctx)`` runs the network with the adapter on (gradients flow into the adapter);
``teacher(x_t, t, ctx)`` runs the same network with the adapter off, without gradients. Both
return the network's prediction in its forward process's space (noise for VP models, velocity
for flow models: :mod:`spare_core.process`). Objectives that match two predictions are the same
in either space; a ground-truth target is the part's ``target`` (the family's own training
target) and noising goes through ``batch.process``, so no objective knows the family. Objectives
batch their student and teacher calls so one training step costs one student and one teacher
forward. An objective may also offer ``parts(student, teacher, batch)``: the same loss as a
sequence of terms whose sum is the loss, which the loop back-propagates one at a time (a lower
peak: only one term's activations are alive at once).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor

from .process import ForwardProcess

EpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class Part:
    """One side of a batch: clean latents ``x0`` ``[B, C, H, W]``, ``noise`` (same shape),
    step indices ``t`` ``[B]``, noisy ``x_t``, context ``ctx`` (``[B, L, D]`` or a
    :class:`~spare_core.conditioning.Context`) and the training ``target`` of a prediction at
    ``x_t`` (the noise for VP models, ``noise - x0`` for flow; defaults to ``noise``)."""

    x0: Tensor
    noise: Tensor
    t: Tensor
    x_t: Tensor
    ctx: Tensor
    target: Tensor | None = None

    def __post_init__(self) -> None:
        if self.target is None:
            self.target = self.noise

    def __len__(self) -> int:
        return self.x0.shape[0]


@dataclass
class Batch:
    """What an objective gets each step.

    Attributes:
        forget: latents of what is forgotten (concept images or the forget set), with the concept
            context.
        preserve: latents of what must be kept (preserved prompts or the keep set), or None.
        surrogate_ctx: ``[B_forget, L, D]`` context of the surrogate prompt.
        uncond_ctx: ``[1, L, D]`` context of the empty prompt.
        process: the forward process (:class:`~spare_core.process.ForwardProcess`; a ``[T]``
            alpha-bar tensor is taken as a VP process).
        extras: objective-specific tensors a batch builder adds (e.g. SISS's mixture weights).
        loss_scale: factor the loop multiplies the loss by before backward (fp16 loss scaling);
            objectives that take gradients themselves scale by it too, then divide it out.
        params: the trainable parameters (set by the loop), for objectives that take gradients
            themselves; None: found by walking the loss's autograd graph, which cannot see
            through gradient checkpointing.
    """

    forget: Part
    preserve: Part | None
    surrogate_ctx: Tensor
    uncond_ctx: Tensor
    process: ForwardProcess
    extras: dict | None = None
    loss_scale: float = 1.0
    params: list | None = None

    def __post_init__(self) -> None:
        if isinstance(self.process, Tensor):
            self.process = ForwardProcess.vp(self.process)


class Objective(Protocol):
    """Optional attributes: ``uses_preserve`` / ``uses_surrogate`` (default True); when False the
    loop does not generate preserved-prompt pools, or says the surrogate is ignored."""

    name: str

    def __call__(self, student: EpsFn, teacher: EpsFn, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss to minimise and a dict of named float terms for the history."""
        ...


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error in float32."""
    return ((a.float() - b.float()) ** 2).mean()


def _cat(*xs: Tensor) -> Tensor:
    return torch.cat(xs) if len(xs) > 1 else xs[0]


class SelfDistill:
    """SPARE stage 2: ``wf * ||s(x_c, t, c) - T(x_c, t, c_sur)||^2 + wp * ||s(x_p, t, p) - T(x_p, t, p)||^2``.

    The student on the concept prompt matches the frozen original on the surrogate prompt; on
    preserved prompts it matches the frozen original on the same prompts.
    """

    name = "self_distill"

    def __init__(self, forget_weight: float = 1.0, preserve_weight: float = 1.0) -> None:
        self.wf, self.wp = float(forget_weight), float(preserve_weight)

    @property
    def uses_preserve(self) -> bool:
        """False at ``preserve_weight=0``: the preserve term adds nothing, so no pools for it."""
        return self.wp != 0.0

    def __call__(self, student: EpsFn, teacher: EpsFn, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        f, p = batch.forget, batch.preserve
        nf = len(f)
        if p is None:
            s = student(f.x_t, f.t, f.ctx)
            target = teacher(f.x_t, f.t, batch.surrogate_ctx)
            lf = mse(s, target)
            return self.wf * lf, {"forget": lf.item()}
        s = student(_cat(f.x_t, p.x_t), _cat(f.t, p.t), _cat(f.ctx, p.ctx))
        target = teacher(_cat(f.x_t, p.x_t), _cat(f.t, p.t), _cat(batch.surrogate_ctx, p.ctx))
        lf, lp = mse(s[:nf], target[:nf]), mse(s[nf:], target[nf:])
        return self.wf * lf + self.wp * lp, {"forget": lf.item(), "preserve": lp.item()}

    def parts(self, student: EpsFn, teacher: EpsFn, batch: Batch) -> Iterator[tuple[Tensor, dict[str, float]]]:
        """The forget term, then the preserve term, each with its own forward passes (as the
        SPARE authors back-propagate the halves separately to fit SDXL in 12 GB)."""
        f, p = batch.forget, batch.preserve
        lf = mse(student(f.x_t, f.t, f.ctx), teacher(f.x_t, f.t, batch.surrogate_ctx))
        yield self.wf * lf, {"forget": lf.item()}
        if p is not None:
            lp = mse(student(p.x_t, p.t, p.ctx), teacher(p.x_t, p.t, p.ctx))
            yield self.wp * lp, {"preserve": lp.item()}


# ---------------------------------------------------------------------------------------------
# Shared helpers of the baseline objectives
# ---------------------------------------------------------------------------------------------

def per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """``[B]`` mean squared error per sample (over every non-batch dim), float32."""
    d = (a.float() - b.float()) ** 2
    return d.flatten(1).mean(dim=1)


def _need_keep(batch: Batch, who: str) -> Part:
    if batch.preserve is None:
        raise ValueError(f"{who} needs a keep set: build the task with keep latents/images "
                         "(DataTask(forget, keep, ...))")
    return batch.preserve


def _coeffs64(batch: Batch, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(alpha_t, sigma_t)`` as ``[B, 1, ..., 1]`` in float64 on ``like``'s device."""
    return batch.process.coeffs(t, like.double())


def trainable_leaves(*roots: Tensor) -> list[Tensor]:
    """Leaf tensors requiring grad that ``roots`` depend on (the adapter's parameters), found by
    walking the autograd graph; deterministic order, no duplicates."""
    out: dict[int, Tensor] = {}
    seen: set[int] = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)  # AccumulateGrad nodes hold the leaf
        if isinstance(var, Tensor) and var.requires_grad:
            out.setdefault(id(var), var)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return list(out.values())


def _grads(loss: Tensor, params: list[Tensor], retain: bool, scale: float = 1.0) -> list[Tensor]:
    """Gradients of ``loss`` w.r.t. ``params``, back-propagated at ``scale`` (fp16 loss scaling,
    so small gradients do not underflow inside the network) and divided by it in float32."""
    gs = torch.autograd.grad(loss * scale if scale != 1.0 else loss, params, retain_graph=retain,
                             allow_unused=True)
    return [torch.zeros_like(p) if g is None else (g.float() / scale if scale != 1.0 else g)
            for p, g in zip(params, gs)]


def _norm(gs: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((g.double() ** 2).sum() for g in gs))


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def with_gradient(value: Tensor, params: list[Tensor], grads: list[Tensor]) -> Tensor:
    """A scalar equal to ``value`` whose gradient w.r.t. ``params`` is exactly ``grads``.

    How objectives that combine per-term gradients (SISS's forget-gradient normalisation,
    EraseDiff's dynamic weight) hand one ordinary loss to the loop: the loop's ``backward()``
    then costs nothing more (no second pass through the UNet)."""
    lin = sum((p * g.detach().to(p.dtype)).sum() for p, g in zip(params, grads))
    return value.detach().float() + (lin - lin.detach()).float()


def _f(x: Tensor) -> float:
    """A loss value for the logs (detached: no autograd warning)."""
    return float(x.detach())


def _same_ctx(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


# ---------------------------------------------------------------------------------------------
# Concept unlearning: SalUn, ESD
# ---------------------------------------------------------------------------------------------

class SalUnRL:
    """SalUn's random-label objective for diffusion (Fan et al., ICLR 2024, eq. for DDPM/SD):

    ``L = ||s(x_f, t, c) - sg[e(x_f, t, c')]||^2 + alpha * ||s(x_r, t, c_r) - noise_r||^2``

    - forget term: the student's prediction on forget latents ``x_f`` (noised concept latents)
      under the concept context ``c`` is pulled to the prediction under another label ``c'``;
    - retain term: the ordinary denoising loss (MSE to the true noise) on preserved latents.

    Args:
        alpha: retain weight. Default 0.5, the SalUn Stable Diffusion command
            (``random_label.py --alpha 0.5``; mean-reduced MSE as here). Their CIFAR DDPM run uses
            1e-3 with a pixel-summed MSE, i.e. about 3 in mean-MSE units.
        label: which ``c'``: ``"surrogate"`` (``batch.surrogate_ctx``, SalUn's code uses one fixed
            other class) or ``"random"`` (one random preserved prompt per sample, the paper's
            random label; needs preserved prompts). A batch builder may also give
            ``extras["random_ctx"]`` ``[B, L, D]``, which then wins.
        target_model: ``"teacher"`` (frozen original, no grad; default) or ``"student"`` (the
            model being trained, detached, as in SalUn's code).
    """

    name = "salun_rl"

    def __init__(self, alpha: float = 0.5, label: str = "surrogate",
                 target_model: str = "teacher") -> None:
        if label not in ("surrogate", "random"):
            raise ValueError(f"label must be 'surrogate' or 'random', got {label!r}")
        if target_model not in ("teacher", "student"):
            raise ValueError(f"target_model must be 'teacher' or 'student', got {target_model!r}")
        if not alpha >= 0:
            raise ValueError(f"alpha (retain weight) must be >= 0, got {alpha}")
        self.alpha, self.label, self.target_model = float(alpha), label, target_model

    def other_ctx(self, batch: Batch) -> Tensor:
        f = batch.forget
        if batch.extras and batch.extras.get("random_ctx") is not None:
            return batch.extras["random_ctx"]
        if self.label == "random":
            if batch.preserve is None:
                raise ValueError("salun_rl label='random' draws the other label from the preserved "
                                 "prompts: give preserve prompts, or use label='surrogate'")
            p = batch.preserve.ctx
            return p[torch.arange(len(f), device=p.device) % p.shape[0]]
        return batch.surrogate_ctx

    def __call__(self, student: EpsFn, teacher: EpsFn, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        f, p = batch.forget, batch.preserve
        nf = len(f)
        other = self.other_ctx(batch)
        if p is None:
            s_f, s_p = student(f.x_t, f.t, f.ctx), None
        else:
            s = student(_cat(f.x_t, p.x_t), _cat(f.t, p.t), _cat(f.ctx, p.ctx))
            s_f, s_p = s[:nf], s[nf:]
        if self.target_model == "teacher":
            target = teacher(f.x_t, f.t, other)
        else:
            with torch.no_grad():
                target = student(f.x_t, f.t, other).detach()
        lf = mse(s_f, target)
        if s_p is None:
            return lf, {"forget": _f(lf)}
        lr = mse(s_p, p.target)
        return lf + self.alpha * lr, {"forget": _f(lf), "retain": _f(lr)}


class ESD:
    """ESD (Gandikota et al., ICCV 2023): negative guidance from the frozen model as the target,

    ``target = e(x_t, t, "") - eta * (e(x_t, t, c) - e(x_t, t, ""))``,
    ``L = ||s(x_t, t, c) - target||^2`` (+ optional ``preserve_weight * ||s(x_p) - e(x_p)||^2``).

    ``eta`` default 1.0 (ESD's ``negative_guidance``). ESD itself has no preserve term
    (``preserve_weight=0``). Which weights train (ESD-x: cross-attention, ESD-u: the rest) is the
    adapter's choice: :func:`spare_core.esd.esd_modules`.

    ``x_t`` is whatever the task gives: with ``ConceptTask`` the frozen model's concept samples
    (DDIM, guidance 3 as ESD's ``start_guidance``) noised to t. ESD's code instead denoises with
    the model being edited down to t, so its ``x_t`` drift with the edit; the two agree at the
    start of training.
    """

    name = "esd"

    uses_surrogate = False  # the target pushes away from the concept, towards no prompt

    def __init__(self, eta: float = 1.0, preserve_weight: float = 0.0) -> None:
        if not eta >= 0:
            raise ValueError(f"eta (negative guidance) must be >= 0, got {eta}")
        self.eta, self.wp = float(eta), float(preserve_weight)

    @property
    def uses_preserve(self) -> bool:
        return self.wp > 0.0

    def target(self, teacher: EpsFn, batch: Batch) -> Tensor:
        f = batch.forget
        u = batch.uncond_ctx.expand(len(f), -1, -1)
        e = teacher(_cat(f.x_t, f.x_t), _cat(f.t, f.t), _cat(u, f.ctx))
        e_u, e_c = e.chunk(2)
        return e_u - self.eta * (e_c - e_u)

    def __call__(self, student: EpsFn, teacher: EpsFn, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        f, p = batch.forget, batch.preserve
        target = self.target(teacher, batch)
        if self.wp == 0.0 or p is None:
            lf = mse(student(f.x_t, f.t, f.ctx), target)
            return lf, {"forget": _f(lf)}
        nf = len(f)
        s = student(_cat(f.x_t, p.x_t), _cat(f.t, p.t), _cat(f.ctx, p.ctx))
        lf = mse(s[:nf], target)
        lp = mse(s[nf:], teacher(p.x_t, p.t, p.ctx))
        return lf + self.wp * lp, {"forget": _f(lf), "preserve": _f(lp)}


# ---------------------------------------------------------------------------------------------
# Data unlearning: SISS, NegGrad, EraseDiff, naive deletion
# ---------------------------------------------------------------------------------------------

def siss_log_weights(m_t: Tensor, x0: Tensor, a0: Tensor, alpha: Tensor, sigma: Tensor,
                     lam: float) -> tuple[Tensor, Tensor]:
    """Log importance weights of SISS, per sample, float64.

    ``q(m|x) = N(m; alpha x, sigma^2 I)`` (VP: ``alpha = sqrt(ab)``, ``sigma = sqrt(1 - ab)``;
    flow: ``1 - s``, ``s``), ``q_lam(m) = (1 - lam) q(m|x) + lam q(m|a)``;
    returns ``log q(m|x)/q_lam(m)`` and ``log q(m|a)/q_lam(m)`` (``[B]`` each). The Gaussians'
    normalising constants are equal and cancel; the mixture is a log-sum-exp, so nothing
    overflows however far apart ``x`` and ``a`` are.

    Args:
        m_t, x0, a0: ``[B, ...]``; alpha, sigma: ``[B]`` or broadcastable ``[B, 1, ..]``.
    """
    if not 0.0 < lam < 1.0:
        raise ValueError(f"SISS mixture lambda must be in (0, 1), got {lam}")
    m, x, a = m_t.double(), x0.double(), a0.double()
    al = alpha.double().reshape(-1, *([1] * (m.dim() - 1)))
    var = (sigma.double().flatten()) ** 2
    lq_x = -((m - al * x) ** 2).flatten(1).sum(1) / (2 * var)
    lq_a = -((m - al * a) ** 2).flatten(1).sum(1) / (2 * var)
    lq_mix = torch.logsumexp(torch.stack([lq_x + math.log(1 - lam), lq_a + math.log(lam)]), dim=0)
    return lq_x - lq_mix, lq_a - lq_mix


class SISS:
    """SISS (Alberti et al., ICLR 2025, "Data Unlearning in Diffusion Models").

    ``m_t ~ q_lam = (1 - lam) q(m_t|x) + lam q(m_t|a)``, x from the keep set X, a from the forget
    set A (a pair shares its noise and t; the batch builder draws the mixture: ``DataTask``).
    With ``eps_x = (m_t - alpha x) / sigma``, ``y_x`` the training target of ``(x, eps_x)`` (the
    noise ``eps_x`` itself for VP models, ``eps_x - x`` for flow) and ``y_a`` likewise,

    ``L_x = mean_i w_x,i ||s(m_t,i) - y_x,i||^2``,  ``L_a = mean_i w_a,i ||s(m_t,i) - y_a,i||^2``,
    ``w_x = q(m_t|x) / q_lam(m_t)``, ``w_a = q(m_t|a) / q_lam(m_t)`` (closed form, log space:
    :func:`siss_log_weights`); squared norms are means over elements (the repo sums them, a
    constant factor absorbed by the normalisation below).

    The update descends ``L_x`` and ascends ``L_a``. How the forget term is scaled (``normalize``):

    - ``"relative"`` (default): the forget gradient is rescaled every step to
      ``forget_scale * ||grad L_x||``; gradient ``= g_x - forget_scale * ||g_x|| * g_a / ||g_a||``.
      The SISS code always rescales ``g_a`` to a fixed norm (``scaling_norm``) and its README
      recommends tuning that norm to 10% of the naive-deletion term's gradient norm; the relative
      mode applies that 10% per step, so no model-specific tuning is needed. Default 0.1.
    - ``"absolute"``: the SISS code's rule as written: ``||forget gradient|| = forget_scale``
      (their ``scaling_norm``), measured in the units of their loss, which sums each sample's
      squared error over its elements where this one averages them: the coefficient is divided
      by the element count, so a ``scaling_norm`` of their configs (5 for the 28x28 MNIST
      T-shirt, 500 for CelebA-HQ) means here what it means there.
    - ``"none"``: plain ``L = L_x - forget_scale * L_a`` (the paper's superfactor s scaling
      the subtracted term), no gradient surgery.

    The keep term's constant ``n/(n-k)`` of the paper disappears because x is drawn from the
    keep set (as in the SISS code); the loop's global clip (``max_grad_norm``) is then applied, as
    in the SISS code (clip 1.0). With ``grad_accum > 1`` the normalisation is per micro-batch.
    Context: if a pair's keep and forget contexts differ (prompted data), ``s`` is evaluated
    under each (one batched call of 2B), so each term stays an unbiased importance-sampled
    estimate; with equal contexts (unconditional) one call of B.
    """

    name = "siss"

    def __init__(self, forget_scale: float = 0.1, normalize: str = "relative") -> None:
        if normalize not in ("relative", "absolute", "none"):
            raise ValueError(f"normalize must be 'relative', 'absolute' or 'none', got {normalize!r}")
        if not forget_scale >= 0:
            raise ValueError(f"forget_scale must be >= 0, got {forget_scale}")
        self.s, self.normalize = float(forget_scale), normalize

    def terms(self, student: EpsFn, batch: Batch) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Importance-weighted ``L_x`` and ``L_a`` (with grad) and logs."""
        k = _need_keep(batch, "siss")
        f = batch.forget
        ex = batch.extras or {}
        if "mixture_x_t" not in ex or "mixture_lambda" not in ex:
            raise ValueError("siss needs the mixture sample m_t ~ q_lambda in batch.extras "
                             "('mixture_x_t', 'mixture_lambda'): use spare_core.data_task.DataTask")
        if not torch.equal(k.t, f.t):
            raise ValueError("siss pairs a keep and a forget sample at the same timestep")
        m, lam = ex["mixture_x_t"], float(ex["mixture_lambda"])
        al, sg = _coeffs64(batch, k.t, m)
        log_wx, log_wa = siss_log_weights(m, k.x0, f.x0, al, sg, lam)
        w_x, w_a = log_wx.exp().float(), log_wa.exp().float()
        md = m.double()
        eps_x = ((md - al * k.x0.double()) / sg).float()
        eps_a = ((md - al * f.x0.double()) / sg).float()
        y_x, y_a = batch.process.target(k.x0, eps_x), batch.process.target(f.x0, eps_a)
        if _same_ctx(k.ctx, f.ctx):
            s_x = s_a = student(m, k.t, k.ctx)
        else:
            s = student(_cat(m, m), _cat(k.t, f.t), _cat(k.ctx, f.ctx))
            s_x, s_a = s.chunk(2)
        l_x = (w_x * per_sample_mse(s_x, y_x)).mean()
        l_a = (w_a * per_sample_mse(s_a, y_a)).mean()
        logs = {"keep": _f(l_x), "forget": _f(l_a), "w_keep": float(w_x.mean()),
                "w_forget": float(w_a.mean())}
        return l_x, l_a, logs

    def __call__(self, student: EpsFn, teacher: EpsFn, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        l_x, l_a, logs = self.terms(student, batch)
        if self.normalize == "none" or self.s == 0.0:
            logs["forget_coef"] = self.s
            return l_x - self.s * l_a, logs
        params = batch.params or trainable_leaves(l_x, l_a)
        g_x = _grads(l_x, params, retain=True, scale=batch.loss_scale)
        g_a = _grads(l_a, params, retain=False, scale=batch.loss_scale)
        n_x, n_a = _norm(g_x), _norm(g_a)
        if self.normalize == "relative":
            target = self.s * n_x
        else:  # scaling_norm bounds the gradient of per-sample sums: divide by the element count
            target = torch.tensor(self.s / batch.forget.x0[0].numel(), dtype=torch.float64)
        coef = (target / n_a) if float(n_a) > 0 else torch.zeros((), dtype=torch.float64)
        c = float(coef)
        grads = [gx - c * ga for gx, ga in zip(g_x, g_a)]
        logs.update(forget_coef=c, grad_keep=float(n_x), grad_forget=float(n_a))
        return with_gradient(l_x - c * l_a, params, grads), logs


class NegGrad:
    """NegGrad: gradient ascent on the forget set's denoising loss,
    ``L = -scale * ||s(a_t, t, c_a) - target||^2`` (``scale`` = the SISS code's ``superfactor``,
    default 1). Unbounded below: rely on the step budget and the loop's gradient clip."""

    name = "neggrad"

    def __init__(self, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def __call__(self, student: EpsFn, teacher: EpsFn, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        f = batch.forget
        la = mse(student(f.x_t, f.t, f.ctx), f.target)
        return -self.scale * la, {"forget": _f(la)}


class NaiveDeletion:
    """Naive deletion: fine-tune on the keep set only, ``L = ||s(x_t, t, c_x) - target||^2``."""

    name = "naive_deletion"

    def __call__(self, student: EpsFn, teacher: EpsFn, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        k = _need_keep(batch, "naive_deletion")
        lx = mse(student(k.x_t, k.t, k.ctx), k.target)
        return lx, {"keep": _f(lx)}


class EraseDiff:
    """EraseDiff (Wu et al., 2024, "Erasing Undesirable Influence in Diffusion Models"), first-order.

    Keep term ``L_r = ||s(x_t, t, c_x) - target||^2``. Forget term: the forget image is noised with
    uniform noise ``u ~ U[0, 1)`` and the model is trained to predict that ``u``:
    ``L_f = ||s(alpha a + sigma u, t, c_a) - y(a, u)||^2`` with ``y`` the family's target (``u``
    for VP, as the authors' DDPM code; ``u - a`` for flow); ``u`` comes from
    ``batch.extras['uniform_noise']``, drawn by ``DataTask``.

    The paper's bi-level problem ``min L_r s.t. theta in argmin L_f`` is solved with BOME:
    ``L = L_r + lam * (L_f(theta) - L_f(theta_K))`` where ``theta_K`` comes from K inner descent
    steps on ``L_f`` and is held constant. Since ``L_f(theta_K)`` is a detached constant it does not
    change the gradient, so the simple first-order form used here drops the inner loop:
    gradient ``= grad L_r + lam * grad L_f``. ``lam`` is fixed (``lambda_=0.1``, the authors'
    ``lambda_bome`` default) or, with ``dynamic=True``, their dynamic rule
    ``lam = max(eta - cos(grad L_r, grad L_f), 0)`` with ``eta=0.1`` (``eta_bome``).
    """

    name = "erasediff"

    def __init__(self, lambda_: float = 0.1, eta: float = 0.1, dynamic: bool = False) -> None:
        if not lambda_ >= 0:
            raise ValueError(f"lambda_ must be >= 0, got {lambda_}")
        self.lam, self.eta, self.dynamic = float(lambda_), float(eta), bool(dynamic)

    def __call__(self, student: EpsFn, teacher: EpsFn, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        k = _need_keep(batch, "erasediff")
        f = batch.forget
        ex = batch.extras or {}
        u = ex.get("uniform_noise")
        if u is None:
            raise ValueError("erasediff needs batch.extras['uniform_noise'] (uniform noise for the "
                             "forget set): use spare_core.data_task.DataTask")
        al, sg = _coeffs64(batch, f.t, f.x0)
        a_u = (al * f.x0.double() + sg * u.double()).to(f.x0.dtype)
        nk = len(k)
        s = student(_cat(k.x_t, a_u), _cat(k.t, f.t), _cat(k.ctx, f.ctx))
        l_r, l_f = mse(s[:nk], k.target), mse(s[nk:], batch.process.target(f.x0, u))
        logs = {"keep": _f(l_r), "forget": _f(l_f)}
        if not self.dynamic:
            logs["lambda"] = self.lam
            return l_r + self.lam * l_f, logs
        params = batch.params or trainable_leaves(l_r, l_f)
        g_r = _grads(l_r, params, retain=True, scale=batch.loss_scale)
        g_f = _grads(l_f, params, retain=False, scale=batch.loss_scale)
        n_r, n_f = _norm(g_r), _norm(g_f)
        cos = float(_dot(g_r, g_f) / (n_r * n_f + 1e-8))
        lam = max(self.eta - cos, 0.0) if float(n_f) > 0 else 0.0
        logs.update({"lambda": lam, "cos": cos})
        grads = [a + lam * b for a, b in zip(g_r, g_f)]
        return with_gradient(l_r + lam * l_f, params, grads), logs


OBJECTIVES: dict[str, type] = {
    "self_distill": SelfDistill,
    "salun_rl": SalUnRL,
    "esd": ESD,
    "siss": SISS,
    "neggrad": NegGrad,
    "erasediff": EraseDiff,
    "naive_deletion": NaiveDeletion,
}


def make_objective(name: str, **kwargs) -> Objective:
    """Objective by registry name; kwargs go to its constructor."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)
