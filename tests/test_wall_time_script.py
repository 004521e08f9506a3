"""benchmarks/wall_time.py's phase clock: every second of a run lands in the phase the engine
was in (the preserved prompts' pools as one phase, the first training step with the others)."""
import importlib.util
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wall_time():
    path = os.path.join(REPO, "benchmarks", "wall_time.py")
    spec = importlib.util.spec_from_file_location("wall_time", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))  # it reads the meter's networks from memory.py
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.dirname(path))
    return mod


def test_phases_follow_the_engine_reports_and_the_first_step_is_a_training_step(monkeypatch):
    clock = _wall_time().PhaseClock(torch.device("cpu"))
    now = [0.0]
    monkeypatch.setattr(clock, "_now", lambda: now[0])

    def at(t, call, *args):
        now[0] = t
        call(*args)

    at(0.0, clock.enter, "set-up")
    at(1.0, clock.phase, "concept samples", 1, 2)
    at(3.0, clock.phase, "concept samples", 2, 2)
    at(4.0, clock.phase, "preserve pool 1", 1, 1)
    at(6.0, clock.phase, "preserve pool 2", 1, 1)
    at(7.0, clock.phase, "timestep gaps", 1, 2)
    at(8.0, clock.phase, "timestep gaps", 2, 2)  # gaps done: training starts now
    at(10.0, clock.step, 1, 2, 0.5)
    at(12.0, clock.step, 2, 2, 0.4)
    at(12.5, clock.end)
    assert [(name, secs) for name, secs, _ in clock.rows] == [
        ("set-up", 1.0), ("concept samples", 3.0), ("preserve pools", 3.0),
        ("timestep gaps", 1.0), ("training steps", 4.5)]
