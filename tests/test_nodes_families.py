"""The SPARE nodes on SDXL, SD3 and Flux MODELs, through the ComfyUI test double.

Each family's tiny MODEL (tests/comfy_double.py: the ComfyUI model class, its model sampling and
a network with ComfyUI's module names and call convention) goes through ComputeSaliency ->
SparseLoRAInit -> SelfDistillUnlearn -> ApplyUnlearnAdapter / SaveUnlearnAdapter -> LoraLoader,
as tests/test_nodes.py does for SD1.x; the bridge's family-specific parts (ADM vector, flow
process, Flux guidance, context lengths, refusals) are checked against the host's own calls.
"""
from __future__ import annotations

import logging
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from comfy_double import Host, ModelType, build_family_model, ModelPatcher, load_pack
from spare_core.families import IO_LAYERS, adaptable_modules
from spare_core.files import model_fingerprint

SIZE = dict(width=64, height=64)  # 8x8 latents
CONCEPT, SURROGATE = "a red circle", "a blue square"
LONG = "a very long prompt that needs a second chunk of tokens"  # 64 tokens, the others 32
FAMILIES = ("sdxl", "sd3", "flux")
# module_fraction giving the 8 most salient of each tiny network's candidate modules (adaptable,
# less the input/output layers): SDXL 83, SD3 22, Flux 20
TOP8 = {"sdxl": 0.1, "sd3": 0.36, "flux": 0.4}


def bridge():
    return sys.modules[f"{load_pack().__name__}.nodes.comfy_bridge"]


class _Losses(logging.Handler):
    """Collects SelfDistillUnlearn's 'loss a -> b' log line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.pairs: list[tuple[float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"loss (\S+) -> (\S+)", record.getMessage())
        if m:
            self.pairs.append((float(m.group(1)), float(m.group(2))))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    h = Host(str(tmp_path_factory.mktemp("comfy"))).install(mp)
    yield h
    mp.undo()
    torch.set_num_threads(threads)


def conds(model: ModelPatcher, clip, prompt: str, n: int = 2, guidance: float = 3.5) -> dict:
    """What the host's sampler feeds the network for CLIPTextEncode(prompt) on this MODEL
    (model_base.extra_conds), batch ``n``: context, and y (SDXL: encode_adm at the latent's
    size; SD3/Flux: the pooled vector), Flux's guidance."""
    with torch.no_grad():
        seq, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    name = type(model.model).__name__
    if name == "SDXL":
        y = model.model.encode_adm(pooled_output=pooled, width=64, height=64)
    else:
        y = pooled
    out = {"context": seq.expand(n, -1, -1), "y": y.expand(n, -1)}
    if name == "Flux":
        out["guidance"] = torch.full((n,), guidance)
    return out


def probe(model: ModelPatcher, seed: int = 1):
    """Fixed (x, t as the network is fed it) to compare outputs on."""
    g = torch.Generator().manual_seed(seed)
    c = model.model.latent_format.latent_channels
    x = torch.randn(4, c, 8, 8, generator=g)
    sampling = model.model.model_sampling
    at = torch.tensor([0.2, 0.4, 0.6, 0.8])
    if hasattr(sampling, "timestep"):  # flow: the network is fed timestep(sigma)
        return x, sampling.timestep(sampling.sigmas[(at * len(sampling.sigmas)).long()])
    return x, at * 1000


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, host):
    """One family: checkpoint, saliency, initial and trained adapter, the training's losses and
    the MODEL's outputs before any node ran."""
    nodes = load_pack().NODE_CLASS_MAPPINGS
    model, clip = host.load_family(request.param, seed=0)
    x, t = probe(model)
    before = host.forward(model, x, t, **conds(model, clip, CONCEPT, n=4))
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    (sal,) = host.run(nodes["ComputeSaliency"], model=model, clip=clip, concept=CONCEPT,
                      samples=2, ranking="saliency", seed=0, sample_steps=3, cfg=3.0,
                      element_scores=True, **SIZE)
    (init,) = host.run(nodes["SparseLoRAInit"], model=model, saliency=sal,
                       module_selection="saliency", module_fraction=TOP8[request.param], rank=2,
                       alpha=2.0, mask_fraction=1.0, seed=0)
    losses = _Losses()
    log = logging.getLogger(f"{load_pack().__name__}.nodes.unlearn_node")
    log.addHandler(losses)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        (trained, _loss) = host.run(nodes["SelfDistillUnlearn"], model=model, clip=clip, adapter=init,
                              concept="", surrogate=SURROGATE, preserve="a green line",
                              steps=24, lr=2e-2, timestep_sampler="uniform",
                              objective="self_distill", seed=0, batch_size=2, pool_size=2,
                              pool_steps=3, cfg=3.0, micro_batch=2, **SIZE)  # one draw of 2
    finally:
        log.removeHandler(losses)
        log.setLevel(level)
    return dict(family=request.param, nodes=nodes, model=model, clip=clip, sal=sal, init=init,
                trained=trained, losses=losses.pairs, x=x, t=t, before=before, weights=weights)


def test_family_trains_and_leaves_the_model(host, run):
    model, clip, trained, nodes = run["model"], run["clip"], run["trained"], run["nodes"]
    net = model.model.diffusion_model
    mods = adaptable_modules(net)
    assert set(run["sal"].scores) == set(mods)
    assert run["sal"].meta["model_fingerprint"] == model_fingerprint(net)
    assert trained.names == run["init"].names and len(trained.names) == 8
    assert trained.names == run["sal"].top_modules(fraction=TOP8[run["family"]],
                                                   exclude=IO_LAYERS)
    assert run["sal"].meta["ranking"] == "saliency"
    assert not set(trained.names) & set(IO_LAYERS)
    if run["family"] != "sdxl":  # ComfyUI's DiT names
        assert all(n.split(".")[0] in ("double_blocks", "single_blocks", "joint_blocks", "time_in",
                                       "vector_in", "guidance_in", "txt_in", "t_embedder",
                                       "y_embedder", "context_embedder") for n in mods
                   if n not in IO_LAYERS), sorted(mods)
    (first, last), = run["losses"]
    assert last < 0.7 * first, run["losses"]
    # the input MODEL: no patches, weights and outputs bit-identical
    x, t, c = run["x"], run["t"], conds(model, clip, CONCEPT, n=4)
    assert model.patches == {}
    assert all(torch.equal(v, run["weights"][k]) for k, v in model.model.state_dict().items())
    assert torch.equal(host.forward(model, x, t, **c), run["before"])
    # the patched clone moves the concept towards the surrogate's prediction
    target = host.forward(model, x, t, **conds(model, clip, SURROGATE, n=4))
    (erased,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=trained, strength=1.0)
    after = host.forward(erased, x, t, **c)
    assert not torch.equal(after, run["before"])
    gap = lambda a: float(((a - target) ** 2).mean())  # noqa: E731
    print(f"{run['family']}: loss {first:.3g} -> {last:.3g}; concept-surrogate gap "
          f"{gap(run['before']):.3g} -> {gap(after):.3g}")
    assert gap(after) < 0.7 * gap(run["before"]), (gap(run["before"]), gap(after))
    assert torch.equal(host.forward(model, x, t, **c), run["before"])
    assert model.patches == {}


def test_family_lora_loads_in_the_stock_loader(host, run):
    model, clip, trained, nodes = run["model"], run["clip"], run["trained"], run["nodes"]
    prefix = f"spare/{run['family']}"
    (name,) = host.run(nodes["SaveUnlearnAdapter"], adapter=trained, filename_prefix=prefix,
                       keep_native=True)
    lora = load_file(os.path.join(host.loras, name))
    assert lora and all(k.startswith("lora_unet_") for k in lora), sorted(lora)[:4]
    host.warnings.clear()
    via_lora = host.load_lora(model, lora, 0.7)
    assert host.warnings == []
    (loaded,) = host.run(nodes["LoadUnlearnAdapter"],
                         adapter_name=name.replace(".safetensors", ".spare.safetensors"))
    (applied,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=loaded, strength=0.7)
    x, t, c = run["x"], run["t"], conds(model, clip, CONCEPT, n=4)
    torch.testing.assert_close(host.forward(via_lora, x, t, **c), host.forward(applied, x, t, **c),
                               rtol=1e-4, atol=1e-5)
    host.load(via_lora)  # the shared network holds the LoRA's weights; the fingerprint does not
    assert bridge().fingerprint(model) == run["sal"].meta["model_fingerprint"]


def test_every_module_adapted_saves_loadable_keys(host, run):
    """All adaptable modules (SD3's ComfyUI ``context_embedder`` among them, a name diffusers'
    SD3 shares), module_selection 'all' (no SALIENCY needed) or a ranked selection at
    module_fraction 1: the saved keys are still ComfyUI's ``lora_unet_*`` and all load."""
    model, nodes, sal = run["model"], run["nodes"], run["sal"]
    everything = len(sal.scores)
    args = dict(module_fraction=1.0, rank=1, alpha=1.0, mask_fraction=1.0, seed=0)
    (ranked,) = host.run(nodes["SparseLoRAInit"], model=model, saliency=sal,
                         module_selection="saliency", **args)
    (ad,) = host.run(nodes["SparseLoRAInit"], model=model, module_selection="all", **args)
    assert len(ad.names) == everything - len(set(sal.scores) & set(IO_LAYERS))
    assert set(ranked.names) == set(ad.names)
    with torch.no_grad():
        for n in ad.names:
            ad[n].lora_B.normal_()
    (name,) = host.run(nodes["SaveUnlearnAdapter"], adapter=ad, filename_prefix=f"all/{run['family']}",
                       keep_native=False)
    lora = load_file(os.path.join(host.loras, name))
    host.warnings.clear()
    via_lora = host.load_lora(model, lora)
    assert host.warnings == [], host.warnings[:3]
    (applied,) = host.run(nodes["ApplyUnlearnAdapter"], model=model, adapter=ad, strength=1.0)
    c = conds(model, run["clip"], CONCEPT, n=4)
    torch.testing.assert_close(host.forward(via_lora, run["x"], run["t"], **c),
                               host.forward(applied, run["x"], run["t"], **c), rtol=1e-4, atol=1e-5)


def test_text_kv_adapts_the_text_projections_of_each_family(host, run):
    """module_selection text_kv, no SALIENCY: the projections that read the text (SDXL's
    cross-attention to_k / to_v, the DiTs' text-stream qkv)."""
    from spare_core.localize import select_modules

    model = run["model"]
    want = select_modules(model.model.diffusion_model, "text_kv")
    (ad,) = host.run(run["nodes"]["SparseLoRAInit"], model=model, module_selection="text_kv",
                     module_fraction=0.5, rank=2, alpha=0.0, mask_fraction=1.0, seed=0)
    assert ad.names == want and not set(want) & set(IO_LAYERS)
    if run["family"] == "sdxl":
        assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in want), want
    else:
        assert all(n.endswith("qkv") for n in want), want


class _Sampled(Exception):
    """Raised by the recording ``sample`` once it has seen the guidance."""


def test_cfg_minus_one_samples_with_the_family_guidance_and_size(host, run, monkeypatch):
    """cfg -1 and width/height 0 (the defaults): ComputeSaliency's images and SelfDistillUnlearn's
    pools are sampled with the family's guidance (spare_core.recipes.pool_guidance: SDXL and SD3
    7.0, Flux 1.0) at the family's size (spare_core.recipes.image_size: 1024 px, 128x128
    latents)."""
    import spare_core.tasks
    from spare_core.recipes import image_size, pool_guidance

    seen, sizes = [], []

    def sample(den, *args, guidance, **kwargs):
        seen.append(guidance)
        sizes.append(tuple(den.latent_shape[1:]))
        raise _Sampled
    saliency_nodes = sys.modules[f"{load_pack().__name__}.nodes.saliency_nodes"]
    monkeypatch.setattr(saliency_nodes, "sample", sample)
    monkeypatch.setattr(spare_core.tasks, "sample", sample)
    model, clip, nodes = run["model"], run["clip"], run["nodes"]
    with pytest.raises(_Sampled):
        host.run(nodes["ComputeSaliency"], model=model, clip=clip, concept=CONCEPT, samples=1,
                 ranking="saliency", seed=0, sample_steps=1, cfg=-1.0, width=0, height=0)
    with pytest.raises(_Sampled):
        host.run(nodes["SelfDistillUnlearn"], model=model, clip=clip, adapter=run["init"],
                 concept=CONCEPT, surrogate=SURROGATE, preserve="", steps=1, lr=1e-2,
                 timestep_sampler="uniform", objective="self_distill", seed=0, pool_size=1,
                 pool_steps=1, cfg=-1.0, width=0, height=0)
    want = {"sdxl": 7.0, "sd3": 7.0, "flux": 1.0}[run["family"]]
    assert pool_guidance(run["family"]) == want and seen == [want, want]
    assert image_size(run["family"]) == 1024 and sizes == [(128, 128), (128, 128)]
    assert image_size("sd") == 512


# ---------------------------------------------------------------- the bridge per family

def _denoiser(model, clip, prompts=(), **kwargs):
    b = bridge()
    with b.autograd_enabled():
        den = b.ComfyDenoiser(model, clip, 64, 64, prompts=prompts, **kwargs)
        b.load_for_compute(model)
    return den


def test_sdxl_context_carries_the_adm_vector_of_the_image_size(host):
    model, clip = host.load_family("sdxl", seed=1)
    den = _denoiser(model, clip, [CONCEPT, LONG])
    call = model.model.adm_calls[-1]
    assert {k: call[k] for k in ("width", "height", "crop_w", "crop_h", "target_width",
                                 "target_height")} == dict(width=64, height=64, crop_w=0, crop_h=0,
                                                           target_width=64, target_height=64)
    ctx = den.encode([CONCEPT, LONG])
    assert ctx.shape[1] == 64 and list(ctx.extras) == ["y"]  # the short one repeated (lcm)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 700])
    c = conds(model, clip, CONCEPT)
    with torch.no_grad():
        torch.testing.assert_close(den.eps(x, t, ctx[:1].expand(2)),
                                   host.forward(model, x, t, **c), rtol=1e-4, atol=1e-5)
        one = den.eps(x[1:], t[1:], den.encode([LONG]))
        torch.testing.assert_close(den.eps(x, t, ctx)[1:], one, rtol=1e-4, atol=1e-5)


def test_sdxl_v_prediction_is_converted_to_eps(host):
    model, clip = host.load_family("sdxl", seed=0, model_type=ModelType.V_PREDICTION)
    den = _denoiser(model, clip)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([400]), den.encode([""])
    with torch.no_grad():
        v = model.model.diffusion_model(x, t.float(), context=c.seq, y=c.field("y"))
        a = den.alphas_cumprod[400]
        torch.testing.assert_close(den.eps(x, t, c), a.sqrt() * v + (1 - a).sqrt() * x)


@pytest.mark.parametrize("family", ["sd3", "flux", "flux_schnell"])
def test_flow_prediction_is_the_raw_output_on_the_models_own_schedule(host, family):
    model, clip = host.load_family(family, seed=0)
    den = _denoiser(model, clip, [CONCEPT])
    sampling = model.model.model_sampling
    proc = den.process
    assert proc.space == "velocity" and proc.num_steps == len(sampling.sigmas)
    torch.testing.assert_close(proc.sigma.float(), sampling.sigmas)
    torch.testing.assert_close(proc.model_t, sampling.timestep(sampling.sigmas))
    idx = torch.tensor([len(sampling.sigmas) // 4, len(sampling.sigmas) - 1])
    s = sampling.sigmas[idx].view(-1, 1, 1, 1)
    x = torch.randn(2, 16, 8, 8)
    ctx = den.encode([CONCEPT, CONCEPT])
    with torch.no_grad():
        raw = host.forward(model, x, sampling.timestep(s.flatten()), **conds(model, clip, CONCEPT))
        v = den.pred(x, idx, ctx)
        torch.testing.assert_close(v, raw, rtol=1e-5, atol=1e-6)
        eps, x0 = den.predict(x, idx, ctx)
    torch.testing.assert_close(x0, x - s * raw, rtol=1e-5, atol=1e-5)  # CONST.calculate_denoised
    torch.testing.assert_close(eps, x + (1 - s) * raw, rtol=1e-5, atol=1e-5)
    if family.startswith("flux"):
        assert torch.equal(ctx.field("guidance"), torch.full((2,), 3.5))


def test_flux_guidance_is_a_constructor_argument(host):
    model, clip = host.load_family("flux", seed=0)
    x, t = torch.randn(1, 16, 8, 8), torch.tensor([5000])
    with torch.no_grad():
        outs = []
        for g in (3.5, 1.0):
            den = _denoiser(model, clip, guidance=g)
            ctx = den.encode([""])
            assert float(ctx.field("guidance")) == g
            outs.append(den.pred(x, t, ctx))
    assert not torch.equal(*outs)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_contexts_of_different_lengths_run_as_separate_batches(host, family):
    """ComfyUI never concatenates SD3/Flux conditionings of different lengths (CONDRegular):
    a mixed batch gives each sample what it gets alone, and an unannounced longer prompt fails."""
    model, clip = host.load_family(family, seed=0)
    den = _denoiser(model, clip, [CONCEPT, LONG])
    ctx = den.encode([LONG, CONCEPT, LONG])
    assert ctx.shape[1] == 64 and ctx.field("tokens").tolist() == [64, 32, 64]
    x, t = torch.randn(3, 16, 8, 8), torch.tensor([100, 500, 900])
    with torch.no_grad():
        mixed = den.pred(x, t, ctx)
        for i, p in enumerate([LONG, CONCEPT, LONG]):
            alone = den.pred(x[i:i + 1], t[i:i + 1], den.encode([p]))
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="not announced"):
        den.encode(["a prompt that is long enough to need three chunks of thirty characters each"])


def test_gradient_checkpointing_gives_the_same_gradients_on_a_dit(host):
    model, clip = host.load_family("flux", seed=0)
    den = _denoiser(model, clip)
    x, t, ctx = torch.randn(1, 16, 8, 8), torch.tensor([3000]), den.encode([""])
    grads = []
    b = bridge()
    for on in (False, True):
        with b.autograd_enabled():
            b.load_for_compute(model)  # trainable weights for this scope, as a node does
            den.enable_gradient_checkpointing(on)
            w = den.unet.double_blocks[0].img_attn.qkv.weight
            w.requires_grad_(True)
            den.pred(x, t, ctx).square().mean().backward()
            grads.append(w.grad.clone())
            w.grad = None
            w.requires_grad_(False)
            den.enable_gradient_checkpointing(False)
    torch.testing.assert_close(grads[0], grads[1])


class HunyuanDiT(torch.nn.Module):
    """A ComfyUI model class the nodes do not support."""

    def __init__(self, base) -> None:
        super().__init__()
        self.diffusion_model, self.model_type = base.diffusion_model, base.model_type
        self.model_sampling, self.latent_format = base.model_sampling, base.latent_format
        self.manual_cast_dtype = None


def test_unsupported_models_are_refused_naming_the_families(host):
    b = bridge()
    sd3 = build_family_model("sd3")
    with pytest.raises(ValueError, match="HunyuanDiT model.*SD1.x, SD2.x, SDXL, SD3 and Flux"):
        b.check_supported(ModelPatcher(HunyuanDiT(sd3)))
    edm = ModelPatcher(build_family_model("sdxl", model_type=ModelType.V_PREDICTION_EDM))
    with pytest.raises(ValueError, match="predicts V_PREDICTION_EDM.*not EDM"):
        b.check_supported(edm)
    flux_eps = build_family_model("flux")
    flux_eps.model_type = ModelType.EPS
    with pytest.raises(ValueError, match="Flux MODEL predicts EPS"):
        b.check_supported(ModelPatcher(flux_eps))
    assert [b.model_family(ModelPatcher(build_family_model(f))) for f in
            ("sdxl", "sd3", "flux", "flux_schnell")] == ["sdxl", "sd3", "flux", "flux"]
