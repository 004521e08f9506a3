"""Every SPARE node driven through the ComfyUI test double (tests/comfy_double.py)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from safetensors.torch import load_file

from comfy_double import (REPO, VAE, Host, InterruptProcessingException, ModelType, load_pack,
                          store_weights_as)
from spare_core import Saliency, UnlearnAdapter
from spare_core.files import model_fingerprint
from spare_core.families.unet import adaptable_modules
from spare_core.sparse_lora import IO_CONVS

SIZE = dict(width=64, height=64)  # 8x8 latents, the tiny UNet's sample size
# the tiny UNet has 81 candidate modules (adaptable, less conv_in/conv_out): 0.15 of them is 12
TOP_FRACTION, TOP_COUNT = 0.15, 12
INIT = dict(module_selection="saliency", module_fraction=TOP_FRACTION, rank=2, alpha=2.0,
            mask_fraction=1.0, seed=0)
CONCEPT, SURROGATE = "a red circle", "a blue square"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One host, checkpoint, saliency, initial adapter and trained adapter for the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add contention on a busy machine
    mp = pytest.MonkeyPatch()
    host = Host(str(tmp_path_factory.mktemp("comfy"))).install(mp)
    nodes = load_pack().NODE_CLASS_MAPPINGS
    model, clip = host.load_checkpoint(seed=0)
    (sal,) = host.run(nodes["ComputeSaliency"], model=model, clip=clip, concept=CONCEPT,
                      samples=2, ranking="saliency", seed=0, sample_steps=3, cfg=3.0,
                      element_scores=True, **SIZE)
    (init,) = host.run(nodes["SparseLoRAInit"], model=model, saliency=sal, **INIT)
    # concept left empty, as in the shipped workflow: taken from the adapter's saliency map
    (trained, _loss) = host.run(nodes["SelfDistillUnlearn"], model=model, clip=clip, adapter=init,
                          concept="", surrogate=SURROGATE, preserve="a green line\n\n# note",
                          steps=20, lr=2e-2, timestep_sampler="uniform",
                          objective="self_distill", seed=0, batch_size=2, pool_size=2,
                          pool_steps=3, cfg=3.0, **SIZE)
    yield dict(host=host, nodes=nodes, model=model, clip=clip, sal=sal, init=init, trained=trained,
               loss=_loss)
    mp.undo()
    torch.set_num_threads(threads)


def probe(env, prompt: str, seed: int = 1):
    """Fixed (x_t, t, context) to compare UNet outputs on."""
    g = torch.Generator().manual_seed(seed)
    clip = env["clip"]
    with torch.no_grad():
        ctx = clip.encode_from_tokens(clip.tokenize(prompt))
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300, 700]), ctx.expand(2, -1, -1)


def pack_module(name):
    """The pack's ``nodes.<name>`` module, as imported through the pack."""
    return sys.modules[f"{load_pack().__name__}.nodes.{name}"]


def test_pack_imports_without_comfyui(tmp_path):
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('pack', {os.path.join(REPO, '__init__.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m)\n"
            "assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules\n"
            "print(sorted(m.NODE_CLASS_MAPPINGS))")
    # run from elsewhere: spare_core comes from the environment or the pack's own folder
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ComputeSaliency" in out.stdout and "SelfDistillUnlearn" in out.stdout


def test_mappings_are_consistent(env):
    pack = load_pack()
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        assert callable(getattr(cls, cls.FUNCTION))
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)


def test_saliency_scores_every_weight(env):
    sal, model = env["sal"], env["model"]
    mods = adaptable_modules(model.model.diffusion_model)
    assert isinstance(sal, Saliency) and set(sal.scores) == set(mods)
    for name, s in sal.scores.items():
        assert s.shape == mods[name].weight.shape and (s >= 0).all()
    assert sum(float(s.sum()) for s in sal.scores.values()) > 0
    assert sal.concept == CONCEPT and sal.num_samples == 2 and sal.meta["ranking"] == "saliency"
    assert sal.meta["model_fingerprint"] == model_fingerprint(model.model.diffusion_model)


def test_progress_reaches_the_end(env, tmp_path):
    host, nodes = env["host"], env["nodes"]
    host.progress.clear()
    host.run(nodes["ComputeSaliency"], model=env["model"], clip=env["clip"], concept=CONCEPT,
             samples=2, ranking="saliency", seed=0, sample_steps=3, **SIZE)
    assert host.progress[-1] == (5, 5)  # 3 sampling steps + 2 saliency samples
    values = [v for v, _ in host.progress]
    assert values == sorted(values)


def test_sparse_lora_follows_the_saliency_ranking(env):
    sal, init = env["sal"], env["init"]
    assert isinstance(init, UnlearnAdapter)
    assert init.names == sal.top_modules(fraction=TOP_FRACTION, exclude=IO_CONVS)
    assert len(init.names) == TOP_COUNT
    assert init.meta["module_selection"] == "saliency"
    assert all(init[n].mask is None for n in init.names)
    assert all(float(d.abs().max()) == 0.0 for d in init.merged().values())  # starts as identity
    total = sum(p.numel() for p in env["model"].model.diffusion_model.parameters())
    assert 0 < init.num_trainable() < 0.05 * total
    assert init.meta["base_model_fingerprint"] == model_fingerprint(
        env["model"].model.diffusion_model, init.names)


def test_sparse_lora_mask_fraction_keeps_the_most_salient_elements(env):
    sal = env["sal"]
    (ad,) = env["host"].run(env["nodes"]["SparseLoRAInit"], model=env["model"], saliency=sal,
                            **{**INIT, "mask_fraction": 0.25})
    assert ad.names == env["init"].names
    for n in ad.names:
        mask, scores = ad[n].mask, sal.scores[n]
        kept = float(mask.float().mean())
        assert 0.25 <= kept <= 0.30, (n, kept)
        assert float(scores[mask].min()) >= float(scores[~mask].max())


def test_unlearn_moves_the_concept_prediction(env):
    host, model, nodes, trained = env["host"], env["model"], env["nodes"], env["trained"]
    x, t, c_concept = probe(env, CONCEPT)
    _, _, c_sur = probe(env, SURROGATE)
    target = host.eps(model, x, t, c_sur)
    before = host.eps(model, x, t, c_concept)
    (erased,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=trained, strength=1.0)
    after = host.eps(erased, x, t, c_concept)
    gap_before = float(((before - target) ** 2).mean())
    gap_after = float(((after - target) ** 2).mean())
    assert gap_after < 0.6 * gap_before, (gap_before, gap_after)
    assert trained.meta["concept"] == CONCEPT and trained.meta["objective"] == "self_distill"
    assert trained.meta["preserve"] == '["a green line"]'
    # the input adapter was copied, not trained in place
    assert all(float(d.abs().max()) == 0.0 for d in env["init"].merged().values())


def test_every_listed_objective_trains(env):
    nodes = env["nodes"]
    objectives = nodes["SelfDistillUnlearn"].INPUT_TYPES()["required"]["objective"][0]
    assert objectives[0] == "self_distill" and "siss" not in objectives  # data-unlearning: no
    for name in objectives:
        (ad, _loss) = env["host"].run(nodes["SelfDistillUnlearn"], model=env["model"], clip=env["clip"],
                                adapter=env["init"], concept=CONCEPT, surrogate=SURROGATE,
                                preserve="a green line", steps=2, lr=1e-2,
                                timestep_sampler="uniform", objective=name, seed=0, pool_size=1,
                                pool_steps=2, **SIZE)
        assert ad.meta["objective"] == name
        assert max(float(d.abs().max()) for d in ad.merged().values()) > 0, name


def test_apply_leaves_input_and_other_clones_bit_identical(env):
    host, model, nodes, trained = env["host"], env["model"], env["nodes"], env["trained"]
    x, t, c = probe(env, CONCEPT)
    other = model.clone()
    base = host.eps(model, x, t, c)
    (erased,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=trained, strength=1.0)
    (half,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=trained, strength=0.5)
    patched = host.eps(erased, x, t, c)
    host.eps(half, x, t, c)
    assert not torch.equal(patched, base)
    assert torch.equal(host.eps(model, x, t, c), base)
    assert torch.equal(host.eps(other, x, t, c), base)
    assert model.patches == {} and other.patches == {}
    (same,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=trained, strength=0.0)
    assert same is model
    # the patches equal the adapter attached to the UNet (W + strength * delta)
    unet = model.model.diffusion_model
    host.load(model)
    with torch.no_grad(), trained.applied(unet):
        direct = unet(x, t.float(), context=c)
    torch.testing.assert_close(patched, direct, rtol=1e-4, atol=1e-5)


def test_apply_refuses_an_adapter_for_other_layers_and_patches_nothing(env):
    """An adapter naming a module this MODEL lacks (one module renamed, as in a file made for
    another checkpoint) is refused by the node and by the bridge, naming the module and the
    fix; no clone with part of the update comes back and the input keeps no patch."""
    from spare_core.adapter import UnlearnAdapter

    host, model, nodes, trained = env["host"], env["model"], env["nodes"], env["trained"]
    tensors, meta = trained.to_tensors()
    name = trained.names[-1]
    renamed = {k.replace(name, name + "_elsewhere"): v for k, v in tensors.items()}
    other = UnlearnAdapter.from_tensors(
        renamed, {k: v.replace(f'"{name}"', f'"{name}_elsewhere"') for k, v in meta.items()})
    assert other.names != trained.names
    with pytest.raises(ValueError, match="connect the checkpoint the adapter was trained on"):
        host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=other, strength=1.0)
    with pytest.raises(ValueError, match=f"{name}_elsewhere"):
        pack_module("comfy_bridge").patched_clone(model, other, 1.0)
    assert model.patches == {}


def test_nodes_give_the_model_back_its_own_weight_objects(env):
    """Training needs normal tensors where the checkpoint holds inference tensors; the bridge
    puts aliases in their place for a node's run only. After ComputeSaliency, SparseLoRAInit and
    SelfDistillUnlearn every module of the shared UNet and CLIP holds the very Parameter and
    buffer objects it held before (still inference tensors, values unchanged), so whatever held
    them sees no stale copy: a UNet compiled before the nodes ran (torch.compile, as
    TorchCompileModel does) computes what the eager one does, before and after Apply."""
    host, nodes = env["host"], env["nodes"]
    model, clip = host.load_checkpoint(seed=3)
    unet, encoder = model.model.diffusion_model, clip.encoder

    def held(*modules):
        return {(i, n): t for i, m in enumerate(modules)
                for n, t in [*m.named_parameters(), *m.named_buffers()]}

    before = held(unet, encoder)
    values = {k: t.clone() for k, t in before.items()}
    assert all(t.is_inference() for t in before.values())
    compiled = torch.compile(unet, backend="eager")
    x, t, c = probe(env, CONCEPT)
    (sal,) = host.run(nodes["ComputeSaliency"], model=model, clip=clip, concept=CONCEPT,
                      samples=2, ranking="saliency", seed=0, sample_steps=2, cfg=3.0, **SIZE)
    (init,) = host.run(nodes["SparseLoRAInit"], model=model, saliency=sal, **INIT)
    (trained, _loss) = host.run(nodes["SelfDistillUnlearn"], model=model, clip=clip, adapter=init,
                                concept=CONCEPT, surrogate=SURROGATE, preserve="a green line",
                                steps=2, lr=1e-2, timestep_sampler="uniform",
                                objective="self_distill", seed=0, pool_size=1, pool_steps=2,
                                **SIZE)
    after = held(unet, encoder)
    assert after.keys() == before.keys()
    moved = [k for k in before if after[k] is not before[k]]
    assert not moved, f"{len(moved)} weight objects replaced, e.g. {moved[:3]}"
    assert all(t.is_inference() and torch.equal(t, values[k]) for k, t in after.items())
    (erased,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=trained, strength=1.0)
    for patched in (model, erased):
        host.load(patched)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, t.float(), context=c),
                                       unet(x, t.float(), context=c))
    assert not torch.equal(host.eps(erased, x, t, c), host.eps(model, x, t, c))


def test_training_takes_the_saliency_images_when_it_would_sample_the_same(env, monkeypatch):
    """ComputeSaliency's concept images ride on the SALIENCY and on SparseLoRAInit's adapter;
    SelfDistillUnlearn trains on them when it would sample the same images (concept, steps,
    guidance, size and MODEL), so the node path samples the concept once; asked otherwise, it
    samples its own."""
    import spare_core.tasks as tasks_mod

    host, nodes, model, clip = env["host"], env["nodes"], env["model"], env["clip"]
    drawn, real = [], tasks_mod.sample

    def counted(den, prompts, **kwargs):
        drawn.append(prompts[0])
        return real(den, prompts, **kwargs)

    monkeypatch.setattr(tasks_mod, "sample", counted)
    (sal,) = host.run(nodes["ComputeSaliency"], model=model, clip=clip, concept=CONCEPT,
                      samples=3, ranking="saliency", seed=0, sample_steps=2, cfg=3.0, **SIZE)
    (init,) = host.run(nodes["SparseLoRAInit"], model=model, saliency=sal, **INIT)
    (erased,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=env["trained"],
                         strength=1.0)

    def train(on=model, **kwargs):
        drawn.clear()
        settings = dict(concept=CONCEPT, surrogate=SURROGATE, preserve="a green line", steps=1,
                        lr=1e-2, timestep_sampler="uniform", objective="self_distill", seed=0,
                        pool_size=2, pool_steps=2, cfg=3.0, **SIZE)
        host.run(nodes["SelfDistillUnlearn"], model=on, clip=clip, adapter=init,
                 **{**settings, **kwargs})
        return list(drawn)

    kept = ["a green line", ""]  # the preserved prompt's pool, and the empty prompt's (recipe)
    assert train() == kept  # the concept's 2 images: the first 2 of the saliency's 3
    assert train(pool_size=3) == kept
    assert train(pool_size=4) == [CONCEPT, *kept]  # more than it sampled
    assert train(pool_steps=3) == [CONCEPT, *kept]
    assert train(cfg=5.0) == [CONCEPT, *kept]
    assert train(on=erased) == [CONCEPT, *kept]  # another MODEL (patched) samples others
    assert train(concept="a yellow star") == ["a yellow star", *kept]


def test_fingerprint_ignores_other_clones_patches(env):
    host, model, trained = env["host"], env["model"], env["trained"]
    want = model_fingerprint(model.model.diffusion_model)
    (erased,) = host.run(env["nodes"]["ApplyUnlearnAdapter"], model=model, adapter=trained, strength=3.0)
    host.load(erased)  # the shared UNet now holds the patched weights
    assert pack_module("comfy_bridge").fingerprint(model) == want
    host.load(model)


def test_save_load_round_trip_and_stock_lora_loader(env):
    host, nodes, model, trained = env["host"], env["nodes"], env["model"], env["trained"]
    (name,) = host.run(nodes["SaveUnlearnAdapter"], adapter=trained,
                       filename_prefix="spare/circle", keep_native=True)
    assert name == "spare/circle_00001_.safetensors"
    native = "spare/circle_00001_.spare.safetensors"
    assert os.path.isfile(os.path.join(host.loras, native))
    assert not [f for f in os.listdir(os.path.join(host.loras, "spare")) if f.startswith(".tmp")]
    assert nodes["LoadUnlearnAdapter"].INPUT_TYPES()["required"]["adapter_name"][0] == [native]
    (loaded,) = host.run(nodes["LoadUnlearnAdapter"], adapter_name=native)
    assert loaded.names == trained.names and loaded.meta["concept"] == CONCEPT
    for n in trained.names:
        assert torch.equal(loaded.merged()[n], trained.merged()[n])
    # the LoRA file: every key resolves in LoraLoader and gives ApplyUnlearnAdapter's outputs
    lora = load_file(os.path.join(host.loras, name))
    x, t, c = probe(env, CONCEPT)
    (applied,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=loaded, strength=0.7)
    via_lora = host.load_lora(model, lora, 0.7)
    assert host.warnings == []
    torch.testing.assert_close(host.eps(via_lora, x, t, c), host.eps(applied, x, t, c),
                               rtol=1e-4, atol=1e-5)
    (again,) = host.run(nodes["SaveUnlearnAdapter"], adapter=trained,
                        filename_prefix="spare/circle", keep_native=False)
    assert again == "spare/circle_00002_.safetensors"
    assert not os.path.exists(os.path.join(host.loras, "spare/circle_00002_.spare.safetensors"))


def test_a_files_own_strength_multiplies_the_nodes(env):
    """A native file saved from the API at strength 0.5, applied at node strength 2, patches the
    model as the trained adapter at 1: the file's strength times the node's (the tooltip says so)."""
    from spare_core.files import save_adapter

    host, nodes, model, trained = env["host"], env["nodes"], env["model"], env["trained"]
    half = os.path.join(host.loras, "half.spare.safetensors")
    loaded = copy.deepcopy(trained)
    loaded.strength = 0.5
    save_adapter(loaded, half)
    try:
        (back,) = host.run(nodes["LoadUnlearnAdapter"], adapter_name="half.spare.safetensors")
        assert back.strength == 0.5
        x, t, c = probe(env, CONCEPT)
        (doubled,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=back, strength=2.0)
        (plain,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=trained, strength=1.0)
        torch.testing.assert_close(host.eps(doubled, x, t, c), host.eps(plain, x, t, c),
                                   rtol=1e-4, atol=1e-5)
        assert "file's strength times this one" in nodes["ApplyUnlearnAdapter"].INPUT_TYPES()[
            "required"]["strength"][1]["tooltip"]
    finally:
        os.remove(half)


def test_element_masked_adapter_saves_full_difference_keys(env):
    host, nodes, model = env["host"], env["nodes"], env["model"]
    (ad,) = host.run(nodes["SparseLoRAInit"], model=model, saliency=env["sal"],
                     **{**INIT, "mask_fraction": 0.5})
    with torch.no_grad():
        for n in ad.names:
            ad[n].lora_B.normal_()
    (name,) = host.run(nodes["SaveUnlearnAdapter"], adapter=ad, filename_prefix="masked",
                       keep_native=False)
    lora = load_file(os.path.join(host.loras, name))
    assert all(k.endswith(".diff") for k in lora) and len(lora) == len(ad.names)
    x, t, c = probe(env, CONCEPT)
    (applied,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=ad, strength=1.0)
    torch.testing.assert_close(host.eps(host.load_lora(model, lora), x, t, c),
                               host.eps(applied, x, t, c), rtol=1e-4, atol=1e-5)
    assert host.warnings == []


def test_preview_image(env):
    (img,) = env["host"].run(env["nodes"]["SaliencyPreview"], saliency=env["sal"],
                             reduce="max", max_modules=10)
    assert img.dtype == torch.float32 and img.shape == (1, 28 + 16 * 10 + 8, 900, 3)
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    orange = ((img[0, ..., 0] > 0.8) & (img[0, ..., 1] < 0.5) & (img[0, ..., 2] < 0.3)).sum()
    assert int(orange) > 0  # the top module_fraction of the modules are highlighted


def test_context_lengths_are_repeated_without_changing_attention(env):
    bridge_mod = pack_module("comfy_bridge")
    model, clip = env["model"], env["clip"]
    long = "a very long prompt that needs a second chunk of tokens"
    with bridge_mod.autograd_enabled():
        bridge_mod.load_for_compute(model)
        den = bridge_mod.ComfyDenoiser(model, clip, 64, 64, prompts=[CONCEPT, long])
        ctx = den.encode([CONCEPT, long])
        assert ctx.shape[1] == 64  # two 32-token chunks; the short prompt is repeated
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        one = den.eps(x, t, den._encode_one(CONCEPT))
        two = den.eps(x, t, ctx[:1])
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="not announced"):
        den.encode(["a prompt that is long enough to need three chunks of thirty characters each"])


def test_v_prediction_is_converted_to_eps(env):
    bridge_mod = pack_module("comfy_bridge")
    model, clip = env["host"].load_checkpoint(seed=0, model_type=ModelType.V_PREDICTION)
    with bridge_mod.autograd_enabled(), torch.no_grad():
        den = bridge_mod.ComfyDenoiser(model, clip, 64, 64)
        x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([400]), den.encode([""])
        v = model.model.diffusion_model(x, t.float(), context=c)
        a = den.alphas_cumprod[400]
        torch.testing.assert_close(den.eps(x, t, c), a.sqrt() * v + (1 - a).sqrt() * x)


# ---------------------------------------------------------------- errors and interrupts

def _expect(env, node, match, **inputs):
    host = env["host"]
    host.progress.clear()
    loaded = len(host.loaded)
    with pytest.raises(ValueError, match=match):
        host.run(env["nodes"][node], **inputs)
    assert host.progress == [] and len(host.loaded) == loaded, "error raised after work started"


def test_bad_inputs_fail_early_with_the_fix(env):
    m, c, sal, ad = env["model"], env["clip"], env["sal"], env["init"]
    sal_args = dict(model=m, clip=c, samples=2, ranking="saliency", seed=0, **SIZE)
    _expect(env, "ComputeSaliency", "concept prompt is empty", concept="  ", **sal_args)
    _expect(env, "ComputeSaliency", "CLIP input is empty",
            **{**sal_args, "clip": None, "concept": CONCEPT})
    _expect(env, "ComputeSaliency", "multiples of 8",
            **{**sal_args, "concept": CONCEPT, "width": 68})
    flow, _ = env["host"].load_checkpoint(model_type=ModelType.FLOW)
    _expect(env, "ComputeSaliency", "eps and v-prediction",
            **{**sal_args, "model": flow, "concept": CONCEPT})
    init_args = dict(model=m, saliency=sal, **INIT)
    for bad in (0.0, 1.5):
        _expect(env, "SparseLoRAInit", r"mask_fraction must be in \(0, 1\] \(1 = dense",
                **{**init_args, "mask_fraction": bad})
    _expect(env, "SparseLoRAInit", r"module_fraction must be in \(0, 1\]",
            **{**init_args, "module_fraction": 0.0})
    _expect(env, "SparseLoRAInit", "alpha must be >= 0", **{**init_args, "alpha": -1.0})
    other, _ = env["host"].load_checkpoint(channels=(8, 16))
    _expect(env, "SparseLoRAInit", "different layer", **{**init_args, "model": other})
    _expect(env, "ApplyUnlearnAdapter", "different layer", model=other, adapter=ad, strength=1.0)
    _expect(env, "ApplyUnlearnAdapter", "adapter input is empty", model=m, adapter=None,
            strength=1.0)
    un = dict(model=m, clip=c, adapter=ad, concept=CONCEPT, surrogate=SURROGATE, preserve="",
              steps=2, lr=1e-3, timestep_sampler="uniform", objective="self_distill", seed=0,
              **SIZE)
    _expect(env, "SelfDistillUnlearn", "surrogate equals the concept",
            **{**un, "surrogate": CONCEPT.upper()})
    _expect(env, "SelfDistillUnlearn", "also listed as a preserved",
            **{**un, "preserve": f"a tree\n{CONCEPT}"})
    no_concept = UnlearnAdapter.from_tensors(*ad.to_tensors())
    del no_concept.meta["concept"]
    _expect(env, "SelfDistillUnlearn", "concept prompt is empty",
            **{**un, "concept": "", "adapter": no_concept})
    _expect(env, "SelfDistillUnlearn", "lr must be", **{**un, "lr": 0.0})
    _expect(env, "SelfDistillUnlearn", "different layer", **{**un, "model": other})
    _expect(env, "SaveUnlearnAdapter", "prefix is empty", adapter=ad, filename_prefix=" ",
            keep_native=True)
    with pytest.raises(ValueError, match="unknown objective"):
        env["nodes"]["SelfDistillUnlearn"]().run(**{**un, "objective": "nope"})


def test_load_errors_name_the_fix(env):
    host, nodes = env["host"], env["nodes"]
    with pytest.raises(ValueError, match="not in the loras folder"):
        nodes["LoadUnlearnAdapter"]().load("gone.spare.safetensors")
    bad = os.path.join(host.loras, "broken.spare.safetensors")
    with open(bad, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    try:
        with pytest.raises(ValueError, match="truncated or not a safetensors"):
            host.run(nodes["LoadUnlearnAdapter"], adapter_name="broken.spare.safetensors")
    finally:
        os.remove(bad)


@pytest.mark.parametrize("lie,match", [
    ("nan", r"lying\.spare\.safetensors.*holds 1 NaN and 0 inf values.*re-save the adapter"),
    ("inf", r"lying\.spare\.safetensors.*holds 0 NaN and 1 inf values.*re-save the adapter"),
    ("strength=1e308", r"lying\.spare\.safetensors.*strength '1e308' is outside \[-10, 10\]"
                       r".*back to 1\.0")])
def test_load_refuses_files_that_lie(env, lie, match):
    """A native file edited by hand (NaN or inf in a tensor, an absurd strength) is refused by
    LoadUnlearnAdapter with its name and the fix, before any adapter reaches a model."""
    from safetensors.torch import save_file

    host, trained = env["host"], env["trained"]
    from spare_core.files import read_safetensors, save_adapter
    good = os.path.join(host.loras, "good.spare.safetensors")
    bad = os.path.join(host.loras, "lying.spare.safetensors")
    save_adapter(trained, good)
    try:
        tensors, meta = read_safetensors(good)
        if lie.startswith("strength="):
            meta["strength"] = lie.split("=", 1)[1]
        else:
            key = next(k for k in sorted(tensors) if k.endswith(".lora_B"))
            tensors[key].view(-1)[0] = float(lie)
        save_file(tensors, bad, metadata=meta)
        assert "lying.spare.safetensors" in env["nodes"]["LoadUnlearnAdapter"].INPUT_TYPES()[
            "required"]["adapter_name"][0]
        _expect(env, "LoadUnlearnAdapter", match, adapter_name="lying.spare.safetensors")
        (ok,) = env["host"].run(env["nodes"]["LoadUnlearnAdapter"],
                                adapter_name="good.spare.safetensors")
        assert ok.names == trained.names  # the unedited file still loads
    finally:
        for p in (good, bad):
            if os.path.exists(p):
                os.remove(p)


def _assert_untouched(env, base):
    host, model = env["host"], env["model"]
    unet = model.model.diffusion_model
    assert not any(hasattr(mod, "parametrizations") for mod in unet.modules())
    assert torch.equal(host.eps(model, *probe(env, CONCEPT)), base)


def test_interrupt_during_unlearning_leaves_model_and_files(env):
    host, nodes, model = env["host"], env["nodes"], env["model"]
    base = host.eps(model, *probe(env, CONCEPT))
    files = sorted(os.listdir(host.loras))
    host.interrupt_after(5)  # past the 3 pool updates, inside the training steps
    with pytest.raises(InterruptProcessingException):
        host.run(nodes["SelfDistillUnlearn"], model=model, clip=env["clip"], adapter=env["init"],
                 concept=CONCEPT, surrogate=SURROGATE, preserve="", steps=50, lr=1e-2,
                 timestep_sampler="uniform", objective="self_distill", seed=0, pool_size=1,
                 pool_steps=3, **SIZE)
    assert 3 < len(host.progress) and host.progress[-1][0] < 53
    _assert_untouched(env, base)
    assert sorted(os.listdir(host.loras)) == files
    assert all(float(d.abs().max()) == 0.0 for d in env["init"].merged().values())


def test_interrupt_during_saliency(env):
    host, nodes, model = env["host"], env["nodes"], env["model"]
    base = host.eps(model, *probe(env, CONCEPT))
    flags = [p.requires_grad for p in model.model.diffusion_model.parameters()]
    host.interrupt_after(2)  # during the generation of the concept images
    with pytest.raises(InterruptProcessingException):
        host.run(nodes["ComputeSaliency"], model=model, clip=env["clip"], concept=CONCEPT,
                 samples=4, ranking="saliency", seed=0, sample_steps=4, **SIZE)
    _assert_untouched(env, base)
    assert [p.requires_grad for p in model.model.diffusion_model.parameters()] == flags


def _images(kind: str, n: int, seed: int) -> torch.Tensor:
    """IMAGE batches ``[n, 64, 64, 3]`` in [0, 1]: ``pattern`` repeats one fixed image (a
    memorized training image), ``random`` draws independent ones (the data to keep)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "pattern":
        return torch.rand(1, 64, 64, 3, generator=g).expand(n, -1, -1, -1).clone()
    return torch.rand(n, 64, 64, 3, generator=g)


def _denoising_loss(host, model, latents, clip) -> float:
    """Mean eps-prediction error on ``latents`` at fixed noise and timesteps (empty prompt)."""
    from spare_core.sampling import q_sample
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([100, 300, 500, 700][: len(latents)])
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0).float()
    x_t = q_sample(latents, t, noise, ac)
    with torch.no_grad():
        ctx = clip.encode_from_tokens(clip.tokenize("")).expand(len(latents), -1, -1)
    return float(((host.eps(model, x_t, t, ctx) - noise) ** 2).mean())


@pytest.mark.parametrize("method,parameterization",
                         [("siss", "lora"), ("erasediff", "full"), ("neggrad", "lora")])
def test_data_unlearn_forgets_the_images_and_leaves_the_model(env, method, parameterization):

    host, model, nodes, clip = env["host"], env["model"], env["nodes"], env["clip"]
    vae = VAE()
    forget, keep = _images("pattern", 2, 0), _images("random", 4, 1)
    lat = lambda imgs: model.model.process_latent_in(vae.encode(imgs))  # noqa: E731
    x, t, c = probe(env, "")
    base = host.eps(model, x, t, c)
    before = (_denoising_loss(host, model, lat(forget), clip), _denoising_loss(host, model, lat(keep), clip))
    n_updates = len(host.progress)
    (ad, _loss) = host.run(nodes["DataUnlearn"], model=model, clip=clip, vae=vae, forget_images=forget,
                     keep_images=keep, method=method, steps=8, lr=5e-3,
                     parameterization=parameterization, seed=0, rank=4, batch_size=2,
                     early_stop_every=0)  # every step: these images were never memorised
    assert _loss.shape[0] == 1 and len(_line_rows(_loss, pack_module("chart").LOSS)) > 100
    assert ad.meta["method"] == method and ad.meta["parameterization"] == parameterization
    assert len(host.progress) - n_updates >= 8 and host.progress[-1] == (8, 8)
    assert torch.equal(host.eps(model, x, t, c), base)  # the input MODEL is untouched
    (erased,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=ad, strength=1.0)
    after = (_denoising_loss(host, erased, lat(forget), clip), _denoising_loss(host, erased, lat(keep), clip))
    if method == "neggrad":  # gradient ascent on the forget images only: their error rises
        assert after[0] > 1.1 * before[0], (before, after)  # (and the keep images' with it)
    else:  # forgetting with a keep term: the forget images' error grows relative to the keep
        # images' (on this untrained model the keep term lowers both; measured for SISS: error
        # ratios 0.96 forget vs 0.91 keep)
        assert after[0] / before[0] > 1.03 * after[1] / before[1], (before, after)


def test_data_unlearn_early_stop_reaches_the_engine(env):
    """The node's early stop (on by default) runs the probe: on images the model never
    memorised it may stop before the budget; the adapter says where, and the bar ends full."""
    host, model, nodes, clip = env["host"], env["model"], env["nodes"], env["clip"]
    forget, keep = _images("pattern", 2, 0), _images("random", 4, 1)
    (ad, _loss) = host.run(nodes["DataUnlearn"], model=model, clip=clip, vae=VAE(), forget_images=forget,
                     keep_images=keep, method="siss", steps=6, lr=5e-3, parameterization="lora",
                     seed=0, rank=2, batch_size=2, early_stop_every=2)
    stopped = ad.meta["stopped_at"]
    assert int(ad.meta["steps_trained"]) == (6 if stopped == "None" else int(stopped))
    assert host.progress[-1] == (6, 6)


def test_data_unlearn_bad_inputs_name_the_fix(env):

    host, model, nodes, clip = env["host"], env["model"], env["nodes"], env["clip"]
    common = dict(model=model, clip=clip, method="siss", steps=2, lr=0.0,
                  parameterization="lora", seed=0)
    with pytest.raises(ValueError, match="scale both to the same size"):
        host.run(nodes["DataUnlearn"], vae=VAE(), forget_images=_images("pattern", 1, 0),
                 keep_images=torch.rand(2, 32, 32, 3), **common)
    with pytest.raises(ValueError, match="connect the VAE output"):
        host.run(nodes["DataUnlearn"], vae=None, forget_images=_images("pattern", 1, 0),
                 keep_images=_images("random", 2, 1), **common)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        host.run(nodes["DataUnlearn"], vae=VAE(), forget_images=torch.rand(1, 60, 60, 3),
                 keep_images=torch.rand(2, 60, 60, 3), **common)


# ---------------------------------------------------------------- save prefixes, chart legend, strength

ESCAPES = ["../escape", "spare/../../escape", "/tmp/spare_escape/x", " ../escape "]


def _files_under(folder):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)


def test_save_prefix_outside_the_loras_folder_is_refused_with_the_fix(env):
    """ComfyUI's folder_paths.get_save_image_path raises a bare Exception for these prefixes;
    the node refuses them first, naming the folder and a prefix that works."""
    import folder_paths  # the host's (the double's, installed by ``env``)

    host, nodes, ad = env["host"], env["nodes"], env["trained"]
    base = os.path.dirname(os.path.dirname(host.loras))
    before = _files_under(base)
    for prefix in ESCAPES:
        with pytest.raises(Exception, match="outside the output folder is not allowed"):
            folder_paths.get_save_image_path(prefix.strip(), os.path.abspath(host.loras))
        _expect(env, "SaveUnlearnAdapter", r"points outside models/loras.*'spare/erased_concept'",
                adapter=ad, filename_prefix=prefix, keep_native=True)
    for prefix in ("./", "..", "spare/.."):  # the host would write '._00001_' or '.._00001_'
        _expect(env, "SaveUnlearnAdapter", "names no file", adapter=ad, filename_prefix=prefix,
                keep_native=True)
    assert _files_under(base) == before and not os.path.exists("/tmp/spare_escape")
    # '..' that stays inside the folder is what the host accepts too
    (name,) = host.run(nodes["SaveUnlearnAdapter"], adapter=ad, filename_prefix="spare/../inside",
                       keep_native=False)
    assert name == "inside_00001_.safetensors"
    assert os.path.isfile(os.path.join(host.loras, name))
    os.remove(os.path.join(host.loras, name))


def test_host_refusal_of_a_save_path_becomes_a_clear_error(env, monkeypatch):
    """Should the host refuse a prefix the node's own check let through, the host's bare
    Exception still reaches the user as the node's ValueError with the fix."""
    file_nodes = pack_module("file_nodes")
    monkeypatch.setattr(file_nodes, "check_prefix", lambda prefix: None)
    with pytest.raises(ValueError, match="points outside models/loras") as err:
        env["host"].run(env["nodes"]["SaveUnlearnAdapter"], adapter=env["trained"],
                        filename_prefix="../escape", keep_native=True)
    assert "outside the output folder" in str(err.value.__cause__)


def test_preview_greys_the_never_adapted_io_convolutions(env):
    """The input/output convolutions are often the most salient modules, and SparseLoRAInit never
    adapts them: their bars are grey, the top module_fraction adapted ones orange, and the
    caption says so."""
    sal, host, preview = env["sal"], env["host"], env["nodes"]["SaliencyPreview"]
    stats = {n: dict(s) for n, s in sal.stats.items()}
    io = [n for n in stats if n in IO_CONVS]
    assert len(io) == 2, io  # conv_in, conv_out
    top = max(s["mean"] for s in stats.values())
    for i, n in enumerate(io):
        stats[n]["mean"] = top * (3 - i)  # the two highest bars
    loud = Saliency(scores=sal.scores, concept=sal.concept, num_samples=sal.num_samples,
                    meta=dict(sal.meta), stats=stats)
    (img,) = host.run(preview, saliency=loud, reduce="mean", max_modules=16,
                      module_fraction=TOP_FRACTION)
    chart = pack_module("chart")
    head, row, bar_x = 28, 16, int(900 * 0.45) + 2

    def bar_color(image, i):
        return tuple(int(v) for v in (image[0, head + i * row + row // 2, bar_x] * 255).round())

    assert [bar_color(img, i) for i in range(2)] == [chart.EXCLUDED] * 2
    colors = [bar_color(img, i) for i in range(2, 16)]
    adapted = len(loud.top_modules(fraction=TOP_FRACTION, exclude=IO_CONVS))
    assert adapted == TOP_COUNT
    assert colors[:adapted] == [chart.HIGHLIGHT] * adapted  # the next module_fraction: adapted
    assert set(colors[adapted:]) == {chart.BAR}
    assert (loud.top_modules(count=adapted, exclude=IO_CONVS)
            == loud.top_modules(count=adapted + 2)[2:])
    caption = preview.caption(sal.concept, "mean", len(stats), adapted, True)
    assert "orange: the 12 adapted" in caption and "grey: input/output conv, never adapted" in caption
    assert "grey" not in preview.caption(sal.concept, "mean", len(stats), adapted, False)
    from PIL import Image, ImageDraw, ImageFont
    draw = ImageDraw.Draw(Image.new("RGB", (900, 30)))
    assert chart._fit(draw, ImageFont.load_default(), caption, 900 - 16) == caption  # not cut
    # one bar: conv_in alone, still grey
    (one,) = host.run(preview, saliency=loud, reduce="mean", max_modules=1)
    assert bar_color(one, 0) == chart.EXCLUDED


def _line_rows(image, color) -> dict[int, float]:
    """Per pixel column, the mean row of ``color`` in a ComfyUI IMAGE ``[1, H, W, 3]``."""
    px = (image[0] * 255).round().to(torch.int16)
    hit = (px == torch.tensor(color, dtype=torch.int16)).all(-1)  # [H, W]
    rows = torch.arange(hit.shape[0], dtype=torch.float32)[:, None].expand_as(hit)
    return {int(x): float(rows[:, x][hit[:, x]].mean()) for x in hit.any(0).nonzero().flatten()}


def test_self_distill_returns_its_loss_as_an_image(env):
    """The second output is the loss chart of the run that trained the adapter: an IMAGE with
    the smoothed loss line and its forget and preserve terms drawn."""
    chart, img = pack_module("chart"), env["loss"]
    assert img.dim() == 4 and img.shape[0] == 1 and img.shape[-1] == 3
    assert img.dtype == torch.float32 and 0.0 <= float(img.min()) <= float(img.max()) <= 1.0
    assert len(_line_rows(img, chart.LOSS)) > 100  # the smoothed line spans the plot
    for term in range(2):  # forget, preserve
        assert len(_line_rows(img, chart.TERM_COLORS[term])) > 50


def test_loss_chart_draws_a_falling_loss_falling_and_says_when_nothing_ran():
    chart = pack_module("chart")
    falling = {"loss": [1.0 / (1 + i) for i in range(50)], "terms": [{"forget": 1.0}] * 50}
    img = chart.to_image_tensor(chart.loss_chart([("c", falling)], title="t"))
    rows = _line_rows(img, chart.LOSS)
    first, last = rows[min(rows)], rows[max(rows)]
    assert last > first + 100  # image rows grow downward: the line ends far lower
    # two runs (a list trained per concept): a grey separator between their panels
    two = chart.to_image_tensor(chart.loss_chart([("a", falling), ("b", falling)]))
    assert len(_line_rows(two, chart.SEPARATOR)) >= 1
    assert chart.smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no start bias
    empty = chart.loss_chart([("siss", {"loss": [], "terms": []})], title="stopped")
    assert empty.shape == (384, 768, 3)  # drawn (a blank plot with the reason), not an error


def test_apply_strength_says_it_extrapolates_past_one(env):
    spec = env["nodes"]["ApplyUnlearnAdapter"].INPUT_TYPES()["required"]["strength"][1]
    assert spec["default"] == 1.0 and spec["min"] == -2.0 and spec["max"] == 2.0
    assert "extrapolates" in spec["tooltip"] and "Above 1" in spec["tooltip"]


def test_saliency_memory_controls_keep_the_ranking(env):
    """Per-module scores only (the node's default; no per-weight buffer anywhere): with one
    micro-batch for the samples they are the float32 per-element run's module scores; at the
    default micro-batch 1 each sample's gradient is reduced at once (its mean magnitude, summed),
    which ranks the top modules alike. No element scores are kept, and an element mask
    (mask_fraction < 1) that needs them is refused with the fix."""
    host, nodes, model, clip, full = env["host"], env["nodes"], env["model"], env["clip"], env["sal"]
    run = dict(model=model, clip=clip, concept=CONCEPT, samples=2, ranking="saliency", seed=0,
               sample_steps=3, cfg=3.0, **SIZE)
    (whole,) = host.run(nodes["ComputeSaliency"], micro_batch=2, **run)
    (lean,) = host.run(nodes["ComputeSaliency"], **run)
    assert not lean.has_elements and set(lean.modules) == set(whole.modules) == set(full.modules)
    for name, st in whole.stats.items():
        assert st["mean"] == pytest.approx(full.stats[name]["mean"], rel=1e-4, abs=1e-12), name
        assert lean.stats[name]["mean"] >= st["mean"] * (1 - 1e-4), name
    assert whole.top_modules(TOP_COUNT) == full.top_modules(TOP_COUNT)
    assert len(set(lean.top_modules(TOP_COUNT)) & set(full.top_modules(TOP_COUNT))) >= 0.75 * TOP_COUNT
    with pytest.raises(ValueError, match="turn on element_scores"):
        host.run(nodes["SparseLoRAInit"], model=model, saliency=lean,
                 **{**INIT, "mask_fraction": 0.5})


def test_fp8_weights_compute_saliency_and_train_lora_in_bf16(env):
    """A UNet stored in float8 and computed in bfloat16 (ComfyUI's manual cast): ComputeSaliency
    gives the element scores of the same values held in bfloat16, bit for bit (each layer's
    weight gradient read from the bf16 copy its cast makes), the stored fp8 weights untouched;
    LoRA training runs."""
    host, nodes, clip = env["host"], env["nodes"], env["clip"]
    model, _ = host.load_checkpoint(seed=0)
    ref, _ = host.load_checkpoint(seed=0)
    store_weights_as(ref, torch.float8_e4m3fn, torch.bfloat16)
    for m in ref.model.diffusion_model.modules():  # the same fp8 values, held in bf16
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight = nn.Parameter(m.weight.to(torch.bfloat16), requires_grad=False)
    store_weights_as(model, torch.float8_e4m3fn, torch.bfloat16)
    stored = {n: p.detach().clone() for n, p in model.model.diffusion_model.named_parameters()}
    sal = [host.run(nodes["ComputeSaliency"], model=m, clip=clip, concept=CONCEPT, samples=2,
                    ranking="saliency", seed=0, sample_steps=3, cfg=3.0, element_scores=True,
                    **SIZE)[0] for m in (model, ref)]
    assert set(sal[0].scores) == set(sal[1].scores) and len(sal[0].scores) > 10
    for k in sal[0].scores:
        assert torch.equal(sal[0].scores[k], sal[1].scores[k]), k
    assert all(float(v.sum()) > 0 for v in sal[0].scores.values())
    after = dict(model.model.diffusion_model.named_parameters())
    assert list(after) == list(stored)  # same names, same order
    for n, p in after.items():  # same values, still stored in fp8, no gradient left
        assert p.dtype == stored[n].dtype and p.grad is None, n
        assert torch.equal(p.detach().view(torch.uint8), stored[n].view(torch.uint8)), n
    (trained, _loss) = host.run(nodes["SelfDistillUnlearn"], model=model, clip=clip, adapter=env["init"],
                          concept="", surrogate=SURROGATE, preserve="", steps=3, lr=1e-2,
                          timestep_sampler="uniform", objective="self_distill", seed=0,
                          batch_size=2, pool_size=2, pool_steps=2, cfg=3.0, **SIZE)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in trained.parameters())
    assert any(float(trained[n].lora_B.detach().abs().sum()) > 0 for n in trained.names)


def test_full_weight_data_unlearn_refused_when_it_cannot_fit(env, monkeypatch):
    host, nodes, model, clip = env["host"], env["nodes"], env["model"], env["clip"]
    images = torch.rand(2, 64, 64, 3)
    monkeypatch.setattr(host, "free_memory", 1 << 20)  # 1 MB free
    with pytest.raises(ValueError, match="only 0.00 GB is free; choose parameterization 'lora'"):
        host.run(nodes["DataUnlearn"], model=model, clip=clip, vae=VAE(), forget_images=images,
                 keep_images=images, method="siss", steps=1, lr=0.0, parameterization="full",
                 seed=0)


def test_esd_objective_skips_the_preserve_pools_and_says_the_surrogate_is_unused(env, caplog):
    host, nodes, model, clip = env["host"], env["nodes"], env["model"], env["clip"]
    host.progress.clear()
    with caplog.at_level("WARNING"):
        (ad, _loss) = host.run(nodes["SelfDistillUnlearn"], model=model, clip=clip, adapter=env["init"],
                         concept="", surrogate=SURROGATE, preserve="a green line\nthe sea",
                         steps=2, lr=1e-2, timestep_sampler="uniform", objective="esd", seed=0,
                         batch_size=2, pool_size=2, pool_steps=3, cfg=3.0, **SIZE)
    # the concept's pool is ComputeSaliency's (sampled alike), no preserve pools: the 2 steps
    assert host.progress[-1] == (2, 2)
    assert "ignores the surrogate" in caplog.text and "not sampled" in caplog.text
    assert ad.meta["surrogate"] == "" and ad.meta["objective"] == "esd"


def test_uce_erase_node_moves_the_concept_to_its_guide(env):
    """UCEErase: closed form, no training; the patched model reads the concept as the guide,
    the input MODEL is untouched, and the adapter saves as a LoRA the loader applies exactly."""
    from spare_core.export import to_comfy_lora

    host, model, nodes = env["host"], env["model"], env["nodes"]
    x, t, c_concept = probe(env, CONCEPT)
    _, _, c_guide = probe(env, SURROGATE)
    base, guide = host.eps(model, x, t, c_concept), host.eps(model, x, t, c_guide)
    (ad,) = host.run(nodes["UCEErase"], model=model, clip=env["clip"],
                     concepts=f"{CONCEPT}\n\n# a note", guides=SURROGATE,
                     preserve="a green line\na yellow dot", preserve_scale=1.0, lamb=0.5)
    assert ad.names and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in ad.names)
    assert ad.meta["method"] == "uce" and ad.meta["base_model_fingerprint"]
    (erased,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=ad, strength=1.0)
    after = host.eps(erased, x, t, c_concept)
    # UCE maps the tail from the last word token on (as on diffusers: test_uce.py); the tiny
    # character tokenizer spreads the words over tokens before it, which keep their keys
    assert (after - guide).norm() < 0.75 * (base - guide).norm()
    assert torch.equal(host.eps(model, x, t, c_concept), base) and model.patches == {}
    lora = host.load_lora(model, to_comfy_lora(ad))
    torch.testing.assert_close(host.eps(lora, x, t, c_concept), after, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="2 concepts but 3 guides"):
        host.run(nodes["UCEErase"], model=model, clip=env["clip"], concepts="a\nb",
                 guides="x\ny\nz", preserve="", preserve_scale=1.0, lamb=0.5)


def test_several_concepts_one_per_line_are_erased_in_one_adapter(env):
    """ComputeSaliency and SelfDistillUnlearn take one concept per line (and one surrogate per
    line): the saliency sums over both concepts' images, progress counts them, and the trained
    adapter moves each concept toward its own surrogate."""
    host, nodes, model, clip = env["host"], env["nodes"], env["model"], env["clip"]
    concepts, surrogates = f"{CONCEPT}\n\n{SURROGATE}", "a green line\na yellow dot"
    host.progress.clear()
    (sal,) = host.run(nodes["ComputeSaliency"], model=model, clip=clip, concept=concepts,
                      samples=2, ranking="saliency", seed=0, sample_steps=3, cfg=3.0, **SIZE)
    assert host.progress[-1] == (7, 7)  # 3 sampling steps + 2 x 2 saliency samples
    assert sal.concept == f"{CONCEPT}\n{SURROGATE}" and sal.num_samples == 4
    (init,) = host.run(nodes["SparseLoRAInit"], model=model, saliency=sal, **INIT)
    (ad, _loss) = host.run(nodes["SelfDistillUnlearn"], model=model, clip=clip, adapter=init,
                     concept="", surrogate=surrogates, preserve="a purple star", steps=30,
                     lr=2e-2, timestep_sampler="uniform", objective="self_distill", seed=0,
                     batch_size=2, pool_size=2, pool_steps=3, cfg=3.0, **SIZE)
    (erased,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=ad, strength=1.0)
    for concept, sur in ((CONCEPT, "a green line"), (SURROGATE, "a yellow dot")):
        x, t, c = probe(env, concept)
        target = host.eps(model, x, t, probe(env, sur)[2])
        gap = [float(((host.eps(m, x, t, c) - target) ** 2).mean()) for m in (model, erased)]
        assert gap[1] < 0.7 * gap[0], (concept, gap)
    with pytest.raises(ValueError, match="2 concepts but 3 guides"):
        host.run(nodes["SelfDistillUnlearn"], model=model, clip=clip, adapter=init,
                 concept=concepts, surrogate="a\nb\nc", preserve="", steps=1, lr=1e-2,
                 timestep_sampler="uniform", objective="self_distill", seed=0, **SIZE)


# -------------------------------------------------------- module selections, rankings, guidance

def _no_build(env, monkeypatch):
    """Makes SparseLoRAInit's selection and LoRA construction fail the test if they run."""
    adapter_nodes = pack_module("adapter_nodes")

    def built(*args, **kwargs):
        raise AssertionError("SparseLoRAInit selected or built modules before refusing")
    monkeypatch.setattr(adapter_nodes, "select_modules", built)
    monkeypatch.setattr(adapter_nodes, "sparse_lora_on", built)


def test_fixed_selections_need_no_saliency(env):
    """text_kv adapts exactly the cross-attention to_k / to_v projections, all every adaptable
    module but the input/output convolutions; neither needs a SALIENCY nor reads module_fraction."""
    from spare_core.localize import select_modules

    host, nodes, model = env["host"], env["nodes"], env["model"]
    net = model.model.diffusion_model
    want = select_modules(net, "text_kv")
    assert want and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in want)
    for fraction in (TOP_FRACTION, 1.0):
        (kv,) = host.run(nodes["SparseLoRAInit"], model=model,
                         **{**INIT, "module_selection": "text_kv", "module_fraction": fraction})
        assert kv.names == want
    assert kv.meta["module_selection"] == "text_kv" and kv.meta["concept"] == ""
    assert all(float(d.abs().max()) == 0.0 for d in kv.merged().values())  # starts as identity
    (every,) = host.run(nodes["SparseLoRAInit"], model=model,
                        **{**INIT, "module_selection": "all"})
    assert set(every.names) == set(adaptable_modules(net)) - set(IO_CONVS)
    assert len(every.names) == len(adaptable_modules(net)) - 2  # conv_in, conv_out left out
    assert every.names == select_modules(net, "all")
    # a SALIENCY connected anyway changes nothing for a fixed selection
    (kv_sal,) = host.run(nodes["SparseLoRAInit"], model=model, saliency=env["sal"],
                         **{**INIT, "module_selection": "text_kv"})
    assert kv_sal.names == want and kv_sal.meta["concept"] == CONCEPT


def test_random_selection_draws_module_fraction_of_the_candidates_by_seed(env):
    host, nodes, model = env["host"], env["nodes"], env["model"]
    args = {**INIT, "module_selection": "random"}
    (a,) = host.run(nodes["SparseLoRAInit"], model=model, **args)
    (b,) = host.run(nodes["SparseLoRAInit"], model=model, **args)
    (c,) = host.run(nodes["SparseLoRAInit"], model=model, **{**args, "seed": 1})
    assert len(a.names) == TOP_COUNT and a.names == b.names and set(a.names) != set(c.names)
    assert not set(a.names) & set(IO_CONVS)


def test_rank_that_does_not_fit_a_layer_is_clamped(env):
    host, nodes, model = env["host"], env["nodes"], env["model"]
    mods = adaptable_modules(model.model.diffusion_model)
    (ad,) = host.run(nodes["SparseLoRAInit"], model=model,
                     **{**INIT, "module_selection": "all", "rank": 256, "alpha": 0.0})
    limits = {n: min(mods[n].weight.shape[0], mods[n].weight[0].numel()) for n in ad.names}
    assert all(ad[n].rank == min(256, limits[n]) for n in ad.names)
    assert any(limits[n] < 256 for n in ad.names)  # the tiny UNet's layers are all narrower
    assert all(ad[n].scale == 1.0 for n in ad.names)  # alpha 0: the (clamped) rank, scale 1


def test_ranked_selection_without_a_matching_saliency_is_refused_with_the_fix(env, monkeypatch):
    """saliency / objective / contrastive without a SALIENCY, or with one ranked by another loss,
    are refused naming the fix, before any module is selected or any LoRA built; so is an
    element mask without a SALIENCY."""
    _no_build(env, monkeypatch)
    m, sal = env["model"], env["sal"]
    assert sal.meta["ranking"] == "saliency"
    for how in ("saliency", "objective", "contrastive"):
        _expect(env, "SparseLoRAInit",
                f"module_selection '{how}' ranks modules by saliency: connect ComputeSaliency's "
                "output to the saliency input",
                model=m, **{**INIT, "module_selection": how})
    for how in ("objective", "contrastive"):
        _expect(env, "SparseLoRAInit",
                f"ranked by 'saliency' but module_selection is '{how}': set ComputeSaliency's "
                f"ranking to '{how}'",
                model=m, saliency=sal, **{**INIT, "module_selection": how})
    _expect(env, "SparseLoRAInit", "mask_fraction 0.5 masks weight elements by saliency: connect "
            "ComputeSaliency's output", model=m,
            **{**INIT, "module_selection": "text_kv", "mask_fraction": 0.5})
    empty = Saliency({}, concept=CONCEPT, num_samples=0)
    _expect(env, "SparseLoRAInit", "connect ComputeSaliency's output", model=m, saliency=empty,
            **INIT)


@pytest.fixture(scope="module")
def objective_sal(env):
    (sal,) = env["host"].run(env["nodes"]["ComputeSaliency"], model=env["model"],
                             clip=env["clip"], concept=CONCEPT, samples=2, ranking="objective",
                             seed=0, surrogate=SURROGATE, sample_steps=3, cfg=3.0, **SIZE)
    return sal


def test_objective_ranking_differs_from_the_plain_saliency(env, objective_sal):
    """ranking 'objective' (the concept's prediction pulled toward the surrogate's) on the same
    seed, images and timesteps ranks the modules otherwise than the plain denoising loss, and
    SparseLoRAInit's 'objective' selection adapts its top modules."""
    host, nodes, model, plain = env["host"], env["nodes"], env["model"], env["sal"]
    obj = objective_sal
    assert obj.meta["ranking"] == "objective" and obj.concept == CONCEPT
    assert obj.meta["model_fingerprint"] == plain.meta["model_fingerprint"]
    assert set(obj.modules) == set(plain.modules)
    assert obj.top_modules(exclude=IO_CONVS) != plain.top_modules(exclude=IO_CONVS)
    assert any(obj.stats[n]["mean"] != pytest.approx(plain.stats[n]["mean"], rel=0.05)
               for n in obj.modules)
    (ad,) = host.run(nodes["SparseLoRAInit"], model=model, saliency=obj,
                     **{**INIT, "module_selection": "objective"})
    assert ad.names == obj.top_modules(fraction=TOP_FRACTION, exclude=IO_CONVS)
    assert ad.meta["module_selection"] == "objective"


def test_contrastive_ranking_needs_preserve_prompts_before_any_sampling(env, monkeypatch):
    host, nodes = env["host"], env["nodes"]
    saliency_nodes = pack_module("saliency_nodes")

    def sampled(*args, **kwargs):
        raise AssertionError("sampled before refusing")
    monkeypatch.setattr(saliency_nodes, "sample", sampled)
    args = dict(model=env["model"], clip=env["clip"], concept=CONCEPT, samples=2,
                ranking="contrastive", seed=0, sample_steps=3, cfg=3.0, **SIZE)
    for preserve in ("", "  \n\n# only a note"):
        _expect(env, "ComputeSaliency", "'contrastive' contrasts the concept with the preserved "
                "prompts: give at least one preserve prompt", preserve=preserve, **args)


def test_contrastive_ranking_contrasts_with_the_preserved_prompts(env):
    host, nodes = env["host"], env["nodes"]
    host.progress.clear()
    (con,) = host.run(nodes["ComputeSaliency"], model=env["model"], clip=env["clip"],
                      concept=CONCEPT, samples=2, ranking="contrastive", seed=0,
                      preserve="a green line", sample_steps=3, cfg=3.0, **SIZE)
    assert host.progress[-1] == (7, 7)  # 3 sampling steps + 2 passes over 2 samples
    assert con.meta["ranking"] == "contrastive" and not con.has_elements
    assert con.top_modules(exclude=IO_CONVS) != env["sal"].top_modules(exclude=IO_CONVS)
    (ad,) = host.run(nodes["SparseLoRAInit"], model=env["model"], saliency=con,
                     **{**INIT, "module_selection": "contrastive"})
    assert ad.names == con.top_modules(fraction=TOP_FRACTION, exclude=IO_CONVS)


class _Sampled(Exception):
    """Raised by the recording ``sample`` once it has seen the guidance (nothing more to run)."""


def _record_guidance(monkeypatch, module, seen):
    def sample(*args, guidance, **kwargs):
        seen.append(guidance)
        raise _Sampled
    monkeypatch.setattr(module, "sample", sample)


@pytest.mark.parametrize("cfg,family_rule", [(-1.0, True), (0.0, False), (3.0, False)])
def test_cfg_minus_one_samples_with_the_family_guidance(env, monkeypatch, cfg, family_rule):
    """cfg -1 (the default) samples ComputeSaliency's images and SelfDistillUnlearn's pools with
    the model family's guidance (spare_core.recipes.pool_guidance); any cfg >= 0 as given."""
    import spare_core.tasks
    from spare_core.recipes import pool_guidance

    host, nodes, model, clip = env["host"], env["nodes"], env["model"], env["clip"]
    assert nodes["ComputeSaliency"].INPUT_TYPES()["optional"]["cfg"][1]["default"] == -1.0
    assert nodes["SelfDistillUnlearn"].INPUT_TYPES()["optional"]["cfg"][1]["default"] == -1.0
    want = pool_guidance(pack_module("comfy_bridge").model_family(model)) if family_rule else cfg
    assert pool_guidance("sd") == 7.5
    seen = []
    _record_guidance(monkeypatch, pack_module("saliency_nodes"), seen)
    _record_guidance(monkeypatch, spare_core.tasks, seen)
    with pytest.raises(_Sampled):
        host.run(nodes["ComputeSaliency"], model=model, clip=clip, concept=CONCEPT, samples=1,
                 ranking="saliency", seed=0, sample_steps=1, cfg=cfg, **SIZE)
    with pytest.raises(_Sampled):
        host.run(nodes["SelfDistillUnlearn"], model=model, clip=clip, adapter=env["init"],
                 concept=CONCEPT, surrogate=SURROGATE, preserve="", steps=1, lr=1e-2,
                 timestep_sampler="uniform", objective="self_distill", seed=0, pool_size=1,
                 pool_steps=1, cfg=cfg, **SIZE)
    assert seen == [want, want]


def test_node_defaults_come_from_the_spare_recipe(env):
    from spare_core.recipes import RECIPES

    spare, nodes = RECIPES["spare"], env["nodes"]
    sal = nodes["ComputeSaliency"].INPUT_TYPES()
    assert sal["required"]["samples"][1]["default"] == spare.num_samples == 16
    assert sal["optional"]["sample_steps"][1]["default"] == spare.sample_steps == 25
    assert "top_k" not in sal["required"] and "top_k" not in sal.get("optional", {})
    assert sal["required"]["ranking"][0] == ["saliency", "objective", "contrastive"]
    ranked = spare.hparams["module_selection"] in sal["required"]["ranking"][0]
    assert sal["required"]["ranking"][1]["default"] == (
        spare.hparams["module_selection"] if ranked else "saliency")
    init = nodes["SparseLoRAInit"].INPUT_TYPES()["required"]
    assert init["module_selection"][0] == ["saliency", "objective", "contrastive", "text_kv",
                                           "random", "all"]
    assert init["module_selection"][1]["default"] == spare.hparams["module_selection"]
    assert init["module_fraction"][1]["default"] == spare.hparams["module_fraction"]
    assert init["rank"][1]["default"] == spare.hparams["rank"]
    assert init["mask_fraction"][1]["default"] == 1.0 and "sparsity" not in init
    assert (nodes["SaliencyPreview"].INPUT_TYPES()["optional"]["module_fraction"][1]["default"]
            == spare.hparams["module_fraction"])
    unl = nodes["SelfDistillUnlearn"].INPUT_TYPES()
    assert unl["required"]["steps"][1]["default"] == spare.steps == 150
    assert unl["required"]["lr"][1]["default"] == spare.lr == 6e-3
    assert unl["optional"]["batch_size"][1]["default"] == spare.batch_size == 8
    assert unl["optional"]["pool_size"][1]["default"] == spare.num_samples
    assert unl["optional"]["pool_steps"][1]["default"] == spare.sample_steps


def test_size_zero_is_the_sd_familys_512(env, monkeypatch):
    """width/height 0 (the default): an SD1.x MODEL's concept images are generated at 512 px
    (64x64 latents), the family's training size; a typed size is kept."""
    host, nodes = env["host"], env["nodes"]
    saliency_nodes = sys.modules[f"{load_pack().__name__}.nodes.saliency_nodes"]
    sizes = []

    class Sampled(Exception):
        pass

    def sample(den, *args, **kwargs):
        sizes.append(tuple(den.latent_shape[1:]))
        raise Sampled
    monkeypatch.setattr(saliency_nodes, "sample", sample)
    for w, h in ((0, 0), (64, 0), (64, 128)):
        with pytest.raises(Sampled):
            host.run(nodes["ComputeSaliency"], model=env["model"], clip=env["clip"],
                     concept=CONCEPT, samples=1, ranking="saliency", seed=0, sample_steps=1,
                     width=w, height=h)
    assert sizes == [(64, 64), (64, 8), (16, 8)]  # (H, W) latents


def test_apply_on_fp8_weights_adds_the_delta_after_the_cast(env):
    """ApplyUnlearnAdapter on a MODEL stored in fp8 (UNETLoader weight_dtype fp8_e4m3fn): the
    update is a weight wrapper on the cast weight (ComfyUI's add_weight_wrapper), so the patched
    model computes what the adapter computed in training, W_cast x + delta x, to float rounding;
    a 'diff' patch would round W + delta back to fp8, which moves the output by far more than
    float rounding (asserted 100x). No weight is written; the input MODEL keeps no wrapper."""
    host, nodes, trained = env["host"], env["nodes"], env["trained"]
    model, _ = host.load_checkpoint(seed=0)
    store_weights_as(model, torch.float8_e4m3fn, torch.bfloat16)
    stored = {n: p.detach().clone() for n, p in model.model.diffusion_model.named_parameters()}
    x, t, c = probe(env, CONCEPT)
    base = host.eps(model, x, t, c)
    (erased,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=trained, strength=1.0)
    keys = {f"diffusion_model.{n}.weight" for n in trained.names}
    assert erased.patches == {} and set(erased.weight_wrapper_patches) == keys
    assert model.weight_wrapper_patches == {}
    patched = host.eps(erased, x, t, c)
    assert torch.equal(host.eps(model, x, t, c), base)  # the wrappers left with the clone
    unet = model.model.diffusion_model
    host.load(model)
    with torch.no_grad(), trained.applied(unet):  # the function the adapter was trained as
        direct = unet(x, t.float(), context=c)
    rounded = model.clone()  # the old way: W + delta stored back in fp8
    rounded.add_patches({k: ("diff", (trained[k[len("diffusion_model."):-len(".weight")]]
                                      .delta().detach().float() * trained.strength,))
                         for k in keys})
    via_diff = host.eps(rounded, x, t, c)
    err, err_diff = float((patched - direct).abs().max()), float((via_diff - direct).abs().max())
    assert not torch.equal(patched, base)
    assert err <= 1e-5 * float(direct.abs().max()) and err_diff > 100 * max(err, 1e-8), (err, err_diff)
    print(f"fp8 MODEL, max |output - trained function|: weight wrapper {err:.1e}, "
          f"'diff' patch rounded to fp8 {err_diff:.1e}")
    host.load(model)  # the shared UNet holds the loaded clone's weights
    for n, p in model.model.diffusion_model.named_parameters():
        assert p.dtype == stored[n].dtype and torch.equal(p.detach().view(torch.uint8),
                                                          stored[n].view(torch.uint8)), n
