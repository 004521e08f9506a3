import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# One thread unless SPARE_TEST_THREADS says otherwise: the tests run tiny models, which a second
# thread barely speeds up on a quiet machine and slows many-fold on a busy one (OpenMP workers
# spin while descheduled; benchmarks/RESULTS.md, "CPU threads").
torch.set_num_threads(int(os.environ.get("SPARE_TEST_THREADS", "1")))

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


class RepositoryRootIsADirectory:
    """Collect the repository root as a plain directory, not as a test package.

    The root holds ComfyUI's entry point ``__init__.py``, so pytest would make the root a
    ``Package`` and import that file under a name taken from the folder. README's ComfyUI install
    folder ``custom_nodes/spare-unlearn`` is no Python identifier, so pytest would import it as a
    top-level module and its relative import would fail for every test. The tests import the pack
    the way ComfyUI does instead (``comfy_double.load_pack``). A plugin, not a conftest hook: the
    root's collector is made before this folder's conftest hooks apply.
    """

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if os.path.normcase(os.path.abspath(path)) == os.path.normcase(self.root):
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    if hasattr(pytest, "Dir"):  # pytest >= 8 (requirements-test.txt); 7 has no directory nodes
        config.pluginmanager.register(RepositoryRootIsADirectory(), "spare-repository-root")
