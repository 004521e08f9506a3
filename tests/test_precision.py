"""Low-precision training and the memory controls: fp16/bf16 gradients agree with fp32, fp8
storage gets saliency and LoRA training, mixed-dtype pipelines run, and every memory control (unmerged
LoRA, saliency micro-batches and per-module scores, gradient checkpointing, a backward per loss
term) gives the same numbers as the plain path."""
import copy
import os
import platform
import subprocess
import sys

import pytest
import torch

from spare_core import ConceptTask, DiffusersDenoiser, UnlearnConfig, compute_saliency, unlearn
from spare_core.adapter import init_masked_full, init_sparse_lora
from spare_core.families.unet import adaptable_modules
from spare_core.sparse_lora import sparse_lora_from_saliency
from tiny_models import tiny_denoiser


def _sd_latent_denoiser(dtype: torch.dtype, seed: int = 0) -> DiffusersDenoiser:
    """A tiny UNet at SD's latent size (4 x 64 x 64, i.e. 512 px; attention at 32 x 32 to keep it
    fast), weights rounded to fp16 (so every dtype starts from the same numbers), text encoder
    left in float32."""
    from diffusers import UNet2DConditionModel

    base = tiny_denoiser(seed)
    torch.manual_seed(seed)
    cfg = {k: v for k, v in base.unet.config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config({
        **cfg, "sample_size": 64, "block_out_channels": (16, 32),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(p.to(torch.float16).float())  # representable in fp16 and (nearly) bf16
    return DiffusersDenoiser(unet.to(dtype), base.text_encoder, base.tokenizer, base.scheduler)


def _lora_grads(den: DiffusersDenoiser, latents: torch.Tensor, **config) -> dict[str, torch.Tensor]:
    """One SPARE training step's LoRA gradient (unscaled, before the optimizer), float32."""
    names = [n for n in adaptable_modules(den.unet) if "attn" in n or "conv1" in n]
    ad = init_sparse_lora(den.unet, names, rank=2, seed=0)
    with torch.no_grad():
        for n in ad.names:  # B != 0, so A gets a gradient too
            ad[n].lora_B.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    seen = {}

    def keep(step, steps, loss):
        seen.update({k: p.grad.detach().float().clone() for k, p in ad.named_parameters()})

    task = ConceptTask("a cat", "a dog", ["the sea"], concept_latents=latents,
                       preserve_latents=[latents.flip(0)])
    unlearn(den, ad, task, "self_distill",
            UnlearnConfig(steps=1, lr=1e-12, batch_size=2, timestep_sampler="uniform",
                          max_grad_norm=None, **config), progress=keep)
    return seen


def _cosine(a: dict, b: dict) -> float:
    x = torch.cat([a[k].flatten() for k in sorted(a)]).double()
    y = torch.cat([b[k].flatten() for k in sorted(b)]).double()
    return float(x @ y / (x.norm() * y.norm()))


@pytest.fixture(scope="module")
def sd_latents():
    return torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fp32_grads(sd_latents):
    return _lora_grads(_sd_latent_denoiser(torch.float32), sd_latents)


def test_fp16_gradient_matches_fp32_with_loss_scaling(sd_latents, fp32_grads):
    """At SD's latent size the gradient entering the UNet is ~1e-5 per element, below fp16's
    smallest normal: without loss scaling fp16 loses it, with the loop's dynamic scaling the
    LoRA gradient agrees with fp32 to cosine >= 0.999."""
    den = _sd_latent_denoiser(torch.float16)
    assert den.compute_dtype == torch.float16
    scaled = _lora_grads(den, sd_latents)
    assert _cosine(scaled, fp32_grads) >= 0.999
    unscaled = _lora_grads(_sd_latent_denoiser(torch.float16), sd_latents, loss_scaling=False)
    assert _cosine(unscaled, fp32_grads) < 0.999  # what the loss scale is for


def test_bf16_gradient_matches_fp32(sd_latents, fp32_grads):
    """bfloat16 keeps fp32's exponent range (no underflow, no loss scaling) but only 8 bits of
    mantissa: every activation is rounded by up to 2^-9 relative and the errors compound through
    the network and back, ~10x fp16's (measured here: 0.99993 vs fp16's 0.9999993). Tolerance:
    cosine >= 0.999, i.e. a gradient direction off by at most 2.6 degrees, well inside the
    step-to-step noise of a batch of 2."""
    bf16 = _lora_grads(_sd_latent_denoiser(torch.bfloat16), sd_latents)
    assert _cosine(bf16, fp32_grads) >= 0.999


def test_fp8_storage_runs_saliency_and_spare_in_bf16():
    from spare_core import spare_unlearn

    den = tiny_denoiser()
    den.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                      compute_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cannot compute in torch.float8_e4m3fn.*compute_dtype"):
        DiffusersDenoiser(den.unet, den.text_encoder, den.tokenizer, den.scheduler)
    den = DiffusersDenoiser(den.unet, den.text_encoder, den.tokenizer, den.scheduler,
                            compute_dtype=torch.bfloat16)
    # a ranked selection needs weight gradients: taken from the bf16 copies fp8 computes on
    res = spare_unlearn(den, "a cat", "a dog", ["the sea"], steps=2, num_samples=2,
                        sample_steps=2, batch_size=2, timestep_sampler="uniform",
                        module_selection="saliency", rank=2)
    assert res.saliency is not None and res.history["compute_dtype"] == "bfloat16"
    assert all(st["max"] > 0 for st in res.saliency.stats.values())
    assert any(float(res.adapter[n].lora_B.detach().abs().sum()) > 0 for n in res.adapter.names)
    assert {p.dtype for p in den.unet.parameters()} >= {torch.float8_e4m3fn}
    # the shipped selection ranks nothing: SPARE runs on fp8 weights without a saliency pass
    res = spare_unlearn(den, "a cat", "a dog", ["the sea"], steps=2, num_samples=2,
                        sample_steps=2, batch_size=2, timestep_sampler="uniform")
    assert res.saliency is None and res.history["compute_dtype"] == "bfloat16"
    assert any(float(res.adapter[n].lora_B.detach().abs().sum()) > 0 for n in res.adapter.names)
    names = list(adaptable_modules(den.unet))[:6]
    ad = init_sparse_lora(den.unet, names, rank=2)
    res = unlearn(den, ad, ConceptTask("a cat", "a dog", pool=_small_pool()),
                  config=UnlearnConfig(steps=2, batch_size=2, timestep_sampler="uniform"))
    assert res.history["compute_dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in ad.parameters())
    assert any(float(ad[n].lora_B.detach().abs().sum()) > 0 for n in ad.names)


def _fp8_and_reference(checkpointing: bool):
    """The same tiny UNet twice: stored in fp8 under diffusers' layerwise casting (computed in
    bf16), and a copy whose cast layers hold the fp8-rounded values in bf16 (exactly what the
    casting computes with; the layers it skips stay float32 in both)."""
    from spare_core.storage_cast import layerwise_cast_hooks

    base = tiny_denoiser()
    ref = copy.deepcopy(base.unet)
    base.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                       compute_dtype=torch.bfloat16)
    cast = {name for name, m in base.unet.named_modules()
            if any(m is n for n, _ in layerwise_cast_hooks(base.unet))}
    assert len(cast) > 10
    with torch.no_grad():
        for name, m in ref.named_modules():
            if name in cast:
                m.to(torch.float8_e4m3fn).to(torch.bfloat16)
    dens = [DiffusersDenoiser(u, base.text_encoder, base.tokenizer, base.scheduler,
                              compute_dtype=torch.bfloat16) for u in (base.unet, ref)]
    return dens, checkpointing


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fp8_storage_gradient_equals_bf16_copy_of_the_same_values(checkpointing):
    """Training through fp8-stored layers (diffusers' layerwise casting) gives the LoRA gradient
    of the same network held in bf16, bit for bit, with and without gradient checkpointing
    (which recomputes the forward inside backward). Before spare_core.storage_cast, backward read
    the weight after it was cast back to fp8: an error on AVX2-only CPUs, and a dependence on
    which kernel the CPU picks elsewhere. The fp8 weights are the same objects, still fp8, and
    diffusers' hooks are back in place afterwards."""
    (fp8, ref), ckpt = _fp8_and_reference(checkpointing)
    stored = {n: (p, p.dtype) for n, p in fp8.unet.named_parameters()}
    assert any(d == torch.float8_e4m3fn for _, d in stored.values())
    latents = torch.randn(2, *fp8.latent_shape, generator=torch.Generator().manual_seed(0))
    grads = [_lora_grads(d, latents, gradient_checkpointing=ckpt) for d in (fp8, ref)]
    assert set(grads[0]) == set(grads[1]) and grads[0]
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k
    assert all(float(g.abs().sum()) > 0 for g in grads[0].values())
    for n, p in fp8.unet.named_parameters():
        assert p is stored[n][0] and p.dtype == stored[n][1], n
    from spare_core.storage_cast import layerwise_cast_hooks
    for _, hook in layerwise_cast_hooks(fp8.unet):
        assert hook.fn_ref.pre_forward == hook.pre_forward
        assert hook.fn_ref.post_forward == hook.post_forward


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fp8_storage_saliency_equals_bf16_copy_of_the_same_values(checkpointing):
    """Saliency of an fp8-stored UNet (diffusers' layerwise casting, bf16 compute) is the
    saliency of the same values held in bf16, bit for bit, per element: each cast layer's weight
    gradient is read from the bf16 copy it computes on (spare_core.storage_cast.gradient_taps),
    with and without gradient checkpointing. The fp8 weights are the
    same objects afterwards, still fp8, with their requires_grad flags and no .grad."""
    (fp8, ref), ckpt = _fp8_and_reference(checkpointing)
    stored = {n: (p, p.dtype, p.requires_grad) for n, p in fp8.unet.named_parameters()}
    latents = torch.randn(3, *fp8.latent_shape, generator=torch.Generator().manual_seed(0))
    sal = [compute_saliency(d, "a cat", latents, batch_size=2, seed=0,
                            gradient_checkpointing=ckpt) for d in (fp8, ref)]
    assert set(sal[0].scores) == set(sal[1].scores) == set(adaptable_modules(fp8.unet))
    narrow = [n for n, m in adaptable_modules(fp8.unet).items()
              if m.weight.dtype == torch.float8_e4m3fn]
    assert len(narrow) > 10
    for k in sal[0].scores:
        assert torch.equal(sal[0].scores[k], sal[1].scores[k]), k
    assert all(float(sal[0].scores[k].abs().sum()) > 0 for k in narrow)
    for n, p in fp8.unet.named_parameters():
        assert (p, p.dtype, p.requires_grad) == stored[n] and p.grad is None, n


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="ATEN_CPU_CAPABILITY=avx2 names an x86 instruction set")
def test_fp8_storage_tests_pass_with_the_cpu_pinned_to_avx2():
    """The fp8 tests again in a fresh interpreter whose kernels are pinned to AVX2 (ATen's
    dispatch and oneDNN's ISA), the CPU class where the in-place cast failed: the result must
    not depend on the kernels this machine would pick."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(here, "test_precision.py"),
         "-k", "fp8 and not pinned_to_avx2"],
        env=env, cwd=here, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


def _small_pool():
    from spare_core import PoolConfig
    return PoolConfig(size=2, steps=2)


def test_bf16_unet_with_fp32_text_encoder_samples_and_computes_saliency():
    from spare_core import sample

    den = tiny_denoiser()
    den = DiffusersDenoiser(den.unet.to(torch.bfloat16), den.text_encoder, den.tokenizer,
                            den.scheduler)
    lat = sample(den, ["a cat", "a dog"], steps=3, guidance=3.0,
                 generator=torch.Generator().manual_seed(0))
    assert lat.dtype == torch.float32 and torch.isfinite(lat).all()
    sal = compute_saliency(den, "a cat", lat)
    assert sum(float(s.sum()) for s in sal.scores.values()) > 0


# ---- memory controls give the plain path's numbers ---------------------------------------------
def test_unmerged_adapter_equals_merged(den):
    """Forward hooks (y = Wx + s B(Ax), or y = Wx + delta x) give the outputs of the merged
    weight W + delta, for dense and masked LoRA and masked full deltas, Linear and Conv2d."""
    mods = adaptable_modules(den.unet)
    names = [n for n in mods if isinstance(mods[n], torch.nn.Conv2d)][:3] + \
            [n for n in mods if isinstance(mods[n], torch.nn.Linear)][:3]
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(mods[n].weight.shape, generator=g) < 0.3 for n in names}
    adapters = [init_sparse_lora(den.unet, names, rank=2),
                init_sparse_lora(den.unet, names, rank=2, masks=masks),
                init_masked_full(den.unet, masks)]
    x = torch.randn(2, *den.latent_shape, generator=g)
    t, ctx = torch.tensor([10, 700]), den.encode(["a cat", "a dog"])
    for ad in adapters:
        with torch.no_grad():
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            ad.strength = 0.7
            with ad.applied(den.unet, mode="merged"):
                merged = den.eps(x, t, ctx)
            with ad.applied(den.unet):
                unmerged = den.eps(x, t, ctx)
        torch.testing.assert_close(unmerged, merged, atol=2e-5, rtol=1e-4)


def test_saliency_micro_batches_equal_one_batch_and_module_scores_follow(den):
    lat = torch.randn(6, *den.latent_shape, generator=torch.Generator().manual_seed(0))
    one = compute_saliency(den, "a cat", lat, batch_size=6)
    chunks = compute_saliency(den, "a cat", lat, batch_size=2)
    for n, s in one.scores.items():
        torch.testing.assert_close(chunks.scores[n], s, atol=1e-7, rtol=1e-4)
    # per-module scores without any per-weight buffer: one micro-batch for the pool gives the
    # mean and max of |sum| exactly; several give the per-batch magnitudes (sum of the means,
    # largest max): the mean bounds the exact one from above, and they rank the modules alike
    whole = compute_saliency(den, "a cat", lat, batch_size=6, element_scores=False)
    lean = compute_saliency(den, "a cat", lat, batch_size=2, element_scores=False)
    assert not lean.has_elements and lean.shapes == whole.shapes == one.shapes
    for n in one.modules:
        assert whole.stats[n]["mean"] == pytest.approx(one.stats[n]["mean"], rel=1e-5, abs=1e-12)
        assert whole.stats[n]["max"] == pytest.approx(one.stats[n]["max"], rel=1e-5, abs=1e-12)
        assert lean.stats[n]["mean"] >= one.stats[n]["mean"] * (1 - 1e-5)
    top = max(3, len(one.modules) // 4)
    assert len(set(lean.top_modules(top)) & set(one.top_modules(top))) >= 0.75 * top
    with pytest.raises(ValueError, match="element_scores=True"):
        lean.mask(fraction=0.1)


def _forward_calls(module: torch.nn.Module, run) -> int:
    """How often ``module`` started a forward during ``run()``, recomputation in backward
    included (a pre-hook: checkpoint's recomputation stops early, before forward hooks run)."""
    calls = []
    h = module.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        run()
    finally:
        h.remove()
    return len(calls)


def test_gradient_checkpointing_gives_the_same_gradients(den):
    """Same scores and LoRA gradients with checkpointing; and it is really on: a checkpointed
    block runs again in backward."""
    lat = torch.randn(2, *den.latent_shape, generator=torch.Generator().manual_seed(0))
    block = den.unet.down_blocks[0].resnets[0]  # diffusers checkpoints the resnets
    out = {}
    n_plain = _forward_calls(block, lambda: out.update(plain=compute_saliency(den, "a cat", lat)))
    n_ckpt = _forward_calls(block, lambda: out.update(ckpt=compute_saliency(
        den, "a cat", lat, gradient_checkpointing=True)))
    assert n_ckpt == 2 * n_plain
    assert not den.unet.is_gradient_checkpointing  # switched off again
    for n, s in out["plain"].scores.items():
        torch.testing.assert_close(out["ckpt"].scores[n], s, atol=1e-7, rtol=1e-4)
    grads = [_lora_grads(copy.deepcopy(den), lat, gradient_checkpointing=flag) for flag in (False, True)]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-8, rtol=1e-4)


def test_comfy_block_checkpointing_gives_the_same_gradients(den):
    """The ComfyUI bridge's wrapper (TrainLoraNode's way) on the tiny UNet: same gradients, and
    removed cleanly."""
    from nodes import comfy_bridge as bridge  # importable without ComfyUI: imports are lazy

    lat = torch.randn(2, *den.latent_shape, generator=torch.Generator().manual_seed(0))
    den.enable_gradient_checkpointing = lambda on=True: bridge.set_gradient_checkpointing(den.unet, on)
    block, out = den.unet.down_blocks[0].resnets[0], {}  # inside a wrapped block
    n_plain = _forward_calls(block, lambda: out.update(plain=_lora_grads(den, lat)))
    n_ckpt = _forward_calls(block, lambda: out.update(
        ckpt=_lora_grads(den, lat, gradient_checkpointing=True)))
    assert n_ckpt > n_plain  # the wrapped block ran again in backward
    plain, ckpt = out["plain"], out["ckpt"]
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-8, rtol=1e-4)
    assert not any("_spare_forward" in m.__dict__ for m in den.unet.modules())


def test_backward_per_term_gives_the_same_gradient(den):
    """Forget and preserve halves back-propagated one after the other (two student and two
    teacher forwards a step instead of one each) give the one-backward gradient."""
    lat = torch.randn(2, *den.latent_shape, generator=torch.Generator().manual_seed(0))
    out = {}
    n_one = _forward_calls(den.unet.conv_in, lambda: out.update(one=_lora_grads(den, lat)))
    n_split = _forward_calls(den.unet.conv_in, lambda: out.update(
        split=_lora_grads(den, lat, backward_per_term=True)))
    assert n_split == n_one + 2
    one, split = out["one"], out["split"]
    for k in one:
        torch.testing.assert_close(split[k], one[k], atol=1e-8, rtol=1e-4)


# ---- masks with ties ---------------------------------------------------------------------------
@pytest.mark.parametrize("exact_limit", [None, 16])
def test_mask_with_ties_keeps_exactly_k(monkeypatch, exact_limit):
    """95% of the scores are exactly 0: top 10% and top 50% keep exactly that share (ties broken
    by position), globally and per layer; also through the bisection used for SD-sized UNets."""
    from spare_core import saliency as S

    if exact_limit is not None:
        monkeypatch.setattr(S, "_EXACT_LIMIT", exact_limit)
    g = torch.Generator().manual_seed(0)
    scores = {}
    for name, n in (("a", 400), ("b", 600)):
        s = torch.zeros(n)
        hot = torch.randperm(n, generator=g)[: n // 20]
        s[hot] = torch.rand(hot.numel(), generator=g) + 0.1
        scores[name] = s.view(-1, 10)
    sal = S.Saliency(scores)
    for frac in (0.1, 0.5):
        masks = sal.mask(fraction=frac)
        assert sum(int(m.sum()) for m in masks.values()) == round(frac * 1000)
        kept = torch.cat([scores[n][masks[n]] for n in scores])
        dropped = torch.cat([scores[n][~masks[n]] for n in scores])
        assert float(kept.min()) >= float(dropped.max())  # the most salient, then the ties
        for n, m in sal.mask(fraction=frac, scope="layer").items():
            assert int(m.sum()) == round(frac * scores[n].numel())
    hot_a = sal.mask(fraction=0.05)["a"]  # 50 hot elements: exactly the non-zero ones
    assert torch.equal(hot_a, scores["a"] > 0)


def test_sparse_lora_sparsity_stays_sparse_when_most_scores_are_zero(den):
    lat = torch.randn(2, *den.latent_shape, generator=torch.Generator().manual_seed(0))
    sal = compute_saliency(den, "a cat", lat)
    for n in sal.scores:
        sal.scores[n][..., : sal.scores[n].shape[-1] // 2 + 1] = 0.0  # over half of each module 0
    ad = sparse_lora_from_saliency(den.unet, sal, rank=2, module_fraction=0.2, mask_fraction=0.1)
    for n in ad.names:
        assert int(ad[n].mask.sum()) == round(0.1 * ad[n].mask.numel()), n


def test_saliency_refuses_non_finite_and_restores_mode(den):
    from spare_core.saliency import SaliencyError

    den.unet.train()
    lat = torch.randn(2, *den.latent_shape)
    modes = []
    h = den.unet.conv_in.register_forward_hook(lambda m, a, o: modes.append(m.training))
    compute_saliency(den, "a cat", lat)
    assert modes == [False] and den.unet.training  # eval while computing, restored after
    lat[0, 0, 0, 0] = float("nan")
    with pytest.raises(SaliencyError, match="not finite"):
        compute_saliency(den, "a cat", lat)
    h.remove()
    assert all(p.grad is None for p in den.unet.parameters())


def test_zero_terminal_snr_v_prediction_samples_finite_latents():
    """A v-prediction model on a zero-terminal-SNR schedule (alpha-bar 0 at the last step, as
    diffusers' rescale_betas_zero_snr gives) samples from t = T-1 without dividing by zero: x0
    comes from v directly. Through eps alone, x0 = (x - sqrt(1 - a) eps) / sqrt(a) is 0/0 there."""
    from diffusers import DDPMScheduler

    from spare_core import sample
    def x0_from_eps(x_t, eps, a):  # the division the engine used before (and eps models need)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    base = tiny_denoiser()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
                          prediction_type="v_prediction")
    den = DiffusersDenoiser(base.unet, base.text_encoder, base.tokenizer, sched)
    assert float(den.alphas_cumprod[-1]) == 0.0
    for method in ("ddim", "ddpm"):
        lat = sample(den, ["a cat", "a dog"], steps=5, guidance=3.0, method=method,
                     generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(lat).all(), method
    x = torch.randn(2, *den.latent_shape)
    t = torch.tensor([999, 500])
    ctx = den.encode(["a cat", "a dog"])
    with torch.no_grad():
        eps, x0 = den.predict(x, t, ctx)
        assert torch.isfinite(x0).all() and torch.equal(eps, den.eps(x, t, ctx))
        a = den.alphas_cumprod[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(x0[1:], x0_from_eps(x[1:], eps[1:], a[1:]), atol=1e-4, rtol=1e-4)
        assert not torch.isfinite(x0_from_eps(x[:1], eps[:1], a[:1])).all()  # the old path


def test_sdxl_unet_is_sent_to_its_family_backend():
    """DiffusersDenoiser (SD1.x/SD2.x) refuses an SDXL UNet before any prediction, naming the
    loaders that pick SDXLDenoiser (before the family existed, the first call failed inside
    diffusers with a TypeError)."""
    from diffusers import UNet2DConditionModel

    base = tiny_denoiser()
    cfg = {k: v for k, v in base.unet.config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**{**cfg, "addition_embed_type": "text_time",
                                   "addition_time_embed_dim": 8,
                                   "projection_class_embeddings_input_dim": 80})
    with pytest.raises(ValueError, match="addition_embed_type='text_time'.*load_denoiser.*"
                                         "denoiser_from_pipeline.*SDXLDenoiser"):
        DiffusersDenoiser(unet, base.text_encoder, base.tokenizer, base.scheduler)


@pytest.mark.parametrize("method", ["siss", "erasediff"])
def test_gradient_taking_objectives_train_with_checkpointing(den, method):
    """SISS and EraseDiff take gradients themselves (normalised / bi-level) over the parameters
    the loop hands them (``Batch.params``; finding them by walking the autograd graph found none
    on CUDA with torch 2.11, benchmarks/RESULTS.md): they train, and with gradient checkpointing
    on give the same adapter as without."""
    from spare_core import run_method

    g = torch.Generator().manual_seed(3)
    forget = torch.randn(4, *den.latent_shape, generator=g)
    keep = torch.randn(4, *den.latent_shape, generator=g)
    out = [run_method(method, copy.deepcopy(den), forget=forget, keep=keep, steps=2,
                      batch_size=2, parameterization="lora", rank=2, lr=1e-2, early_stop_every=0,
                      gradient_checkpointing=flag).adapter.state_dict() for flag in (False, True)]
    assert any(v.abs().sum() > 0 for k, v in out[0].items() if "lora_B" in k or "up" in k)
    for k, v in out[0].items():
        torch.testing.assert_close(out[1][k], v, atol=1e-6, rtol=1e-4)
