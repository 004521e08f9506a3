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


def test_bad_input_exits_with_message(pipe_dir, tmp_path, capsys):
    out = str(tmp_path / "a.safetensors")
    assert main(_args(pipe_dir, out, "--steps", "0")) == 2
    assert "steps must be" in capsys.readouterr().err
    assert not os.path.exists(out)
    assert main(["unlearn", "--model", str(tmp_path), "--concept", "x", "--out", out]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
