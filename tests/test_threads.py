"""The CPU thread policy: one thread for small models unless the environment asks otherwise."""
import pytest
import torch

from spare_core import threads


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("SPARE_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return monkeypatch


def test_small_models_get_one_thread_large_ones_the_free_cores(clean_env):
    assert threads.choose_threads(800_000, cores=2, load=0.0) == 1
    assert threads.choose_threads(860_000_000, cores=16, load=0.2) == 16
    assert threads.choose_threads(860_000_000, cores=16, load=5.6) == 10
    assert threads.choose_threads(860_000_000, cores=2, load=2.1) == 1  # busy box: one thread
    assert threads.choose_threads(860_000_000, cores=2, load=9.0) == 1


def test_environment_overrides(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(800_000) == 3
    clean_env.setenv("SPARE_THREADS", "2")  # SPARE_THREADS wins over OMP_NUM_THREADS
    assert threads.choose_threads(800_000) == 2
    clean_env.setenv("SPARE_THREADS", "two")
    with pytest.raises(ValueError, match="SPARE_THREADS='two' is not a positive integer"):
        threads.choose_threads(800_000)


def test_apply_sets_torch_threads(clean_env):
    from tiny_models import tiny_denoiser

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert threads.apply(tiny_denoiser()) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
