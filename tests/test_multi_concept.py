"""Several concepts erased in one adapter (one per line): the task pairs each concept latent with
its own concept and surrogate, every concept method takes the list, and bad lists are refused
before any work."""
import pytest
import torch

from spare_core import ConceptTask, PoolConfig
from spare_core.methods import CONCEPT_METHODS, run_method
from tiny_models import tiny_denoiser

CONCEPTS, SURROGATES = "a red circle\na blue square", "a green line\na yellow dot"


@pytest.fixture(scope="module")
def den():
    return tiny_denoiser(0)


def test_each_latent_is_drawn_with_its_own_concept_and_surrogate(den):
    g = torch.Generator().manual_seed(0)
    lat = torch.cat([torch.full((3, *den.latent_shape), -1.0), torch.full((3, *den.latent_shape), 1.0)])
    task = ConceptTask(CONCEPTS, SURROGATES, ["a purple star"], concept_latents=lat,
                       pool=PoolConfig(size=2, steps=2))
    task.validate(den)
    task.prepare(den, "concept", seed=0)  # concept gaps over per-latent contexts
    from spare_core.timesteps import concept_gaps
    first_only = concept_gaps(den, lat, den.encode(["a red circle"]), den.encode(["a green line"]))
    assert torch.isfinite(task.sampler.gaps).all()
    assert not torch.allclose(task.sampler.gaps, first_only)  # the second half used its own pair
    enc = {p: den.encode([p]) for p in (*CONCEPTS.split("\n"), *SURROGATES.split("\n"))}
    for _ in range(3):
        b = task.batch(den, 8, g)
        for i in range(8):
            first = bool(b.forget.x0[i].mean() < 0)  # the first concept's latents are -1
            c, s = (("a red circle", "a green line") if first else ("a blue square", "a yellow dot"))
            torch.testing.assert_close(b.forget.ctx[i], enc[c][0])
            torch.testing.assert_close(b.surrogate_ctx[i], enc[s][0])


def test_pool_is_drawn_per_concept(den):
    task = ConceptTask(CONCEPTS, "a painting", pool=PoolConfig(size=2, steps=2))
    assert task.pairs == [("a red circle", "a painting"), ("a blue square", "a painting")]
    assert task.sample_prompts(2) == ["a red circle"] * 2 + ["a blue square"] * 2
    task.prepare(den, "uniform", seed=0)
    assert task.concept_latents.shape[0] == 4


@pytest.mark.parametrize("bad, match", [
    (dict(concept=CONCEPTS, surrogate="x\ny\nz"), "2 concepts but 3 guides"),
    (dict(concept="a cat\na dog", surrogate="a cat\na fox"), "surrogate equals the concept"),
    (dict(concept="a cat\na dog", surrogate="a dog\na fox"), "is itself erased"),
    (dict(concept=CONCEPTS, surrogate="x", preserve=["a blue square"]), "also listed as a preserved"),
    (dict(concept=CONCEPTS, surrogate="x", concept_latents=torch.zeros(3, 4, 8, 8)),
     "cannot be split evenly over 2 concepts"),
])
def test_bad_concept_lists_are_refused_with_the_fix(den, bad, match):
    with pytest.raises(ValueError, match=match):
        ConceptTask(**bad).validate(den)


@pytest.mark.parametrize("method", CONCEPT_METHODS)
def test_every_concept_method_takes_several_concepts(den, method):
    """One adapter for both concepts; it changes both concepts' predictions."""
    kw = {} if method == "uce" else dict(steps=3, lr=5e-2, num_samples=2, sample_steps=2,
                                          batch_size=2)
    res = run_method(method, den, concept=CONCEPTS, surrogate=SURROGATES,
                     preserve=["a purple star"], seed=0, **kw)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, *den.latent_shape, generator=g), torch.tensor([200, 600])
    for concept in CONCEPTS.split("\n"):
        c = den.encode([concept]).expand(2, -1, -1)
        with torch.no_grad():
            before = den.eps(x, t, c)
            with res.adapter.applied(den.unet):
                after = den.eps(x, t, c)
        assert float((after - before).abs().max()) > 0, (method, concept)
