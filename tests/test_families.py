"""SDXL, SD3 and Flux through the engine on tiny random-weight pipelines: conditioning, forward
process, sampling, every concept method and a data method, saliency/sparse LoRA over DiT
modules, and LoRA exports that each pipeline's own ``load_lora_weights`` reproduces."""
from __future__ import annotations

import pytest
import torch

from spare_core import ForwardProcess, run_method, sample
from spare_core.conditioning import Context
from spare_core.denoiser import prediction
from spare_core.esd import esd_modules
from spare_core.export import to_comfy_lora, to_diffusers_lora
from spare_core.families import IO_LAYERS, adaptable_modules, denoiser_from_pipeline, dit
from spare_core.families.flow import flow_process
from spare_core.localize import select_modules
from spare_core.recipes import RECIPES
from spare_core.process import process_of
from tiny_families import tiny_family_denoiser

SHIPPED = RECIPES["spare"].hparams

FAMILIES = ("sdxl", "sd3", "flux")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    pipe, den = tiny_family_denoiser(request.param)
    return request.param, pipe, den


def _probe(den, seed: int = 9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *den.latent_shape, generator=g)
    with torch.no_grad():
        return prediction(den, x, torch.tensor([100, 700]), den.encode(["a cat", "a dog"]))


def test_conditioning_and_process_of_each_family(family):
    name, pipe, den = family
    ctx = den.encode(["a cat", ""])
    assert isinstance(ctx, Context) and ctx.shape[0] == 2
    fields = {"sdxl": {"pooled", "time_ids"}, "sd3": {"pooled"}, "flux": {"pooled", "guidance"}}
    assert set(ctx.extras) == fields[name]
    proc = process_of(den)
    assert proc.space == ("eps" if name == "sdxl" else "velocity")
    assert proc.num_steps == 1000
    if name == "sdxl":  # force_zeros_for_empty_prompt: the empty prompt is zeros, as the pipeline guides
        assert float(ctx[1].seq.abs().max()) == 0.0 and float(ctx[0].seq.abs().max()) > 0
    # different prompts give different predictions: the conditioning reaches the network
    p = _probe(den)
    assert p.shape == (2, *den.latent_shape) and torch.isfinite(p).all()
    x = sample(den, ["a cat", "a dog"], steps=4, guidance=2.0, method="ddim",
               generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, *den.latent_shape) and torch.isfinite(x).all()


def test_flow_process_is_the_schedulers_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    proc = flow_process(sched)
    torch.testing.assert_close(proc.sigma.float(), sched.sigmas.flip(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(proc.model_t, sched.timesteps.flip(0), atol=1e-3, rtol=0)
    # dynamic shifting (Flux) follows the scheduler's own time shift at the image's token count
    dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    s = torch.arange(1, 1001, dtype=torch.float64) / 1000
    want = dyn.time_shift(calculate_shift(4096), 1.0, s)
    torch.testing.assert_close(flow_process(dyn, image_seq_len=4096).sigma, want)


def test_flow_conversions_and_euler_step():
    """x_t = (1-s) x0 + s e: the velocity e - x0 gives back x0 and e without division (also at
    s = 1), and the sampler's DDIM step on a flow is the Euler step x += (s' - s) v."""
    s = torch.tensor([0.001, 0.3, 0.7, 1.0], dtype=torch.float64)
    proc = ForwardProcess.flow(s)
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(4, 1, 2, 2, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    t = torch.arange(4)
    x_t = proc.q_sample(x0, t, e)
    v = proc.target(x0, e)
    eps, x0_hat = proc.eps_and_x0(v, x_t, t)
    torch.testing.assert_close(eps, e, atol=1e-6, rtol=0)
    torch.testing.assert_close(x0_hat, x0, atol=1e-6, rtol=0)
    a_p, s_p = proc.coeffs(torch.tensor(1), x0)
    ddim = a_p * x0_hat[2:3] + s_p * eps[2:3]
    torch.testing.assert_close(ddim, x_t[2:3] + (0.3 - 0.7) * v[2:3], atol=1e-6, rtol=0)


def test_dit_module_sets():
    _, den = tiny_family_denoiser("flux")
    names = list(adaptable_modules(den.unet))
    xs = esd_modules(den.unet, "x")
    assert xs and all(dit.is_text_attention(n) for n in xs)
    assert any(".add_k_proj" in n for n in xs)
    us = esd_modules(den.unet, "u")
    assert not set(us) & set(xs)
    assert not any(n.startswith(("time_text_embed", "context_embedder", "norm_out")) or n == "proj_out"
                   for n in us)
    assert any(n.startswith("single_transformer_blocks") and n.endswith("proj_mlp") for n in us)
    assert {"x_embedder", "proj_out"} <= set(names) & set(IO_LAYERS)


@pytest.mark.parametrize("method", ["spare", "esd", "salun"])
def test_concept_methods_train_on_each_family(family, method):
    """A concept method runs end to end: the loss falls, the adapter moves the model on the
    concept, and (SPARE) it touches only the modules its recipe's selection names, with no
    saliency pass (the shipped selection ranks nothing)."""
    name, pipe, den = family
    before = {k: v.clone() for k, v in den.unet.state_dict().items()}
    res = run_method(method, den, concept="a cat", surrogate="a dog", preserve=["a bird"],
                     steps=40, batch_size=2, num_samples=4, sample_steps=4, seed=0,
                     **({"lr": 3e-3} if method != "salun" else {}))
    loss = res.history["loss"]
    assert all(map(lambda v: v == v, loss))
    assert sum(loss[-8:]) / 8 < sum(loss[:8]) / 8, (name, method, loss[:8], loss[-8:])
    after = den.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base model is untouched
    if method == "spare":
        assert not set(res.adapter.names) & set(IO_LAYERS)
        assert res.adapter.names == select_modules(den.unet, SHIPPED["module_selection"],
                                                   fraction=SHIPPED["module_fraction"])
        assert res.saliency is None
    with res.adapter.applied(den.unet):
        moved = _probe(den)
    assert not torch.allclose(moved, _probe(den))


def _fp8_twin(name: str):
    """The family's tiny pipeline twice, as the same numbers: one network in bf16 whose layers
    diffusers' layerwise casting stores in fp8 (the rest, e.g. SD3's patch embedding, stay bf16),
    and one that holds the fp8-rounded values of those layers in bf16 (what the casting computes
    with)."""
    from spare_core.storage_cast import layerwise_cast_hooks

    kw = {"sd3": {"max_sequence_length": 8},
          "flux": {"height": 64, "width": 64, "max_sequence_length": 8}}.get(name, {})
    nets, dens = [], []
    for _ in range(2):
        pipe, _ = tiny_family_denoiser(name)
        nets.append((pipe.unet if name == "sdxl" else pipe.transformer).to(torch.bfloat16))
        dens.append((pipe, kw))
    nets[0].enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                     compute_dtype=torch.bfloat16)
    cast = {n for n, m in nets[0].named_modules()
            if any(m is h for h, _ in layerwise_cast_hooks(nets[0]))}
    with torch.no_grad():
        for n, m in nets[1].named_modules():
            if n in cast:
                m.to(torch.float8_e4m3fn).to(torch.bfloat16)
    dens = [denoiser_from_pipeline(pipe, compute_dtype=torch.bfloat16, **kw) for pipe, kw in dens]
    return dens


@pytest.mark.parametrize("name", FAMILIES)
def test_fp8_storage_saliency_and_spare_on_each_family(name):
    """SDXL, SD3 and Flux stored in fp8 (diffusers' layerwise casting, bf16 compute): saliency
    equals that of the same values held in bf16, bit for bit, and SPARE with a saliency-ranked
    selection trains end to end, choosing the modules the bf16 twin chooses."""
    from spare_core import compute_saliency, spare_unlearn

    fp8, ref = _fp8_twin(name)
    assert any(p.dtype == torch.float8_e4m3fn for p in fp8.unet.parameters())
    assert not any(p.dtype == torch.float8_e4m3fn for p in ref.unet.parameters())
    latents = torch.randn(2, *fp8.latent_shape, generator=torch.Generator().manual_seed(0))
    sal = [compute_saliency(d, "a cat", latents, batch_size=1, seed=0) for d in (fp8, ref)]
    assert set(sal[0].scores) == set(sal[1].scores)
    for k in sal[0].scores:
        assert torch.equal(sal[0].scores[k], sal[1].scores[k]), (name, k)
    runs = [spare_unlearn(d, "a cat", "a dog", ["a bird"], steps=2, num_samples=2, sample_steps=2,
                          batch_size=2, module_selection="saliency", rank=2, seed=0)
            for d in (fp8, ref)]
    assert runs[0].adapter.names == runs[1].adapter.names
    assert any(float(runs[0].adapter[n].lora_B.detach().abs().sum()) > 0
               for n in runs[0].adapter.names)


def test_data_unlearning_uses_the_flow_target():
    """SISS on a flow model: forget/keep images noised by the flow; the keep term's target is the
    velocity, so the naive-deletion loss of the frozen model equals the velocity MSE."""
    _, den = tiny_family_denoiser("sd3")
    g = torch.Generator().manual_seed(0)
    forget = torch.randn(4, *den.latent_shape, generator=g)
    keep = torch.randn(8, *den.latent_shape, generator=g)
    res = run_method("siss", den, forget=forget, keep=keep, steps=6, batch_size=2, seed=0,
                     early_stop_every=0)  # random images, never memorised: train every step
    assert len(res.history["loss"]) == 6 and all(v == v for v in res.history["loss"])

    from spare_core.data_task import DataTask
    task = DataTask(forget, keep)
    task.prepare(den, "uniform", 0)
    b = task.batch(den, 4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(b.preserve.target, b.preserve.noise - b.preserve.x0)


def _adapter(den):
    from spare_core import init_masked_full, init_sparse_lora

    mods = list(adaptable_modules(den.unet))
    pick = [n for n in mods if n not in IO_LAYERS][::3][:6]
    g = torch.Generator().manual_seed(0)
    ad = init_sparse_lora(den.unet, pick[:-1], rank=2, alpha=4)
    masked = init_masked_full(den.unet, {pick[-1]: torch.rand(
        adaptable_modules(den.unet)[pick[-1]].weight.shape, generator=g) < 0.3})
    from spare_core.adapter import UnlearnAdapter
    ad = UnlearnAdapter({**{n: ad[n] for n in ad.names}, pick[-1]: masked[pick[-1]]})
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return ad


def test_diffusers_export_loads_through_each_pipelines_load_lora_weights(family):
    name, _, _ = family
    pipe, den = tiny_family_denoiser(name, seed=1)  # a fresh pipeline: LoRA is loaded into it
    ad = _adapter(den)
    with ad.applied(den.unet):
        want = _probe(den)
    sd = to_diffusers_lora(ad)
    prefix = "unet." if name == "sdxl" else "transformer."
    assert all(k.startswith(prefix) for k in sd)
    pipe.load_lora_weights(sd, adapter_name="spare")
    torch.testing.assert_close(_probe(den), want, atol=2e-4, rtol=1e-3)


def test_comfy_export_key_prefix_by_family(family):
    name, _, den = family
    sd = to_comfy_lora(_adapter(den))
    prefix = "lora_unet_" if name == "sdxl" else "lora_transformer_"
    assert sd and all(k.startswith(prefix) for k in sd)


def test_unsupported_pipeline_is_refused_with_the_list():
    class KandinskyPipeline:
        pass

    with pytest.raises(ValueError, match="StableDiffusionXLPipeline.*FluxPipeline"):
        denoiser_from_pipeline(KandinskyPipeline())


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_pipeline_folders_load_offline(tmp_path, name):
    """``load_denoiser(folder)`` picks the family from model_index.json; the loaded model
    predicts what the in-memory one does, and a merged export re-saves the network."""
    from spare_core import load_denoiser
    from spare_core.export import save_merged_pipeline

    pipe, den = tiny_family_denoiser(name)
    pipe.save_pretrained(str(tmp_path / "pipe"))
    kw = {"max_sequence_length": 8} if name != "sdxl" else {}
    if name == "flux":
        kw.update(height=64, width=64)
    loaded = load_denoiser(str(tmp_path / "pipe"), **kw)
    assert type(loaded) is type(den)
    torch.testing.assert_close(_probe(loaded), _probe(den))
    ad = _adapter(den)
    with ad.applied(den.unet):
        want = _probe(den)
    save_merged_pipeline(str(tmp_path / "pipe"), ad, str(tmp_path / "merged"))
    torch.testing.assert_close(_probe(load_denoiser(str(tmp_path / "merged"), **kw)), want,
                               atol=1e-5, rtol=1e-4)


def test_text_encoders_can_live_apart_from_the_network(tmp_path):
    """``load_denoiser(..., text_encoders_device="cpu")`` (the CLI's --text-encoders cpu): the
    network goes to ``device`` (here ``meta``, standing in for a GPU), the text encoders stay on
    the CPU, and every encoded context arrives on the network's device with the values the
    in-memory pipeline encodes."""
    from spare_core import load_denoiser

    pipe, den = tiny_family_denoiser("flux")
    pipe.save_pretrained(str(tmp_path / "pipe"))
    loaded = load_denoiser(str(tmp_path / "pipe"), device="meta", text_encoders_device="cpu",
                           height=64, width=64, max_sequence_length=8)
    assert {p.device.type for p in loaded.unet.parameters()} == {"meta"}
    ctx = loaded.encode(["a cat"])
    assert ctx.device.type == "meta" and ctx.field("pooled").device.type == "meta"
    on_cpu = load_denoiser(str(tmp_path / "pipe"), text_encoders_device="cpu", height=64,
                           width=64, max_sequence_length=8)  # same device: nothing moves
    torch.testing.assert_close(on_cpu.encode(["a cat"]).seq, den.encode(["a cat"]).seq)


def test_text_encoders_apart_encode_each_prompt_once_until_an_adapter_changes_them(tmp_path):
    """With the encoders apart (on the CPU), a prompt is encoded once however often the run asks
    (a pool asks for its prompt once per image), the rows come back in the order asked, and a
    hook on an encoder (as an attached text-encoder adapter) makes them encode again."""
    from spare_core import load_denoiser

    pipe, den = tiny_family_denoiser("flux")
    pipe.save_pretrained(str(tmp_path / "pipe"))
    loaded = load_denoiser(str(tmp_path / "pipe"), device="meta", text_encoders_device="cpu",
                           height=64, width=64, max_sequence_length=8)
    calls, inner = [], loaded.encode.encode

    def counted(prompts):
        calls.append(list(prompts))
        return inner(prompts)

    loaded.encode.encode = counted
    ctx = loaded.encode(["a cat", "a cat", "a dog", "a cat"])
    assert calls == [["a cat", "a dog"]] and ctx.shape[0] == 4 and ctx.device.type == "meta"
    loaded.encode(["a dog", "a cat"])
    assert len(calls) == 1
    kept = loaded.encode.kept
    torch.testing.assert_close(kept["a dog"].seq, den.encode(["a dog"]).seq)
    handle = loaded.encode.encoders[0].register_forward_hook(lambda m, i, o: o)
    loaded.encode(["a cat"])
    assert calls[-1] == ["a cat"] and len(calls) == 2
    handle.remove()
    loaded.encode(["a cat"])
    assert len(calls) == 3  # the hook's removal changes them back: encoded again


def test_unsupported_folder_is_refused_before_loading(tmp_path):
    from spare_core import load_denoiser

    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyV22Pipeline"}')
    with pytest.raises(ValueError, match="KandinskyV22Pipeline.*supported: StableDiffusionPipeline"):
        load_denoiser(str(tmp_path))


def test_cli_unlearns_an_sd3_folder(tmp_path):
    """`spare unlearn --model <SD3 folder>` end to end (flow model, transformer/ layout)."""
    from spare_core.cli import main

    pipe, _ = tiny_family_denoiser("sd3")
    pipe.save_pretrained(str(tmp_path / "sd3"))
    out = tmp_path / "erased.safetensors"
    rc = main(["unlearn", "--model", str(tmp_path / "sd3"), "--method", "spare", "--concept",
               "a cat", "--surrogate", "a dog", "--steps", "3", "--num-samples", "2",
               "--sample-steps", "2", "--format", "diffusers", "--out", str(out)])
    assert rc == 0
    from safetensors.torch import load_file
    sd = load_file(str(out))
    assert sd and all(k.startswith("transformer.") for k in sd)
