import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(int(os.environ.get("SPARE_TEST_THREADS", "2")))

from tiny_models import tiny_denoiser  # noqa: E402


@pytest.fixture
def den():
    """A fresh tiny diffusers denoiser (seeded: identical in every test)."""
    return tiny_denoiser(0)


def unet_state(unet):
    """Deep copy of every tensor of a UNet, to check bit-identity later."""
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def assert_state_equal(unet, saved):
    now = unet.state_dict()
    assert set(now) == set(saved), "UNet parameter names changed"
    for k, v in saved.items():
        assert torch.equal(now[k], v), f"{k} changed"
