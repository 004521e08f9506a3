"""``spare unlearn`` on a pipeline folder saved with save_pretrained (offline)."""
import os

import pytest
import torch
from safetensors import safe_open

from spare_core import load_adapter
from spare_core.cli import main
from tiny_models import tiny_denoiser


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    den = tiny_denoiser()
    den.unet.save_pretrained(os.path.join(d, "unet"))
    den.text_encoder.save_pretrained(os.path.join(d, "text_encoder"))
    den.tokenizer.save_pretrained(os.path.join(d, "tokenizer"))
    den.scheduler.save_pretrained(os.path.join(d, "scheduler"))
    return str(d)


def _args(pipe_dir, out, *extra):
    return ["unlearn", "--model", pipe_dir, "--concept", "a cat", "--surrogate", "a dog",
            "--preserve", "the ocean", "--out", out, "--steps", "3", "--num-samples", "2",
            "--sample-steps", "3", *extra]


def _assert_same_as_native(den, native, eps, **tol):
    """``eps(x, t, ctx)`` (run after the native adapter's reference) equals ``den``'s UNet with
    the adapter file ``native`` applied, and that adapter changes the UNet."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    ctx = den.encode(["a cat", "the ocean"])
    with torch.no_grad():
        base = den.eps(x, t, ctx)
        with load_adapter(native, unet=den.unet).applied(den.unet):
            want = den.eps(x, t, ctx)
        got = eps(x, t, ctx)
    assert float((want - base).abs().max()) > 1e-4  # the run changed the UNet
    torch.testing.assert_close(got, want, **tol)


def test_unlearn_writes_adapter_and_grid(pipe_dir, tmp_path, capsys):
    out, grid = str(tmp_path / "a.safetensors"), str(tmp_path / "grid.png")
    assert main(_args(pipe_dir, out, "--grid", grid)) == 0
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet")
    ad = load_adapter(out, unet=unet)
    assert ad.meta["concept"] == "a cat" and ad.meta["method"] == "spare"
    from PIL import Image
    w, h = Image.open(grid).size
    assert w > 2 * 4 * 64 and h >= 3 * 64  # 3 prompts x (before, after) x 4 samples
    assert "trainable parameters" in capsys.readouterr().out


@pytest.mark.parametrize("fmt,key", [("comfy", "lora_unet_"), ("diffusers", "unet.")])
def test_unlearn_exports(pipe_dir, tmp_path, fmt, key):
    out = str(tmp_path / f"{fmt}.safetensors")
    assert main(_args(pipe_dir, out, "--format", fmt)) == 0
    with safe_open(out, "pt") as f:
        assert all(k.startswith(key) for k in f.keys())


def test_diffusers_file_loads_with_pipe_load_lora_weights(pipe_dir, tmp_path):
    """SPEC 1.3: the ``--format diffusers`` file goes into ``pipe.load_lora_weights`` and gives
    the same UNet as the native adapter of the same (seeded) run."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from spare_core import DiffusersDenoiser

    native, lora = str(tmp_path / "native.safetensors"), str(tmp_path / "lora.safetensors")
    assert main(_args(pipe_dir, native)) == 0
    assert main(_args(pipe_dir, lora, "--format", "diffusers")) == 0
    den = DiffusersDenoiser.from_pretrained(pipe_dir)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=den.text_encoder, tokenizer=den.tokenizer,
                                   unet=den.unet, scheduler=den.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)

    def with_lora(x, t, ctx):
        pipe.load_lora_weights(lora)
        return den.eps(x, t, ctx)
    _assert_same_as_native(den, native, with_lora, atol=1e-5, rtol=1e-4)


def test_bad_input_exits_with_message(pipe_dir, tmp_path, capsys):
    out = str(tmp_path / "a.safetensors")
    assert main(_args(pipe_dir, out, "--steps", "0")) == 2
    assert "argument --steps: must be >= 1, got 0" in capsys.readouterr().err
    assert not os.path.exists(out)
    assert main(["unlearn", "--model", str(tmp_path), "--concept", "x", "--out", out]) == 2
    assert "not a diffusers pipeline folder: no unet/ inside" in capsys.readouterr().err
    assert main(["unlearn", "--model", str(tmp_path / "nope"), "--concept", "x", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "no unet/" not in err


# Runs the CLI in a fresh interpreter where ``spare_core`` is a bare package (its __init__, which
# imports the engine, is skipped) and any import of torch/diffusers/transformers fails: what the
# command line does before its heavy imports is then all that can run.
_NO_TORCH = r"""
import importlib.abc, io, json, os, sys, time, types, contextlib
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers"):
            raise ImportError("blocked heavy import: " + name)
sys.meta_path.insert(0, Block())
pkg = types.ModuleType("spare_core")
pkg.__path__ = [os.path.join(sys.argv[1], "spare_core")]
sys.modules["spare_core"] = pkg
from spare_core.cli import main
results = []
for argv in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append([rc, out.getvalue(), err.getvalue(), time.perf_counter() - t0])
print(json.dumps(results))
"""


def _no_torch_cli(argvs):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, root, json.dumps(argvs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_help_and_bad_arguments_need_no_torch(pipe_dir, tmp_path):
    out = str(tmp_path / "a.safetensors")
    base = ["unlearn", "--model", pipe_dir, "--concept", "a cat", "--out", out]
    cases = [
        (base + ["--steps", "0"], "--steps: must be >= 1"),
        (base + ["--lr", "-1"], "--lr: must be > 0"),
        (base + ["--lr", "nan"], "--lr: must be a finite number"),
        (base + ["--batch-size", "-2"], "--batch-size: must be >= 1"),
        (base + ["--module-fraction", "1.5"], "--module-fraction: must be in (0, 1]"),
        (base + ["--device", "gpu"], "--device: must be auto, cpu, cuda, cuda:N or mps"),
        (base + ["--param", "eta"], "--param: takes KEY=VALUE"),
        (base + ["--preserve", " "], "--preserve: is empty"),
        (["unlearn", "--model", pipe_dir, "--concept", "", "--out", out], "--concept: is empty"),
        (["unlearn", "--model", pipe_dir, "--method", "siss", "--forget-images",
          str(tmp_path / "none"), "--out", out], "none' does not exist; give a folder of images"),
        (["demo", "--forget", "12"], "--forget must be a digit 0..9"),
        (["demo", "--forget", "3", "--surrogate", "3"], "other than --forget 3"),
        (["demo", "--n", "0"], "--n: must be >= 1"),
        (["bench", "--methods", "spare,nope"], "unknown method 'nope'"),
        (["bench", "--forget", "3,x"], "--forget must be a comma list of digits"),
        (["bench", "--steps", "-5"], "--steps: must be >= 1"),
        (["bench", "--probe", "--model", "digits-dit"], "--probe attacks concept erasures"),
        (["bench", "--probe", "--data-unlearning"], "--probe attacks concept erasures"),
        (["probe", "--model", pipe_dir, "--adapter", str(tmp_path / "none.safetensors"),
          "--concept", "a cat"], "does not exist: give the .safetensors file"),
        (["probe", "--model", pipe_dir, "--adapter", pipe_dir, "--concept", "a cat",
          "--attack-steps", "0"], "--attack-steps: must be >= 1"),
    ]
    helps = [["--help"], ["unlearn", "--help"], ["demo", "--help"], ["bench", "--help"],
             ["probe", "--help"]]
    results = _no_torch_cli([c for c, _ in cases] + helps)
    for (argv, message), (rc, _, err, secs) in zip(cases, results):
        assert rc == 2 and message in err, (argv, err)
        assert "Traceback" not in err and secs < 2.0, (argv, secs)
    for argv, (rc, text, err, _) in zip(helps, results[len(cases):]):
        assert rc == 0 and not err, argv
        assert "``" not in text and ":data:" not in text, text
    unlearn_help, demo_help, bench_help, _ = (r[1] for r in results[len(cases) + 1:])
    from spare_core.recipes import RECIPES  # the help prints the recipe's values
    spare = RECIPES["spare"]
    for flag, default in [("--steps", f"the method's recipe, spare {spare.steps}"),
                          ("--guidance", "by model family: sd 7.5"),
                          ("--batch-size", f"the method's recipe, spare {spare.batch_size}"),
                          ("--seed", "0"), ("--device", "auto"),
                          ("--sample-steps", f"recipe, spare {spare.sample_steps}")]:
        block = " ".join(unlearn_help.split(f"  {flag} ", 1)[1].split("\n  --", 1)[0].split())
        assert f"(default: {default}" in block or f"{default})" in block, (flag, block)
    from spare_core.recipes import RECIPES  # the demo trains the recipe's steps
    assert f"(default: {RECIPES['spare'].steps})" in demo_help and "(default: 20)" in bench_help
    assert not os.path.exists(out)


def test_refuses_to_overwrite_without_flag(pipe_dir, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"someone else's data")
    assert main(_args(pipe_dir, str(out))) == 2
    assert "--out" in (err := capsys.readouterr().err) and "already exists" in err
    assert out.read_bytes() == b"someone else's data"
    grid = tmp_path / "g.png"
    grid.write_bytes(b"x")
    merged = tmp_path / "merged"
    merged.mkdir()
    for extra, flag in ([["--grid", str(grid)], "--grid"], [["--merged-out", str(merged)], "--merged-out"]):
        assert main(_args(pipe_dir, str(tmp_path / "new.safetensors"), *extra)) == 2
        assert f"{flag} {str(extra[1])!r} already exists" in capsys.readouterr().err
    assert not (tmp_path / "new.safetensors").exists()
    assert main(_args(pipe_dir, str(out), "--overwrite")) == 0
    assert load_adapter(str(out)).meta["concept"] == "a cat"


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    """A real SIGINT while the command runs (models loaded, bars drawing): status 130, one line,
    no traceback, no files."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # a shell that runs the suite in the background (``make test &``) starts it with SIGINT
    # ignored, and Python then installs no Ctrl-C handler: give the child a terminal's default
    proc = subprocess.Popen([sys.executable, "-m", "spare_core.cli", "demo", "--out", str(out),
                             "--n", "2", "--steps", "500"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()  # printed once the models are loaded
    assert "forgetting" in line, line + proc.stderr.read()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("spare: interrupted")
    assert not (out / "grid.png").exists() and not (out / "metrics.json").exists()


def test_phases_each_get_a_bar_and_libraries_stay_quiet(pipe_dir, tmp_path, capsys):
    # a ranked selection, so the saliency phase runs too (the recipe's selection needs none)
    assert main(_args(pipe_dir, str(tmp_path / "a.safetensors"), "--preserve", "a tree",
                      "--module-selection", "saliency")) == 0
    err = capsys.readouterr().err
    for phase in ("spare: concept samples", "spare: saliency", "spare: preserve pool 1",
                  "spare: preserve pool 2", "spare: timestep gaps", "spare: training"):
        assert phase in err, phase
    assert "Loading weights" not in err and "Traceback" not in err


def test_merged_out_equals_the_adapter_applied(pipe_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from spare_core import DiffusersDenoiser

    out, merged = str(tmp_path / "a.safetensors"), str(tmp_path / "merged")
    assert main(_args(pipe_dir, out, "--merged-out", merged)) == 0
    assert sorted(os.listdir(merged)) == sorted(os.listdir(pipe_dir))
    den = DiffusersDenoiser.from_pretrained(pipe_dir)
    baked = UNet2DConditionModel.from_pretrained(merged, subfolder="unet").eval()
    _assert_same_as_native(den, out, lambda x, t, c: baked(x, t, encoder_hidden_states=c).sample,
                           atol=1e-6, rtol=1e-5)


def test_cli_method_names_match_the_engine():
    from spare_core import cli_args
    from spare_core.methods import CONCEPT_METHODS, DATA_METHODS

    assert cli_args.CONCEPT_METHODS == CONCEPT_METHODS and cli_args.DATA_METHODS == DATA_METHODS


@pytest.mark.parametrize("method", ["salun", "esd", "uce"])
def test_unlearn_runs_other_concept_methods(pipe_dir, tmp_path, method):
    out = str(tmp_path / f"{method}.safetensors")
    assert main(_args(pipe_dir, out, "--method", method)) == 0
    from diffusers import UNet2DConditionModel
    ad = load_adapter(out, unet=UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet"))
    assert ad.meta["method"] == method
    if method == "esd":  # ESD-x: only cross-attention (attn2) weights are trained
        assert ad.names and all(".attn2." in n for n in ad.names)
    if method == "uce":  # closed form on the cross-attention keys and values
        assert ad.names and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in ad.names)


def _image_folder(path, n: int, seed: int) -> str:
    """``n`` random 8x8 RGBA PNGs (the tiny UNet is pixel-space with 4 channels)."""
    import numpy as np
    from PIL import Image

    os.makedirs(path)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA").save(
            os.path.join(path, f"{i:02d}.png"))
    return str(path)


def test_unlearn_data_method_from_image_folders(pipe_dir, tmp_path, capsys):
    forget = _image_folder(tmp_path / "forget", 2, 0)
    keep = _image_folder(tmp_path / "keep", 4, 1)
    out, grid = str(tmp_path / "siss.safetensors"), str(tmp_path / "grid.png")
    assert main(["unlearn", "--model", pipe_dir, "--method", "siss", "--forget-images", forget,
                 "--keep-images", keep, "--param", "lambda_=0.3", "--out", out, "--steps", "2",
                 "--sample-steps", "2", "--grid", grid]) == 0
    from diffusers import UNet2DConditionModel
    ad = load_adapter(out, unet=UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet"))
    assert ad.meta["method"] == "siss" and os.path.exists(grid)
    assert "siss, " in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--method", "siss", "--concept", "a cat"], "instead of --concept"),
    (["--method", "siss"], "needs --forget-images"),
    (["--method", "spare"], "give --concept"),
    (["--method", "esd", "--concept", "a cat", "--param", "lambda_=0.5"], "esd does not take ['lambda_']"),
    (["--method", "esd", "--concept", "a cat", "--param", "eta"], "--param: takes KEY=VALUE"),
    (["--method", "spare", "--concept", "a cat", "--out", "x.pt"], "--out must end in .safetensors"),
])
def test_unlearn_method_flags_are_checked(pipe_dir, tmp_path, capsys, extra, message):
    assert main(["unlearn", "--model", pipe_dir, "--steps", "2", *extra]) == 2
    assert message in capsys.readouterr().err


def test_unlearn_in_bfloat16_with_the_memory_controls(pipe_dir, tmp_path):
    """A bf16 pipeline with checkpointing, split backward and saliency micro-batches trains and
    writes a float32 adapter that loads on the float32 model."""
    out = str(tmp_path / "bf16.safetensors")
    assert main(_args(pipe_dir, out, "--dtype", "bfloat16", "--gradient-checkpointing",
                      "--split-backward", "--micro-batch", "1")) == 0
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet")
    ad = load_adapter(out, unet=unet, strict=False)
    assert all(p.dtype == torch.float32 for p in ad.parameters())
    assert any(float(ad[n].lora_B.detach().abs().sum()) > 0 for n in ad.names)


def test_repeated_concept_erases_several_per_concept_or_in_one_shared_adapter(pipe_dir, tmp_path,
                                                                             capsys):
    """``--concept`` repeated (with one ``--surrogate`` each): by default one adapter per
    concept, fused by least squares (what the lists' table chose; the node's default too);
    ``--shared`` trains one adapter for both. Either file's metadata lists them one per line, the
    grid has a row per prompt; ``--shared`` with ``--per-concept`` is refused."""
    from diffusers import UNet2DConditionModel
    from PIL import Image

    args = ["unlearn", "--model", pipe_dir, "--concept", "a cat", "--concept", "a fox",
            "--surrogate", "a dog", "--surrogate", "a cow", "--preserve", "the ocean",
            "--steps", "3", "--num-samples", "2", "--sample-steps", "3"]
    unet = UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet")
    for extra, per in (([], "true"), (["--shared"], None)):
        out, grid = str(tmp_path / f"two{len(extra)}.safetensors"), str(tmp_path / f"two{len(extra)}.png")
        assert main(args + extra + ["--out", out, "--grid", grid]) == 0
        ad = load_adapter(out, unet=unet)
        assert ad.meta["concept"] == "a cat\na fox" and ad.meta["surrogate"] == "a dog\na cow"
        assert ad.meta.get("per_concept") == per
        assert ad.meta.get("fusion") == ("least_squares" if per else None)
        assert Image.open(grid).size[1] >= 5 * 64  # a cat, a dog, a fox, a cow, the ocean
    bad = str(tmp_path / "bad.safetensors")
    assert main(args + ["--shared", "--per-concept", "--out", bad]) == 2
    assert "--per-concept and --shared contradict" in capsys.readouterr().err
    assert not os.path.exists(bad)



def test_surrogate_count_must_match_the_concepts(pipe_dir, tmp_path, capsys):
    args = ["unlearn", "--model", pipe_dir, "--concept", "a cat", "--concept", "a fox",
            "--surrogate", "a dog", "--surrogate", "a cow", "--surrogate", "an owl",
            "--out", str(tmp_path / "x.safetensors"), "--steps", "3"]
    assert main(args) == 2
    assert "2 concepts but 3 guides" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_probe_attacks_the_erased_model_and_writes_grid_and_json(pipe_dir, tmp_path, capsys):
    import json

    out = str(tmp_path / "a.safetensors")
    assert main(_args(pipe_dir, out)) == 0
    grid, js = str(tmp_path / "probe.png"), str(tmp_path / "probe.json")
    args = ["probe", "--model", pipe_dir, "--adapter", out, "--concept", "a cat",
            "--attack-steps", "2", "--attack-tokens", "2", "--num-images", "2",
            "--sample-steps", "2", "--grid", grid, "--json", js, "--paraphrase", "a kitten"]
    assert main(args) == 0
    found = json.load(open(js))["found"]["a cat"]
    assert found.endswith(" a cat") and len(found.split()) == 4
    assert f"found prompt {found!r}" in capsys.readouterr().out
    from PIL import Image
    w, h = Image.open(grid).size
    assert w > 3 * 2 * 64 and h >= 2 * 64  # original, erased, found prompt; paraphrase row
    assert main(args) == 2 and "--grid" in capsys.readouterr().err  # no overwrite


SD15_UNET_PARAMETERS = 859_520_964  # the SD1.5 UNet (benchmarks/memory.py's SD1.5 shape)


def test_auto_settings_fit_an_8gb_card_and_explicit_flags_win(monkeypatch):
    """--dtype auto and the memory controls' auto: an SD1.5-sized UNet on a GPU with 8 GB free
    gets bf16 and every control on (the meter's phases at those settings: 2.17 GB or less), on
    80 GB free
    every control off; a GPU without bf16 gets float16; the CPU float32, controls off; a flag the
    user gave is kept."""
    from spare_core import auto_settings as auto

    gb = 2 ** 30
    monkeypatch.setattr(auto, "bf16_supported", lambda device: True)
    monkeypatch.setattr(auto, "free_device_memory", lambda device: 8 * gb)
    small = auto.choose("cuda", SD15_UNET_PARAMETERS)
    assert (small.dtype, small.gradient_checkpointing, small.split_backward,
            small.micro_batch, small.text_encoders) == ("bfloat16", True, True, 1, "cpu")
    assert "8.0 GB free on cuda < 6 x 1.60 GB of bfloat16 weights" in " ".join(small.reasons)
    assert auto.choose("cuda", SD15_UNET_PARAMETERS, needs_text_encoder=True,
                       ).text_encoders == "device"  # a run that differentiates through it
    kept = auto.choose("cuda", SD15_UNET_PARAMETERS, dtype="float32",
                       gradient_checkpointing=False, micro_batch=4)
    assert (kept.dtype, kept.gradient_checkpointing, kept.split_backward,
            kept.micro_batch) == ("float32", False, True, 4)  # 8 GB < 6 x 3.2 GB: split on
    monkeypatch.setattr(auto, "free_device_memory", lambda device: 80 * gb)
    big = auto.choose("cuda", SD15_UNET_PARAMETERS)
    assert (big.gradient_checkpointing, big.split_backward, big.micro_batch,
            big.text_encoders) == (False, False, 8, "device")
    monkeypatch.setattr(auto, "bf16_supported", lambda device: False)
    assert auto.choose("cuda", SD15_UNET_PARAMETERS).dtype == "float16"
    monkeypatch.setattr(auto, "free_device_memory", lambda device: None)
    cpu = auto.choose("cpu", SD15_UNET_PARAMETERS)
    assert (cpu.dtype, cpu.gradient_checkpointing, cpu.micro_batch,
            cpu.text_encoders) == ("float32", False, 8, "device")


def test_cli_prints_what_auto_chose_from_the_folders_parameter_count(pipe_dir, tmp_path,
                                                                     capsys):
    from spare_core.auto_settings import network_parameters

    den = tiny_denoiser()
    assert network_parameters(pipe_dir) == sum(p.numel() for p in den.unet.parameters())
    out = str(tmp_path / "a.safetensors")
    assert main(["unlearn", "--model", pipe_dir, "--concept", "a cat", "--surrogate", "a dog",
                 "--steps", "1", "--num-samples", "1", "--sample-steps", "1", "--out", out]) == 0
    err = capsys.readouterr().err
    assert "auto: dtype float32 (the CPU computes in float32)" in err
    assert "gradient checkpointing off, split backward off, micro-batch 8 (cpu: memory is the " \
           "machine's RAM)" in err


def test_text_encoders_stay_on_the_device_when_the_run_differentiates_through_them():
    """--text-encoders auto never moves the encoders off the device for a run that back-
    propagates through them: SPARE's text_encoder localisation, or the adversarial option's
    prompt attack (given as a flag, a --param, or not at all: the recipe's value)."""
    from spare_core.cli import _needs_text_encoder

    assert _needs_text_encoder("spare", {"module_selection": "text_encoder"})
    assert _needs_text_encoder("spare", {"adversarial": True})
    assert not _needs_text_encoder("spare", {})  # the recipe: neither
    assert not _needs_text_encoder("siss", {})
