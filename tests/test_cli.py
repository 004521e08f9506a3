"""``spare unlearn`` on a pipeline folder saved with save_pretrained (offline)."""
import os

import pytest
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
    import torch
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
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    ctx = den.encode(["a cat", "the ocean"])
    with torch.no_grad():
        base = den.eps(x, t, ctx)
        with load_adapter(native, unet=den.unet).applied(den.unet):
            want = den.eps(x, t, ctx)
        pipe.load_lora_weights(lora)
        got = den.eps(x, t, ctx)
    assert float((want - base).abs().max()) > 1e-4  # the run changed the UNet
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bad_input_exits_with_message(pipe_dir, tmp_path, capsys):
    out = str(tmp_path / "a.safetensors")
    assert main(_args(pipe_dir, out, "--steps", "0")) == 2
    assert "steps must be" in capsys.readouterr().err
    assert not os.path.exists(out)
    assert main(["unlearn", "--model", str(tmp_path), "--concept", "x", "--out", out]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["salun", "esd"])
def test_unlearn_runs_other_concept_methods(pipe_dir, tmp_path, method):
    out = str(tmp_path / f"{method}.safetensors")
    assert main(_args(pipe_dir, out, "--method", method)) == 0
    from diffusers import UNet2DConditionModel
    ad = load_adapter(out, unet=UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet"))
    assert ad.meta["method"] == method
    if method == "esd":  # ESD-x: only cross-attention (attn2) weights are trained
        assert ad.names and all(".attn2." in n for n in ad.names)


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
    (["--method", "esd", "--concept", "a cat", "--param", "eta"], "--param takes KEY=VALUE"),
    (["--method", "spare", "--concept", "a cat", "--out", "x.pt"], "--out must end in .safetensors"),
])
def test_unlearn_method_flags_are_checked(pipe_dir, tmp_path, capsys, extra, message):
    assert main(["unlearn", "--model", pipe_dir, "--steps", "2", *extra]) == 2
    assert message in capsys.readouterr().err
