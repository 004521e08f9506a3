"""ProbeErasure and the bridge's differentiable CLIP access, through the ComfyUI test double."""
from __future__ import annotations

import sys

import pytest
import torch

from comfy_double import CLIP, Host, InterruptProcessingException, load_pack

SIZE = dict(width=64, height=64)  # 8x8 latents, the tiny UNet's sample size
CONCEPT = "a red circle"
TINY = dict(attack_tokens=3, attack_steps=4, num_images=2, seed=0, sample_steps=3, cfg=3.0,
            attack_batch=2, **SIZE)


def bridge():
    return sys.modules[f"{load_pack().__name__}.nodes.comfy_bridge"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A host, a checkpoint and its erased clone (UCE: closed form, no training)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    host = Host(str(tmp_path_factory.mktemp("comfy"))).install(mp)
    nodes = load_pack().NODE_CLASS_MAPPINGS
    model, clip = host.load_checkpoint(seed=0)
    (ad,) = host.run(nodes["UCEErase"], model=model, clip=clip, concepts=CONCEPT,
                     guides="a blue square", preserve="a green line", preserve_scale=1.0,
                     lamb=0.5)
    (erased,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=ad, strength=1.0)
    yield dict(host=host, nodes=nodes, model=model, clip=clip, erased=erased)
    mp.undo()
    torch.set_num_threads(threads)


def run_probe(env, **overrides):
    inputs = dict(original_model=env["model"], erased_model=env["erased"], clip=env["clip"],
                  concept=CONCEPT, **TINY)
    return env["host"].run(env["nodes"]["ProbeErasure"], **{**inputs, **overrides})


def fixed_input(clip, prompt: str = CONCEPT):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ctx = clip.encode_from_tokens(clip.tokenize(prompt))
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([200, 800]), ctx.expand(2, -1, -1)


def test_probe_finds_a_prompt_and_renders_it(env):
    host = env["host"]
    host.progress.clear()
    found, attacked, plain = run_probe(env)
    assert isinstance(found, str) and found.endswith(" " + CONCEPT)
    prefix = found[:-len(CONCEPT)].strip()
    assert len(prefix.split()) == TINY["attack_tokens"]  # one whole-word token per word
    for latent in (attacked, plain):
        assert latent["samples"].shape == (TINY["num_images"], 4, 8, 8)
        assert latent["samples"].isfinite().all() and not latent["samples"].is_inference()
    assert not torch.equal(attacked["samples"], plain["samples"])
    total = 3 * TINY["sample_steps"] + TINY["attack_steps"]
    assert host.progress[-1] == (total, total)
    assert [v for v, _ in host.progress] == sorted(v for v, _ in host.progress)
    # same seed, same prompt, same result; the prompt is also shown (ComfyUI's ui text)
    out = env["nodes"]["ProbeErasure"]().probe(
        original_model=env["model"], erased_model=env["erased"], clip=env["clip"],
        concept=CONCEPT, **TINY)
    assert out["ui"]["text"] == [found] and out["result"][0] == found
    assert torch.equal(out["result"][1]["samples"], attacked["samples"])


def test_probe_leaves_its_inputs_unchanged(env):
    host, model, erased, clip = env["host"], env["model"], env["erased"], env["clip"]
    x, t, c = fixed_input(clip)
    before = host.eps(model, x, t, c), host.eps(erased, x, t, c)
    patches = {k: list(v) for k, v in erased.patches.items()}
    flags = [p.requires_grad for p in model.model.diffusion_model.parameters()]
    embedding = clip.encoder.get_input_embeddings()
    run_probe(env)
    assert torch.equal(host.eps(model, x, t, c), before[0])
    assert torch.equal(host.eps(erased, x, t, c), before[1])
    assert model.patches == {} and erased.patches.keys() == patches.keys()
    assert all(a is b for k in patches for a, b in zip(erased.patches[k], patches[k]))
    assert [p.requires_grad for p in model.model.diffusion_model.parameters()] == flags
    assert not embedding._forward_hooks
    assert torch.equal(fixed_input(clip)[2], c)


@pytest.mark.parametrize("clip_name", ["l", "h"])
def test_prompt_access_puts_the_prefix_where_its_tokens_would_be(env, clip_name):
    """Encoding prefix embeddings = encoding the prompt with their tokens typed in their place
    (SD1.x's clip_l and SD2.x's clip_h layouts); gradients reach the prefix only, the contexts
    have ComfyDenoiser.encode's shape, and the hook is gone after."""
    b = bridge()
    clip = CLIP(seed=1, clip_name=clip_name)
    long = "a very long prompt that needs a second chunk of tokens"
    with torch.inference_mode(False):
        den = b.ComfyDenoiser(env["model"], clip, prompts=[CONCEPT, long], **SIZE)
        access = den.prompt_access()
        table, allowed = access.table()
        tok = getattr(clip.tokenizer, clip.tokenizer.clip).tokenizer
        assert {tok.bos_token_id, tok.eos_token_id}.isdisjoint(allowed.tolist())
        words = [i for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(table)))))
                 if t.endswith("</w>") and i not in (tok.bos_token_id, tok.eos_token_id)]
        assert allowed.tolist() == words  # whole words only: the prompt types back to its tokens
        prompts = [CONCEPT, "a blue square"]
        ids = allowed[torch.tensor([[3, 10, 20], [5, 6, 7]])]
        prefix = table[ids].clone().requires_grad_(True)
        ctx = access.encode(prefix, prompts)
        assert ctx.shape == den.encode(prompts).shape == (2, 64, 32)  # lcm(32, 64)
        for i, p in enumerate(prompts):
            tokens = clip.tokenize(p)[clip_name][0]
            typed = [tokens[0]] + [(int(t), 1.0) for t in ids[i]] + tokens[1:-3]
            want = clip.encode_from_tokens({clip_name: [typed]})[0]
            torch.testing.assert_close(ctx[i, :32], want, rtol=1e-5, atol=1e-5)
            assert torch.equal(ctx[i, 32:], ctx[i, :32])
        (grad,) = torch.autograd.grad(ctx.square().sum(), [prefix])
    assert grad.abs().sum(-1).gt(0).all()
    assert not access.embedding._forward_hooks
    assert all(not p.requires_grad for p in clip.cond_stage_model.parameters())
    assert len(access.text(ids[0].tolist()).split()) == 3


def _expect(env, match, **overrides):
    host = env["host"]
    host.progress.clear()
    loaded = len(host.loaded)
    with pytest.raises(ValueError, match=match):
        run_probe(env, **overrides)
    assert host.progress == [] and len(host.loaded) == loaded, "error raised after work started"


def test_bad_inputs_fail_before_any_work(env):
    _expect(env, "concept prompt is empty", concept="  ")
    _expect(env, "one concept per node", concept=f"{CONCEPT}\na blue square")
    _expect(env, "are the same MODEL", erased_model=env["model"])
    _expect(env, "CLIP input is empty", clip=None)
    _expect(env, "exceeds the text encoder's 32 positions",
            concept="a red circle on a blue square, at noon", attack_tokens=5)
    _expect(env, "more than one 32-token CLIP chunk", concept="x" * 40)
    _expect(env, "multiples of 8", width=68)


def test_non_sd_families_are_refused_with_the_fix(env):
    host = env["host"]
    model, clip = host.load_family("sdxl")
    _expect(env, r"the adversarial probe supports SD1\.x/SD2\.x checkpoints \(one CLIP\)",
            original_model=model, erased_model=model.clone(), clip=clip)
    with torch.inference_mode(False):
        den = bridge().ComfyDenoiser(model, clip, **SIZE)
        with pytest.raises(ValueError, match="supports SD1.x/SD2.x checkpoints"):
            den.prompt_access()


def test_cancel_during_the_attack_leaves_everything_as_it_was(env):
    host, model, erased, clip = env["host"], env["model"], env["erased"], env["clip"]
    x, t, c = fixed_input(clip)
    base = host.eps(erased, x, t, c)
    flags = [p.requires_grad for p in model.model.diffusion_model.parameters()]
    host.progress.clear()
    images = TINY["num_images"] * TINY["sample_steps"]  # sampling updates: one image at a time
    host.interrupt_after(images + 2)  # past the concept images, in the attack
    with pytest.raises(InterruptProcessingException):
        run_probe(env, attack_steps=50)
    assert TINY["sample_steps"] < host.progress[-1][0] < TINY["sample_steps"] + 50
    assert [p.requires_grad for p in model.model.diffusion_model.parameters()] == flags
    assert not clip.encoder.get_input_embeddings()._forward_hooks
    assert not any("_spare_forward" in m.__dict__ for m in model.model.diffusion_model.modules())
    assert torch.equal(host.eps(erased, x, t, c), base)


def test_the_hook_skips_rows_without_placeholders():
    """ClipTokenWeightEncoder embeds an empty-prompt row (start, end, pads) for a prompt with
    ``(word:1.2)`` weights: it stays the empty prompt; the prompt's row gets the prefix."""
    emb = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[8, 8, 8, 1, 9, 9], [8, 9, 9, 9, 9, 9]])  # start 8, end/pad 9
    prefix = torch.randn(1, 2, 4, requires_grad=True)
    from spare_core.probe.text import prefix_injected

    with prefix_injected(emb, prefix, 1, placeholder_id=8):
        out = emb(ids)
    plain = emb(ids)
    assert torch.equal(out[0, 1:3], prefix[0].detach()) and out.requires_grad
    assert torch.equal(out[0, [0, 3, 4, 5]], plain[0, [0, 3, 4, 5]])
    assert torch.equal(out[1], plain[1]) and not emb._forward_hooks


def test_found_words_are_escaped_as_comfyui_reads_a_typed_prompt(env):
    """A found token such as '(' is typed as '\\(' (ComfyUI's literal parenthesis), not as the
    start of a (word:weight) group."""
    access = bridge().ComfyPromptAccess(env["clip"])
    access.tokenizer = type("Tok", (), {"decode": staticmethod(lambda ids: " (art:1.2) ")})()
    assert access.text([1, 2]) == "\\(art:1.2\\)"


def test_self_distill_unlearn_trains_against_the_attack(env, caplog):
    """SelfDistillUnlearn's ``adversarial`` switch: the run attacks the model being trained
    (the CLIP's embedding is hooked and unhooked again), marks the adapter and logs its attack
    rounds."""
    import logging

    caplog.set_level(logging.INFO)
    nodes, host = env["nodes"], env["host"]
    (sal,) = host.run(nodes["ComputeSaliency"], model=env["model"], clip=env["clip"],
                      concept=CONCEPT, samples=2, ranking="saliency", seed=0, sample_steps=2,
                      cfg=3.0, **SIZE)
    # 0.07 of the tiny UNet's 81 candidate modules: the 6 most salient
    (init,) = host.run(nodes["SparseLoRAInit"], model=env["model"], saliency=sal,
                       module_selection="saliency", module_fraction=0.07, rank=2, alpha=2.0,
                       mask_fraction=1.0, seed=0)
    assert len(init.names) == 6
    access = bridge().ComfyPromptAccess(env["clip"])
    calls = []
    hook = access.embedding.register_forward_hook(lambda *a: calls.append(1))
    args = dict(model=env["model"], clip=env["clip"], adapter=init, concept=CONCEPT,
                surrogate="a blue square", preserve="a green line", steps=3, lr=1e-2,
                timestep_sampler="uniform", objective="self_distill", seed=0, pool_size=1,
                pool_steps=2, **SIZE)
    try:
        (plain, _loss) = host.run(nodes["SelfDistillUnlearn"], **args)
        plain_calls = len(calls)
        (adv, _loss) = host.run(nodes["SelfDistillUnlearn"], adversarial=True, **args)
    finally:
        hook.remove()
    assert len(calls) - plain_calls > plain_calls  # the attack encoded its prefixed prompts
    assert adv.meta["adversarial"] == "true" and plain.meta["adversarial"] == "false"
    said = [r.getMessage() for r in caplog.records if "SelfDistillUnlearn adversarial:" in r.getMessage()]
    assert len(said) == 1 and "of 3 batches with attack rows" in said[0], said
    assert any(not torch.equal(a, b) for a, b in zip(adv.merged().values(),
                                                      plain.merged().values()))
    assert not access.embedding._forward_hooks


def test_adversarial_training_reloads_the_network_after_each_attack_encode(env, monkeypatch):
    """The attack encodes prompts with CLIP in the middle of training; ComfyUI loads CLIP for
    that and may unload part of the network. The bridge re-asserts the MODEL's full load after
    every such encode: in the run's record of events, every forward of the network that follows
    a CLIP encode has a load of the MODEL between them."""
    nodes, host, model = env["nodes"], env["host"], env["model"]
    events = []
    clip_type = type(env["clip"])
    encode = clip_type.encode_from_tokens
    monkeypatch.setattr(clip_type, "encode_from_tokens",
                        lambda self, *a, **k: events.append("clip") or encode(self, *a, **k))
    load = host.load
    monkeypatch.setattr(host, "load", lambda patcher: events.append("load") or load(patcher))
    (init,) = host.run(nodes["SparseLoRAInit"], model=model, module_selection="all",
                       module_fraction=1.0, rank=2, alpha=2.0, mask_fraction=1.0, seed=0)
    hook = model.model.diffusion_model.register_forward_pre_hook(
        lambda *a: events.append("unet"))
    try:
        host.run(nodes["SelfDistillUnlearn"], model=model, clip=env["clip"], adapter=init,
                 concept=CONCEPT, surrogate="a blue square", preserve="", steps=3, lr=1e-2,
                 timestep_sampler="uniform", objective="self_distill", seed=0, pool_size=1,
                 pool_steps=2, adversarial=True, **SIZE)
    finally:
        hook.remove()
    start = events.index("load")  # the run's prompts are encoded before the first load
    last, checked = None, 0
    for e in events[start:]:
        if e == "unet":
            assert last != "clip", "the network computed after a CLIP encode without a reload"
            checked += 1
        else:
            last = e
    assert checked and events[start:].count("clip") > 0  # the attack encoded mid-training


def test_adversarial_with_another_objective_is_refused_before_sampling(env):
    """SelfDistillUnlearn(adversarial=True) trains the attack's rows toward the surrogate, which
    only self_distill reads: ESD is refused, naming the fix, before any pool is sampled."""
    from spare_core import init_sparse_lora
    from spare_core.families.unet import adaptable_modules

    host, nodes = env["host"], env["nodes"]
    unet = env["model"].model.diffusion_model
    init = init_sparse_lora(unet, list(adaptable_modules(unet))[5:9], rank=2)
    host.progress.clear()
    with pytest.raises(ValueError, match="objective is 'esd': choose 'self_distill' or switch "
                                         "adversarial off"):
        host.run(nodes["SelfDistillUnlearn"], model=env["model"], clip=env["clip"], adapter=init,
                 concept=CONCEPT, surrogate="a blue square", preserve="a green line", steps=2,
                 lr=1e-2, timestep_sampler="uniform", objective="esd", seed=0, pool_size=1,
                 pool_steps=2, adversarial=True, **SIZE)
    assert host.progress == []  # no pool step, no training step
