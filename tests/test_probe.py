"""The erasure probes: prompt access with free prefix embeddings, the UnlearnDiffAtk-style
attack, the adversarial SPARE option and the bench's probe columns."""
import pytest
import torch

from conftest import assert_state_equal, unet_state
from spare_core.digits import metrics as M
from spare_core.digits.data import prompt_for
from spare_core.probe import AttackConfig, PrefixAttack, attack, prompt_access
from spare_core.probe.adversarial import AdversarialConceptTask, AdversarialConfig, swapped
from spare_core.probe.text import CLIPPromptAccess


@pytest.fixture(scope="module")
def digits():
    return M.load_default_model()


@pytest.fixture(scope="module")
def threes(digits):
    return M.generate_digits(digits, [3], 16, seed=0, steps=25)[3]


def test_prefix_of_real_tokens_encodes_as_the_typed_prompt(digits):
    access = prompt_access(digits)
    assert isinstance(access, CLIPPromptAccess)
    table, allowed = access.table()
    tok = digits.tokenizer
    assert tok.bos_token_id not in allowed.tolist() and tok.eos_token_id not in allowed.tolist()
    words = ["seven", "digit"]
    ids = [tok.convert_tokens_to_ids(w + "</w>") for w in words]
    prefix = table[torch.tensor(ids)].unsqueeze(0)                        # [1, 2, D]
    got = access.encode(prefix, ["a handwritten digit three"])
    want = digits.encode(["seven digit a handwritten digit three"])
    assert torch.allclose(got, want, atol=1e-6)
    assert access.text(ids) == "seven digit"


def test_prefix_gets_gradients_and_the_encoder_is_unchanged(digits):
    access = prompt_access(digits)
    before = {k: v.clone() for k, v in digits.text_encoder.state_dict().items()}
    table, _ = access.table()
    prefix = table[5:8].clone().unsqueeze(0).requires_grad_(True)
    with torch.enable_grad():
        access.encode(prefix, ["a handwritten digit one"]).pow(2).sum().backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    for k, v in digits.text_encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not digits.text_encoder.get_input_embeddings()._forward_hooks  # the hook is gone


def test_too_long_prompt_and_bad_settings_are_refused_up_front(digits, threes):
    with pytest.raises(ValueError, match="exceeds the text encoder's 16 positions"):
        attack(digits, ["a handwritten digit three " * 3], threes, AttackConfig(tokens=5, steps=1))
    with pytest.raises(ValueError, match="attack steps"):
        attack(digits, [prompt_for(3)], threes, AttackConfig(steps=0))
    with pytest.raises(ValueError, match="one per attacked prompt"):
        attack(digits, ["a", "b"], threes.unsqueeze(0), AttackConfig(steps=1))
    with pytest.raises(ValueError, match="latents"):
        attack(digits, ["a"], torch.zeros(4, 3, 8, 8), AttackConfig(steps=1))


def test_backends_without_one_clip_are_refused_with_the_alternative():
    class NoText:
        unet = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="one CLIP text encoder.*paraphrases"):
        prompt_access(NoText())


def test_attack_finds_the_word_of_the_concept_and_leaves_the_model_alone(digits, threes):
    """On the original model, images of 3 under "a handwritten digit" with one free token: the
    token that denoises them best is "three" (most of four random starts find it)."""
    saved = unet_state(digits.unet)
    res = attack(digits, ["a handwritten digit"] * 4, threes,
                 AttackConfig(tokens=1, steps=30, batch_size=16, seed=0))
    assert all(p.endswith(" a handwritten digit") for p in res.prompts)
    assert sum(p.startswith("three ") for p in res.prompts) >= 2, res.prompts
    assert res.token_ids.shape == (4, 1) and len(res.losses) == 30
    assert min(res.losses) < res.losses[0]
    assert_state_equal(digits.unet, saved)


def test_attack_is_reproducible_and_cancellable(digits, threes):
    from spare_core.loop import UnlearnCancelled

    cfg = AttackConfig(tokens=3, steps=3, batch_size=4, seed=1)
    a = attack(digits, [prompt_for(3)], threes, cfg)
    b = attack(digits, [prompt_for(3)], threes, cfg)
    assert a.prompts == b.prompts and a.losses == b.losses
    assert len(a.prefixes[0].split()) >= 1 and a.prompts[0].endswith(prompt_for(3))
    calls = []
    with pytest.raises(UnlearnCancelled):
        attack(digits, [prompt_for(3)], threes, cfg, should_stop=lambda: len(calls) >= 1,
               progress=lambda *x: calls.append(x))
    assert len(calls) == 1


def test_adversarial_task_adds_rows_on_the_attack_prompt(digits):
    from spare_core.tasks import ConceptTask, PoolConfig

    inner = ConceptTask(prompt_for(3), prompt_for(4), [prompt_for(5)],
                        pool=PoolConfig(size=4, steps=5, clip_x0=1.0))
    task = AdversarialConceptTask(inner, AdversarialConfig(every=1, attack_steps=1, fraction=0.5,
                                                           batch_size=2))
    task.validate(digits)
    task.prepare(digits, "uniform", 0)
    # the original model draws the concept from its plain prompt better than from a random
    # prefix: nothing found, nothing to defend against, so the batch stays plain
    b = task.batch(digits, 4, torch.Generator().manual_seed(0))
    want = inner.batch(digits, 4, torch.Generator().manual_seed(0))  # the same draws, plain
    assert not task._beats.any() and len(b.forget) == 4 and task.adversarial_batches == 0
    assert torch.equal(b.forget.x_t, want.forget.x_t)
    # once the attack's prefix beats the plain prompt, half as many rows again are added
    task._attack.plain_loss = lambda: torch.full((1,), float("inf"))
    b = task.batch(digits, 4, torch.Generator().manual_seed(0))
    assert task._beats.all() and task.adversarial_batches == 1
    plain = digits.encode([prompt_for(3)])[0]
    adv = task._attack.contexts()[0]
    assert not torch.allclose(adv, plain)
    assert len(b.forget) == 6 and b.surrogate_ctx.shape[0] == 6
    assert torch.equal(b.forget.x_t[:4], want.forget.x_t)           # the plain rows stay
    assert torch.equal(b.forget.x_t[4:], want.forget.x_t[:2])       # then the first two again
    for i in range(4):
        assert torch.equal(b.forget.ctx[i], plain)
    ids = swapped(task._attack.access, task._attack.best_ids, inner.pairs)
    sur = task._attack.contexts([prompt_for(4)], ids)[0]             # prefix, then surrogate
    alone = digits.encode([prompt_for(4)])[0]                       # the plain rows' target
    assert torch.allclose(b.surrogate_ctx[0], alone) and not torch.allclose(sur, alone)
    for i in (4, 5):
        assert torch.allclose(b.forget.ctx[i], adv)                 # on the attack's prompt
    # the added rows' targets alternate: one the swapped prefix + surrogate, one the surrogate
    assert torch.allclose(b.surrogate_ctx[4], sur) and torch.allclose(b.surrogate_ctx[5], alone)
    b = task.batch(digits, 4, torch.Generator().manual_seed(0))      # the next batch starts
    ids = swapped(task._attack.access, task._attack.best_ids, inner.pairs)  # with the other
    sur = task._attack.contexts([prompt_for(4)], ids)[0]             # (a new round's prefix)
    assert torch.allclose(b.surrogate_ctx[4], alone) and torch.allclose(b.surrogate_ctx[5], sur)
    assert task.sampler is inner.sampler and task.preserve == inner.preserve
    with pytest.raises(ValueError, match="fraction"):
        AdversarialConceptTask(inner, AdversarialConfig(fraction=0.0)).validate(digits)


def test_plain_loss_is_the_loss_of_the_prompt_without_prefix(digits, threes):
    """The gate's bar: each unprefixed prompt's loss on the attack's fixed draws. On images of
    3 the prompt of 3 denoises better than the prompt of 7, and a random prefix in front of the
    prompt of 3 does worse than no prefix."""
    att = PrefixAttack(digits, [prompt_for(3), prompt_for(7)], [threes, threes],
                       AttackConfig(tokens=2, steps=1, batch_size=8))
    plain = att.plain_loss()
    assert plain.shape == (2,) and float(plain[0]) < float(plain[1])
    att.step()
    assert float(att.best_loss[0]) > float(plain[0])


def test_the_target_swaps_the_concepts_words_in_the_prefix(digits):
    """The added rows' target is the prompt with the concept swapped for the surrogate, in the
    prefix too; other words stay; an empty surrogate swaps them for the end token."""
    access = prompt_access(digits)
    word = {w: access.token_ids(w)[0] for w in ("three", "eight", "four", "digit")}
    ids = torch.tensor([[word["three"], word["eight"], word["three"], word["digit"]]])
    out = swapped(access, ids, [(prompt_for(3), prompt_for(4))])
    assert out.tolist() == [[word["four"], word["eight"], word["four"], word["digit"]]]
    out = swapped(access, ids, [(prompt_for(3), "")])
    end = access.end_id
    assert out.tolist() == [[end, word["eight"], end, end]]  # "digit" is the concept's word too


def test_adversarial_spare_runs_through_run_method(digits):
    from spare_core.methods import run_method

    saved = unet_state(digits.unet)
    res = run_method("spare", digits, concept=prompt_for(3), surrogate=prompt_for(4),
                     preserve=[prompt_for(5)], steps=4, num_samples=4, sample_steps=5,
                     clip_x0=1.0, batch_size=2, adversarial=True, adv_every=2, adv_steps=1)
    assert res.history["attack_seconds"] > 0 and len(res.history["loss"]) == 4
    assert "adversarial_batches" in res.history  # the task's run_stats reach the history
    assert_state_equal(digits.unet, saved)
    with pytest.raises(ValueError, match="adversarial fraction"):
        run_method("spare", digits, concept=prompt_for(3), steps=2, adversarial=True,
                   adv_fraction=2.0)


def test_digits_probe_columns(digits):
    from spare_core.digits.bench import DigitsBench, paraphrases

    bench = DigitsBench()
    clf = M.load_classifier()
    base = bench.measure(digits, clf, [3], 4, 0, 10)
    out = bench.probe(digits, clf, [3], base, 4, 0, 10, AttackConfig(steps=2, batch_size=2))
    assert set(out) >= {"UA_para", "ASR", "ASR_found", "attack_prompts"}
    assert 0.0 <= out["ASR_found"] <= out["ASR"] <= 1.0 and 0.0 <= out["UA_para"] <= 1.0
    assert out["ASR"] >= 0.75  # nothing erased: the plain prompt (the fallback) shows the 3
    assert len(out["attack_prompts"]) == 4
    assert paraphrases(3)[0] == "three"
    assert set(bench.probe(digits, clf, [3], base, 4, 0, 10)) == {"UA_para"}


def test_found_prompts_type_back_to_the_attacked_tokens(digits, threes):
    """Only whole-word tokens are offered, so the found text tokenizes to the attacked ids."""
    res = attack(digits, [prompt_for(3)] * 3, threes, AttackConfig(tokens=5, steps=5, seed=2))
    tok = digits.tokenizer
    for text, ids in zip(res.prompts, res.token_ids):
        typed = tok(text).input_ids
        assert typed[1:6] == ids.tolist(), (text, typed, ids)


def _counting_pools(monkeypatch):
    """Record the prompt of every latent pool ConceptTask generates (spare_core.tasks.sample)."""
    import spare_core.tasks as tasks

    real, sampled = tasks.sample, []

    def counting(denoiser, prompts, **kwargs):
        sampled.append(prompts[0])
        return real(denoiser, prompts, **kwargs)

    monkeypatch.setattr(tasks, "sample", counting)
    return sampled


@pytest.mark.parametrize("objective", ["esd", "erasediff", "salun_rl"])
def test_adversarial_training_refuses_other_objectives_before_any_sampling(digits, monkeypatch,
                                                                           objective):
    """The adversarial rows are steered to the surrogate, which only self_distill trains on:
    any other objective (by name or as an object) is refused, naming the fix, before a pool
    is generated or the attack runs."""
    from spare_core import UnlearnConfig, init_sparse_lora, unlearn
    from spare_core.families.unet import adaptable_modules
    from spare_core.objectives import make_objective
    from spare_core.tasks import ConceptTask, PoolConfig

    sampled = _counting_pools(monkeypatch)
    ad = init_sparse_lora(digits.unet, list(adaptable_modules(digits.unet))[5:9], rank=2)
    for obj in (objective, make_objective(objective)):
        inner = ConceptTask(prompt_for(3), prompt_for(4), [prompt_for(5)],
                            pool=PoolConfig(size=2, steps=2, clip_x0=1.0))
        task = AdversarialConceptTask(inner, AdversarialConfig(every=1, attack_steps=1))
        with pytest.raises(ValueError, match=f"objective is '{objective}': choose "
                                             "'self_distill' or switch adversarial off"):
            unlearn(digits, ad, task, obj, UnlearnConfig(steps=1, timestep_sampler="uniform"))
        assert sampled == [] and task._attack is None and inner.concept_latents is None


def test_adversarial_task_drops_the_preserve_pools_its_objective_never_reads(digits, monkeypatch):
    """Self-distillation without a preserve term (preserve_weight=0) reads no preserved prompt:
    the adversarial task drops them as the plain task does (no pools generated), stays
    adversarial (its run stats reach the history) and leaves the caller's task as it was."""
    from spare_core import UnlearnConfig, init_sparse_lora, unlearn
    from spare_core.families.unet import adaptable_modules
    from spare_core.objectives import SelfDistill
    from spare_core.tasks import ConceptTask, PoolConfig

    sampled = _counting_pools(monkeypatch)
    keep = [prompt_for(5), prompt_for(6)]
    inner = ConceptTask(prompt_for(3), prompt_for(4), keep,
                        pool=PoolConfig(size=2, steps=2, clip_x0=1.0))
    config = AdversarialConfig(every=1, attack_steps=1, tokens=2, batch_size=2)
    task = AdversarialConceptTask(inner, config, seed=3)
    lean = task.without_preserve()
    assert isinstance(lean, AdversarialConceptTask) and lean.preserve == ()
    assert lean.config is config and lean.seed == 3 and inner.preserve == keep
    ad = init_sparse_lora(digits.unet, list(adaptable_modules(digits.unet))[5:9], rank=2)
    cfg = UnlearnConfig(steps=1, batch_size=2, timestep_sampler="uniform")
    res = unlearn(digits, ad, task, SelfDistill(preserve_weight=0.0), cfg)
    assert sampled == [prompt_for(3)]                     # the concept's pool, no preserve pool
    assert res.history["ignored"] == ["preserve"] and res.history["attack_seconds"] > 0
    assert "preserve" not in res.history["terms"][0]
    assert inner.preserve == keep and inner.preserve_latents is None
    sampled.clear()                                       # with a preserve term: one pool each
    unlearn(digits, ad, AdversarialConceptTask(inner, config), "self_distill", cfg)
    assert sampled == [prompt_for(3), *keep]
