"""``spare_core.sampling.sample`` (written by hand over ``alphas_cumprod``) generates what
diffusers' own schedulers generate from the same schedule, UNet and noise: ``DDIMScheduler``
(eta 0) for ``method="ddim"`` and ``DDPMScheduler`` (``fixed_small`` variance) for
``method="ddpm"``, with and without classifier-free guidance, with and without x0 clipping."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from spare_core.sampling import sample, timestep_grid

PROMPTS = ["a cat", "green hills"]


def _cfg_eps(den, x, t, cond, uncond, guidance):
    """The noise prediction of diffusers' SD pipeline: one batched call, uncond first."""
    tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
    if guidance == 1.0:
        return den.eps(x, tt, cond)
    e_u, e_c = den.eps(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond, cond])).chunk(2)
    return e_u + guidance * (e_c - e_u)


def _contexts(den):
    cond = den.encode(PROMPTS)
    return cond, den.encode([""]).expand(len(PROMPTS), -1, -1)


def _close(ours, ref):
    # float32 rounding through the steps; latents here reach magnitudes of ~10
    assert ours.shape == ref.shape
    err = float((ours - ref).abs().max())
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4), err


@pytest.mark.parametrize("guidance,clip", [(1.0, None), (3.0, None), (3.0, 1.0)])
@torch.no_grad()
def test_ddim_matches_diffusers_ddim_scheduler(den, guidance, clip):
    steps = 10
    T = den.alphas_cumprod.numel()
    sched = DDIMScheduler.from_config(
        den.scheduler.config, timestep_spacing="linspace", set_alpha_to_one=True, steps_offset=0,
        clip_sample=clip is not None, clip_sample_range=clip or 1.0, prediction_type="epsilon")
    assert torch.equal(sched.alphas_cumprod.float(), den.alphas_cumprod)  # the same betas
    sched.set_timesteps(steps)
    grid = timestep_grid(T, steps)
    assert sched.timesteps.tolist() == grid  # 999, 888, ..., 111, 0
    # DDIMScheduler.step goes from t to t - T // num_inference_steps (100 here), not to the next
    # 'linspace' grid point (diffusers issues #11347, #12633). Our grid for 10 steps is uniform
    # (stride 111 = 1000 // 9), so a stride of 111 makes diffusers step along the same grid.
    stride = grid[0] - grid[1]
    assert all(a - b == stride for a, b in zip(grid, grid[1:]))
    sched.num_inference_steps = T // stride
    assert T // sched.num_inference_steps == stride

    x_T = torch.randn((len(PROMPTS), *den.latent_shape), generator=torch.Generator().manual_seed(3))
    ours = sample(den, PROMPTS, steps=steps, guidance=guidance, method="ddim", x_T=x_T.clone(),
                  clip_x0=clip)
    cond, uncond = _contexts(den)
    x = x_T.clone()
    for t in sched.timesteps:
        e = _cfg_eps(den, x, t, cond, uncond, guidance)
        # our clip recomputes eps from the clipped x0: diffusers' use_clipped_model_output
        x = sched.step(e, t, x, eta=0.0, use_clipped_model_output=clip is not None).prev_sample
    _close(ours, x)
    # the last step lands on alpha_prev = 1 (set_alpha_to_one): the output is the predicted x0
    assert float((ours - x_T).abs().max()) > 0.1


@pytest.mark.parametrize("steps,guidance,clip", [(10, 1.0, None), (10, 3.0, None),
                                                 (7, 3.0, None), (10, 3.0, 1.0)])
@torch.no_grad()
def test_ddpm_matches_diffusers_ddpm_scheduler(den, steps, guidance, clip):
    T = den.alphas_cumprod.numel()
    sched = DDPMScheduler.from_config(
        den.scheduler.config, timestep_spacing="linspace", variance_type="fixed_small",
        clip_sample=clip is not None, clip_sample_range=clip or 1.0, prediction_type="epsilon",
        thresholding=False)
    assert torch.equal(sched.alphas_cumprod.float(), den.alphas_cumprod)
    sched.set_timesteps(steps)
    # DDPMScheduler steps to the next entry of its timestep list, so any grid works (7 steps:
    # 999, 832, 666, 500, 333, 166, 0 is not evenly strided)
    assert sched.timesteps.tolist() == timestep_grid(T, steps)

    seed = 7
    g_ours = torch.Generator().manual_seed(seed)
    ours = sample(den, PROMPTS, steps=steps, guidance=guidance, method="ddpm", generator=g_ours,
                  clip_x0=clip)
    # the same random sequence: the initial noise, then one draw of x's shape per step with
    # t > 0 (sample() draws the initial noise from its generator first; DDPMScheduler.step
    # draws randn(shape, generator) on the CPU, and none at t = 0)
    g_ref = torch.Generator().manual_seed(seed)
    x = torch.randn((len(PROMPTS), *den.latent_shape), generator=g_ref)
    x_T = x.clone()
    cond, uncond = _contexts(den)
    for t in sched.timesteps:
        e = _cfg_eps(den, x, t, cond, uncond, guidance)
        x = sched.step(e, t, x, generator=g_ref).prev_sample
    _close(ours, x)
    # both consumed the same number of random draws
    assert torch.equal(torch.randn(4, generator=g_ours), torch.randn(4, generator=g_ref))
    assert float((ours - x_T).abs().max()) > 0.1

