"""SPARE keeps the unconditional prediction (``preserve_uncond``): the empty prompt joins the
preserved ones, so the prediction that classifier-free guidance subtracts from every prompt's
stays the frozen model's."""
import pytest
import torch

from spare_core.denoiser import prediction
from spare_core.recipes import recipe
from spare_core.spare import spare_unlearn
from spare_core.tasks import ConceptTask, with_unconditional


def test_with_unconditional_adds_the_empty_prompt_once():
    assert with_unconditional(["the sea"]) == ["the sea", ""]
    assert with_unconditional([]) == [""]
    assert with_unconditional(["", "the sea"]) == ["", "the sea"]
    assert with_unconditional([" ", "x"]) == [" ", "x"]  # a blank line is the empty prompt
    assert recipe("spare").hparams["preserve_uncond"] is True


def test_compositions_skip_the_empty_prompt():
    task = ConceptTask("a cat", "a dog", with_unconditional(["the sea"]), compose=0.5)
    assert task.compositions() == [("a cat, the sea", "a dog, the sea"),
                                   ("the sea, a cat", "the sea, a dog")]
    with pytest.raises(ValueError, match="compose"):  # nothing to compose with
        ConceptTask("a cat", "a dog", [""], compose=0.5).validate()


def _uncond_drift(den, adapter) -> float:
    """Mean |change| of the unconditional prediction on fixed noisy latents."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn((8, *den.latent_shape), generator=g)
    t = torch.linspace(50, 900, 8).long()
    ctx = den.encode([""] * 8)
    with torch.no_grad():
        before = prediction(den, x, t, ctx)
        with adapter.applied_to(den):
            after = prediction(den, x, t, ctx)
    return float((after - before).abs().mean())


def test_the_unconditional_prediction_moves_less_when_it_is_preserved(den):
    """Same run with and without ``preserve_uncond``: the adapter trained with it moves the
    empty prompt's prediction less (and it did train: a preserve pool more, the loss moved)."""
    run = dict(num_samples=4, sample_steps=2, steps=60, batch_size=4, lr=1e-2, seed=0,
               module_selection="all", module_fraction=1.0, timestep_sampler="uniform")
    off = spare_unlearn(den, "a cat", "a dog", ["the sea"], preserve_uncond=False, **run)
    on = spare_unlearn(den, "a cat", "a dog", ["the sea"], preserve_uncond=True, **run)
    d_off, d_on = _uncond_drift(den, off.adapter), _uncond_drift(den, on.adapter)
    assert d_off > 0
    assert d_on < 0.5 * d_off, (d_on, d_off)


def test_the_empty_prompts_pool_is_the_guided_one_at_half_the_unet_rows(den, monkeypatch):
    """The empty prompt's pool is sampled unguided: the same latents as guided sampling (the
    prompt is its own unconditional), with one UNet row per latent and step instead of two."""
    import spare_core.sampling as sampling
    from spare_core.sampling import sample
    from spare_core.tasks import PoolConfig

    pool = PoolConfig(size=3, steps=4, guidance=4.0)
    rows = []
    real = sampling.eps_and_x0
    monkeypatch.setattr(sampling, "eps_and_x0",
                        lambda d, x, *a, **k: rows.append(x.shape[0]) or real(d, x, *a, **k))
    task = ConceptTask("a cat", "a dog", ["the sea", ""], pool=pool)
    task.prepare(den, "uniform", seed=0)
    assert rows == [6] * 4 + [6] * 4 + [3] * 4  # concept, "the sea" guided; "" unguided

    gen = torch.Generator().manual_seed(1)  # prepare's generator, drawn in the same order
    for p in ("a cat", "the sea"):
        sample(den, [p] * 3, steps=4, guidance=4.0, method="ddim", generator=gen)
    guided = sample(den, [""] * 3, steps=4, guidance=4.0, method="ddim", generator=gen)
    torch.testing.assert_close(task.preserve_latents[1], guided, rtol=1e-4, atol=1e-5)
