"""Every objective's loss (and, where it manipulates gradients, its gradient) on small hand-built
batches equals the formula written out by hand here, with fake student/teacher functions."""
import math

import pytest
import torch

from spare_core.objectives import (ESD, OBJECTIVES, SISS, Batch, EraseDiff, NaiveDeletion,
                                   NegGrad, Part, SalUnRL, SelfDistill, make_objective,
                                   siss_log_weights, trainable_leaves, with_gradient)

B, C, H, W, L, D = 3, 1, 2, 2, 2, 3
AC = torch.linspace(0.99, 0.02, 10)  # a made-up schedule alphas_cumprod [T=10]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _part(g, t=None, x0=None, noise=None):
    x0 = torch.randn(B, C, H, W, generator=g) if x0 is None else x0
    noise = torch.randn(B, C, H, W, generator=g) if noise is None else noise
    t = torch.tensor([1, 4, 8]) if t is None else t
    a = AC[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return Part(x0, noise, t, x_t, torch.randn(B, L, D, generator=g))


class Fake:
    """eps(x, t, c) = th0 * x + th1 + mean(c): linear in two parameters, so gradients are
    written by hand below. The context matters (its mean is added)."""

    def __init__(self, th0=0.7, th1=-0.2, grad=True):
        self.theta = torch.tensor([th0, th1], requires_grad=grad)

    def __call__(self, x, t, c):
        return self.theta[0] * x + self.theta[1] + c.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    def plain(self, x, c):  # the same function without autograd, for the hand computations
        th = self.theta.detach()
        return th[0] * x + th[1] + c.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def _teacher():
    f = Fake(0.5, 0.1, grad=False)
    return lambda x, t, c: f(x, t, c).detach()


def _msq(a, b):  # mean over all elements, by hand
    return float(((a - b) ** 2).sum() / a.numel())


# ---------------------------------------------------------------------------------------------
def test_registry_has_every_objective():
    assert {"self_distill", "salun_rl", "esd", "siss", "neggrad", "erasediff",
            "naive_deletion"} <= set(OBJECTIVES)
    for name, cls in OBJECTIVES.items():
        assert cls.name == name
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("nope")


@pytest.mark.parametrize("label", ["surrogate", "random"])
def test_salun_rl_equals_formula(label):
    g = _gen(1)
    f, p = _part(g), _part(g, t=torch.tensor([2, 3, 9]))
    sur = torch.randn(B, L, D, generator=g)
    batch = Batch(f, p, sur, torch.zeros(1, L, D), AC)
    st, te = Fake(), _teacher()
    loss, logs = SalUnRL(alpha=0.3, label=label)(st, te, batch)
    other = sur if label == "surrogate" else p.ctx
    tfn = Fake(0.5, 0.1, grad=False)
    lf = _msq(st.plain(f.x_t, f.ctx), tfn.plain(f.x_t, other))
    lr = _msq(st.plain(p.x_t, p.ctx), p.noise)
    assert loss.item() == pytest.approx(lf + 0.3 * lr, rel=1e-5)
    assert logs["forget"] == pytest.approx(lf, rel=1e-5) and logs["retain"] == pytest.approx(lr, rel=1e-5)


def test_salun_rl_student_target_is_detached():
    g = _gen(2)
    f = _part(g)
    sur = torch.randn(B, L, D, generator=g)
    batch = Batch(f, None, sur, torch.zeros(1, L, D), AC)
    st = Fake()
    loss, _ = SalUnRL(target_model="student")(st, _teacher(), batch)
    loss.backward()
    # d/dth of mean((s(x,c) - sg[s(x,c')])^2): only the first prediction carries gradient
    diff = st.plain(f.x_t, f.ctx) - st.plain(f.x_t, sur)
    n = diff.numel()
    g0 = float((2 * diff * f.x_t).sum() / n)
    g1 = float((2 * diff).sum() / n)
    assert st.theta.grad.tolist() == pytest.approx([g0, g1], rel=1e-5)


def test_salun_random_label_needs_preserve():
    g = _gen(3)
    batch = Batch(_part(g), None, torch.zeros(B, L, D), torch.zeros(1, L, D), AC)
    with pytest.raises(ValueError, match="preserve"):
        SalUnRL(label="random")(Fake(), _teacher(), batch)


@pytest.mark.parametrize("eta", [1.0, 2.5])
def test_esd_equals_formula(eta):
    g = _gen(4)
    f, p = _part(g), _part(g)
    unc = torch.randn(1, L, D, generator=g)
    batch = Batch(f, p, torch.zeros(B, L, D), unc, AC)
    st, tfn = Fake(), Fake(0.5, 0.1, grad=False)
    e_u = tfn.plain(f.x_t, unc.expand(B, -1, -1))
    e_c = tfn.plain(f.x_t, f.ctx)
    target = e_u - eta * (e_c - e_u)
    loss, _ = ESD(eta=eta)(st, _teacher(), batch)
    assert loss.item() == pytest.approx(_msq(st.plain(f.x_t, f.ctx), target), rel=1e-5)
    # with a preserve term: + w * ||s(x_p, p) - T(x_p, p)||^2
    loss2, logs = ESD(eta=eta, preserve_weight=0.5)(st, _teacher(), batch)
    lp = _msq(st.plain(p.x_t, p.ctx), tfn.plain(p.x_t, p.ctx))
    assert loss2.item() == pytest.approx(_msq(st.plain(f.x_t, f.ctx), target) + 0.5 * lp, rel=1e-5)


# ---- SISS ------------------------------------------------------------------------------------
def _gauss_pdf(m, mean, var):
    """Density of N(mean, var I) at m, per sample, from the textbook formula (float64)."""
    d = m[0].numel()
    sq = ((m - mean) ** 2).flatten(1).sum(1)
    return torch.exp(-sq / (2 * var)) / (2 * math.pi * var) ** (d / 2)


def _siss_batch(lam=0.5, seed=5, same_ctx=True, t=None):
    g = _gen(seed)
    t = torch.tensor([6, 7, 9]) if t is None else t
    noise = torch.randn(B, C, H, W, generator=g)
    k = _part(g, t=t, noise=noise)
    f = _part(g, t=t, noise=noise)
    if same_ctx:
        f.ctx = k.ctx.clone()
    from_a = torch.tensor([True, False, True])
    m = torch.where(from_a.view(-1, 1, 1, 1), f.x_t, k.x_t)
    extras = {"mixture_x_t": m, "mixture_lambda": lam, "mixture_from_forget": from_a}
    return Batch(f, k, torch.zeros(B, L, D), torch.zeros(1, L, D), AC, extras)


def _siss_by_hand(batch, st, lam):
    k, f = batch.preserve, batch.forget
    m = batch.extras["mixture_x_t"].double()
    ab = AC[k.t].double().view(-1, 1, 1, 1)
    var = (1 - ab).flatten()
    q_x = _gauss_pdf(m, ab.sqrt() * k.x0.double(), var)
    q_a = _gauss_pdf(m, ab.sqrt() * f.x0.double(), var)
    q_mix = (1 - lam) * q_x + lam * q_a
    w_x, w_a = q_x / q_mix, q_a / q_mix
    eps_x = (m - ab.sqrt() * k.x0.double()) / (1 - ab).sqrt()
    eps_a = (m - ab.sqrt() * f.x0.double()) / (1 - ab).sqrt()
    s_x = st.plain(m.float(), k.ctx).double()
    s_a = st.plain(m.float(), f.ctx).double()
    n = m[0].numel()
    r_x, r_a = s_x - eps_x, s_a - eps_a
    l_x = float((w_x * (r_x ** 2).flatten(1).sum(1) / n).mean())
    l_a = float((w_a * (r_a ** 2).flatten(1).sum(1) / n).mean())
    # gradients of l_x, l_a w.r.t. (th0, th1): d s / d th0 = m, d s / d th1 = 1
    def grad(w, r):
        g0 = (w * (2 * r * m).flatten(1).sum(1) / n).mean()
        g1 = (w * (2 * r).flatten(1).sum(1) / n).mean()
        return torch.stack([g0, g1])
    return w_x, w_a, l_x, l_a, grad(w_x, r_x), grad(w_a, r_a)


@pytest.mark.parametrize("lam", [0.5, 0.2])
def test_siss_weights_match_gaussian_densities(lam):
    batch = _siss_batch(lam)
    k, f = batch.preserve, batch.forget
    w_x, w_a, *_ = _siss_by_hand(batch, Fake(), lam)
    lw_x, lw_a = siss_log_weights(batch.extras["mixture_x_t"], k.x0, f.x0, AC[k.t].double().sqrt(),
                                  (1 - AC[k.t].double()).sqrt(), lam)
    assert torch.allclose(lw_x.exp(), w_x, rtol=1e-9)
    assert torch.allclose(lw_a.exp(), w_a, rtol=1e-9)
    # the mixture identity (1 - lam) w_x + lam w_a = 1 holds for every sample
    assert torch.allclose((1 - lam) * lw_x.exp() + lam * lw_a.exp(), torch.ones(B, dtype=torch.float64))


def test_siss_weights_stay_finite_far_apart():
    # x and a 100 apart at t with alpha_bar 0.99: the densities underflow in float64, the log
    # space does not: the weights are exactly 1/(1-lam) and 0 (or 0 and 1/lam)
    x = torch.zeros(2, 1, 4, 4)
    a = torch.full((2, 1, 4, 4), 100.0)
    ab = torch.tensor([0.99, 0.99])
    m = torch.stack([x[0] * 0.99 ** 0.5, a[1] * 0.99 ** 0.5])
    lw_x, lw_a = siss_log_weights(m, x, a, ab.sqrt(), (1 - ab).sqrt(), 0.5)
    w_x, w_a = lw_x.exp(), lw_a.exp()
    assert torch.isfinite(w_x).all() and torch.isfinite(w_a).all()
    assert w_x.tolist() == pytest.approx([2.0, 0.0]) and w_a.tolist() == pytest.approx([0.0, 2.0])
    with pytest.raises(ValueError, match="lambda"):
        siss_log_weights(m, x, a, ab.sqrt(), (1 - ab).sqrt(), 1.0)


def test_siss_plain_loss_equals_formula():
    lam, s = 0.5, 0.3
    batch = _siss_batch(lam)
    st = Fake()
    _, _, l_x, l_a, _, _ = _siss_by_hand(batch, st, lam)
    loss, logs = SISS(forget_scale=s, normalize="none")(st, None, batch)
    assert loss.item() == pytest.approx(l_x - s * l_a, rel=1e-5)
    assert logs["keep"] == pytest.approx(l_x, rel=1e-5) and logs["forget"] == pytest.approx(l_a, rel=1e-5)


@pytest.mark.parametrize("same_ctx", [True, False])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_siss_normalised_forget_gradient(mode, same_ctx):
    lam, s = 0.5, 0.1
    batch = _siss_batch(lam, seed=6, same_ctx=same_ctx)
    st = Fake()
    _, _, l_x, l_a, g_x, g_a = _siss_by_hand(batch, st, lam)
    loss, logs = SISS(forget_scale=s, normalize=mode)(st, None, batch)
    # absolute: scaling_norm is a norm in the SISS code's units (per-sample sums over the C*H*W
    # elements), so in this loss's (per-sample means) it is s / (C*H*W)
    target_norm = (s * g_x.norm() if mode == "relative"
                   else torch.tensor(s / (C * H * W), dtype=torch.float64))
    coef = float(target_norm / g_a.norm())
    assert loss.item() == pytest.approx(l_x - coef * l_a, rel=1e-5)
    loss.backward()
    want = g_x - coef * g_a  # keep gradient minus the forget gradient rescaled to the set norm
    assert st.theta.grad.double().tolist() == pytest.approx(want.tolist(), rel=1e-4, abs=1e-7)
    assert (coef * g_a).norm().item() == pytest.approx(float(target_norm), rel=1e-6)
    assert logs["forget_coef"] == pytest.approx(coef, rel=1e-6)


def test_siss_absolute_is_the_authors_scaling_norm():
    """A transcription of the SISS code's update (losses/ddpm_deletion_loss.py and
    delete_tshirt.py: per-sample sums over elements, mean over the batch, then
    ``grad = g_x - scaling_norm * g_a / |g_a|``) equals this objective's gradient times the
    element count: the same direction and the same forget/keep balance for the same
    ``scaling_norm`` (before, the forget term came out C*H*W times too strong)."""
    lam, norm = 0.5, 5.0
    batch = _siss_batch(lam, seed=9, t=torch.tensor([2, 5, 8]))
    st = Fake()
    _, _, _, _, g_x, g_a = _siss_by_hand(batch, st, lam)
    n = C * H * W
    g_x_sum, g_a_sum = n * g_x, n * g_a  # their loss sums the squared error over elements
    theirs = g_x_sum - norm * g_a_sum / g_a_sum.norm()
    loss, _ = SISS(forget_scale=norm, normalize="absolute")(st, None, batch)
    loss.backward()
    assert (n * st.theta.grad.double()).tolist() == pytest.approx(theirs.tolist(), rel=1e-4)


def test_siss_takes_normalize_none_as_parsed_from_the_command_line():
    from spare_core.methods import METHODS, parse_options

    hp = METHODS["siss"].hparams
    opts = parse_options(["normalize=none", "lora_alpha=none", "forget_scale=0.2"], "--param", hp)
    assert opts == {"normalize": "none", "lora_alpha": None, "forget_scale": 0.2}
    assert SISS(normalize=opts["normalize"]).normalize == "none"


def test_siss_needs_the_mixture():
    batch = _siss_batch()
    batch.extras = None
    with pytest.raises(ValueError, match="DataTask"):
        SISS()(Fake(), None, batch)


# ---- NegGrad, naive deletion, EraseDiff ------------------------------------------------------
def test_neggrad_and_naive_deletion_equal_formula():
    g = _gen(7)
    f, k = _part(g), _part(g)
    batch = Batch(f, k, torch.zeros(B, L, D), torch.zeros(1, L, D), AC)
    st = Fake()
    loss, _ = NegGrad(scale=2.0)(st, None, batch)
    assert loss.item() == pytest.approx(-2.0 * _msq(st.plain(f.x_t, f.ctx), f.noise), rel=1e-5)
    loss, _ = NaiveDeletion()(st, None, batch)
    assert loss.item() == pytest.approx(_msq(st.plain(k.x_t, k.ctx), k.noise), rel=1e-5)
    with pytest.raises(ValueError, match="keep"):
        NaiveDeletion()(st, None, Batch(f, None, torch.zeros(B, L, D), torch.zeros(1, L, D), AC))


def _erasediff_by_hand(batch, st):
    k, f = batch.preserve, batch.forget
    u = batch.extras["uniform_noise"]
    ab = AC[f.t].view(-1, 1, 1, 1)
    a_u = ab.sqrt() * f.x0 + (1 - ab).sqrt() * u  # forget image noised with the uniform noise
    r_r = st.plain(k.x_t, k.ctx) - k.noise
    r_f = st.plain(a_u, f.ctx) - u
    n = r_r.numel()
    g_r = torch.tensor([float((2 * r_r * k.x_t).sum() / n), float((2 * r_r).sum() / n)])
    g_f = torch.tensor([float((2 * r_f * a_u).sum() / n), float((2 * r_f).sum() / n)])
    return float((r_r ** 2).sum() / n), float((r_f ** 2).sum() / n), g_r, g_f


def test_erasediff_equals_formula():
    g = _gen(8)
    f, k = _part(g), _part(g)
    u = torch.rand(B, C, H, W, generator=g)
    batch = Batch(f, k, torch.zeros(B, L, D), torch.zeros(1, L, D), AC, {"uniform_noise": u})
    st = Fake()
    l_r, l_f, g_r, g_f = _erasediff_by_hand(batch, st)
    loss, logs = EraseDiff(lambda_=0.1)(st, None, batch)
    assert loss.item() == pytest.approx(l_r + 0.1 * l_f, rel=1e-5)
    # dynamic (BOME) weight: lam = max(eta - cos(g_r, g_f), 0), gradient g_r + lam g_f
    st2 = Fake()
    eta = 0.9
    cos = float(g_r @ g_f / (g_r.norm() * g_f.norm()))
    lam = max(eta - cos, 0.0)
    loss, logs = EraseDiff(eta=eta, dynamic=True)(st2, None, batch)
    assert logs["lambda"] == pytest.approx(lam, rel=1e-5, abs=1e-7)
    assert loss.item() == pytest.approx(l_r + lam * l_f, rel=1e-5)
    loss.backward()
    assert st2.theta.grad.tolist() == pytest.approx((g_r + lam * g_f).tolist(), rel=1e-4)


# ---- gradient plumbing -----------------------------------------------------------------------
def test_with_gradient_and_leaf_discovery():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    frozen = torch.tensor(5.0)
    y = (a * b).sum() + frozen
    leaves = trainable_leaves(y)
    assert {id(x) for x in leaves} == {id(a), id(b)}
    wanted = [torch.full_like(x, 7.0) for x in leaves]
    z = with_gradient(y, leaves, wanted)
    assert z.item() == pytest.approx(y.item())
    z.backward()
    assert a.grad.tolist() == [7.0, 7.0] and b.grad.item() == 7.0


@pytest.mark.parametrize("cls,kw", [(SalUnRL, {"label": "x"}), (SalUnRL, {"target_model": "x"}),
                                    (SISS, {"normalize": "x"}), (SISS, {"forget_scale": -1}),
                                    (NegGrad, {"scale": 0}), (ESD, {"eta": -1})])
def test_bad_options_are_refused(cls, kw):
    with pytest.raises(ValueError):
        cls(**kw)


# ---- SelfDistill (SPARE stage 2) -------------------------------------------------------------
class _Recording:
    """Wraps a Fake and records the contexts each call got (to check which network sees which)."""

    def __init__(self, fake, detach=False):
        self.fake, self.detach, self.ctxs = fake, detach, []

    def __call__(self, x, t, c):
        self.ctxs.append(c.detach().clone())
        out = self.fake(x, t, c)
        return out.detach() if self.detach else out


def _seen(rec):
    """Every context row a recorded network got, over all its calls, as one tensor."""
    return torch.cat(rec.ctxs)


@pytest.mark.parametrize("with_preserve", [True, False])
@pytest.mark.parametrize("split", [False, True])
def test_self_distill_equals_formula(with_preserve, split):
    wf, wp = 1.7, 0.4
    g = _gen(9)
    f, p = _part(g), _part(g, t=torch.tensor([2, 5, 7]))
    sur = torch.randn(B, L, D, generator=g)
    batch = Batch(f, p if with_preserve else None, sur, torch.zeros(1, L, D), AC)
    st_fake, te_fake = Fake(), Fake(0.5, 0.1, grad=False)
    st, te = _Recording(st_fake), _Recording(te_fake, detach=True)
    obj = SelfDistill(forget_weight=wf, preserve_weight=wp)
    # wf * ||s(x_f, t_f, c) - T(x_f, t_f, c_sur)||^2 + wp * ||s(x_p, t_p, p) - T(x_p, t_p, p)||^2
    lf = _msq(st_fake.plain(f.x_t, f.ctx), te_fake.plain(f.x_t, sur))
    lp = _msq(st_fake.plain(p.x_t, p.ctx), te_fake.plain(p.x_t, p.ctx))
    want = wf * lf + (wp * lp if with_preserve else 0.0)
    if split:
        pieces = list(obj.parts(st, te, batch))
        assert len(pieces) == (2 if with_preserve else 1)
        assert pieces[0][1] == pytest.approx({"forget": lf}, rel=1e-5)
        assert pieces[0][0].item() == pytest.approx(wf * lf, rel=1e-5)
        if with_preserve:
            assert pieces[1][1] == pytest.approx({"preserve": lp}, rel=1e-5)
            assert pieces[1][0].item() == pytest.approx(wp * lp, rel=1e-5)
        loss = sum(l for l, _ in pieces)
        logs = {k: v for _, lg in pieces for k, v in lg.items()}
    else:
        loss, logs = obj(st, te, batch)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert logs == pytest.approx({"forget": lf, "preserve": lp} if with_preserve else {"forget": lf},
                                 rel=1e-5)
    # the student sees the concept (and preserved) contexts, the teacher the surrogate (and the
    # same preserved) contexts: never the concept
    want_s = torch.cat([f.ctx, p.ctx]) if with_preserve else f.ctx
    want_t = torch.cat([sur, p.ctx]) if with_preserve else sur
    assert torch.equal(_seen(st), want_s) and torch.equal(_seen(te), want_t)
    # gradient by hand: d/dth0 of mean(r^2) = mean(2 r x), d/dth1 = mean(2 r)
    loss.backward()
    r_f = st_fake.plain(f.x_t, f.ctx) - te_fake.plain(f.x_t, sur)
    r_p = st_fake.plain(p.x_t, p.ctx) - te_fake.plain(p.x_t, p.ctx)
    n = r_f.numel()
    g0 = wf * float((2 * r_f * f.x_t).sum() / n)
    g1 = wf * float((2 * r_f).sum() / n)
    if with_preserve:
        g0 += wp * float((2 * r_p * p.x_t).sum() / n)
        g1 += wp * float((2 * r_p).sum() / n)
    assert st_fake.theta.grad.tolist() == pytest.approx([g0, g1], rel=1e-4)


@pytest.mark.parametrize("with_preserve", [True, False])
def test_self_distill_parts_sum_to_the_loss(with_preserve):
    g = _gen(10)
    f, p = _part(g), _part(g, t=torch.tensor([0, 6, 9]))
    batch = Batch(f, p if with_preserve else None, torch.randn(B, L, D, generator=g),
                  torch.zeros(1, L, D), AC)
    obj = SelfDistill(forget_weight=0.6, preserve_weight=2.5)
    st = Fake()
    loss, logs = obj(st, _teacher(), batch)
    pieces = list(obj.parts(st, _teacher(), batch))
    assert sum(l for l, _ in pieces).item() == pytest.approx(loss.item(), rel=1e-6)
    merged = {k: v for _, lg in pieces for k, v in lg.items()}
    assert merged == pytest.approx(logs, rel=1e-6)
    assert set(merged) == ({"forget", "preserve"} if with_preserve else {"forget"})
    # the same gradient, one backward per part or one for the whole loss
    loss.backward()
    whole = st.theta.grad.clone()
    st.theta.grad = None
    for l, _ in obj.parts(st, _teacher(), batch):
        l.backward()
    assert st.theta.grad.tolist() == pytest.approx(whole.tolist(), rel=1e-5)
