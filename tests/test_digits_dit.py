"""The embedded flow-matching digits model (digits-dit): committed folder and config, and the
engine's sampler (DDIM on a flow = the Euler step) drawing the prompted digits."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from spare_core.digits import metrics as M  # noqa: E402
from spare_core.digits.data import PROMPTS, prompt_for  # noqa: E402
from spare_core.digits.dit import DitConfig, build_flow_scheduler, build_transformer  # noqa: E402
from spare_core.families.sd3 import SD3Denoiser  # noqa: E402
from spare_core.sampling import sample  # noqa: E402

DIT_MODEL = M.DIT_MODEL


@pytest.fixture(scope="module")
def dit():
    return M.load_default_model(name="digits-dit")


def euler_sample(den, prompts, steps: int = 10, generator=None):
    return sample(den, prompts, steps=steps, guidance=3.0, method=M.default_sampler(den),
                  generator=generator, clip_x0=1.0).clamp(-1, 1)


def test_committed_dit_folder_loads(dit):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    for f in ("README.md", "training.json", "eval.json"):
        assert os.path.isfile(os.path.join(DIT_MODEL, f)), f
    assert isinstance(dit, SD3Denoiser) and M.default_sampler(dit) == "ddim"
    assert isinstance(dit.unet, SD3Transformer2DModel)
    assert isinstance(dit.scheduler, FlowMatchEulerDiscreteScheduler)
    assert dit.scheduler.config.num_train_timesteps == 1000
    assert dit.scheduler.config.shift == 1.0
    c = dit.unet.config
    assert (c.sample_size, c.in_channels, c.out_channels) == (8, 1, 1)
    assert c.joint_attention_dim == 64 and c.pooled_projection_dim == 64
    assert c.caption_projection_dim == c.num_attention_heads * c.attention_head_dim
    assert c.patch_size in (1, 2)
    n = sum(p.numel() for p in dit.unet.parameters())
    assert 3e5 < n < 1.5e6
    ctx = dit.encode(PROMPTS + [""])
    assert ctx.shape == (11, 16, 64) and ctx.field("pooled").shape == (11, 64)
    assert M.EMBEDDED_MODELS["digits-dit"] == DIT_MODEL


def test_text_encoder_is_the_digits_models(dit):
    """Same tokenizer ids and bit-identical text-encoder weights as the UNet digits model."""
    from transformers import CLIPTextModel, CLIPTokenizer

    te = CLIPTextModel.from_pretrained(M.DEFAULT_MODEL, subfolder="text_encoder",
                                       use_safetensors=True)
    tok = CLIPTokenizer.from_pretrained(M.DEFAULT_MODEL, subfolder="tokenizer")
    from transformers import CLIPTokenizer as Tok
    dit_te = CLIPTextModel.from_pretrained(DIT_MODEL, subfolder="text_encoder",
                                           use_safetensors=True)
    ref, got = te.state_dict(), dit_te.state_dict()
    assert set(ref) == set(got)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    dit_tok = Tok.from_pretrained(DIT_MODEL, subfolder="tokenizer")
    for p in PROMPTS + [""]:
        assert dit_tok(p).input_ids == tok(p).input_ids


def test_short_euler_sample_classifies_to_prompted_digits(dit):
    clf = M.load_classifier()
    digits = [0, 1, 2, 3, 5, 7, 8, 9]
    x = euler_sample(dit, [prompt_for(d) for d in digits], steps=10,
                     generator=torch.Generator().manual_seed(0))
    assert x.shape == (8, 1, 8, 8)
    assert x.min() >= -1 and x.max() <= 1
    acc = (clf.predict(x) == torch.tensor(digits)).float().mean().item()
    assert acc >= 0.75


def test_euler_sample_is_deterministic(dit):
    a = euler_sample(dit, ["a handwritten digit four"] * 2, steps=3,
                     generator=torch.Generator().manual_seed(1))
    b = euler_sample(dit, ["a handwritten digit four"] * 2, steps=3,
                     generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_tiny_build_transformer_forward_shape():
    cfg = DitConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8)
    torch.manual_seed(0)
    tr = build_transformer(cfg)
    assert tr.config.caption_projection_dim == 16
    out = tr(torch.randn(3, 1, 8, 8), encoder_hidden_states=torch.randn(3, 16, 64),
             pooled_projections=torch.randn(3, 64), timestep=torch.rand(3) * 1000).sample
    assert out.shape == (3, 1, 8, 8)
    sched = build_flow_scheduler(cfg)
    assert sched.config.num_train_timesteps == 1000 and sched.config.shift == 1.0
