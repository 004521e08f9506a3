"""Wall time of one whole erasure at the shipped defaults, phase by phase, on a real-size network
with random weights: what ``spare unlearn`` (and ``run_method("spare", ...)``) runs, from the
concept images to the last training step, with the peak device memory of each phase.

    python benchmarks/wall_time.py --device cuda --arch sd15 --size 512 --dtype float16
    python benchmarks/wall_time.py --device cuda --arch sdxl --size 1024 --dtype bfloat16
    python benchmarks/wall_time.py --device cuda --arch flux --storage fp8 --size 1024 --dtype bfloat16
    python benchmarks/wall_time.py --device cpu --arch sd15 --size 64 --steps 2 --samples 2   # a smoke run

The network, its stand-in text encoders (fixed random contexts of the real shapes, made on the
host: the encoders' own time is not counted) and the fp8 storage are those of
``benchmarks/memory.py``. The settings are the recipe's (``spare_core.recipes``), two preserved
prompts as in the shipped workflows (and the empty prompt the recipe adds, ``preserve_uncond``), and the memory controls ``spare unlearn`` picks on this
device (``spare_core.auto_settings.choose``: on where free memory is under 6x the weights;
printed), or forced with ``--controls on|off`` (on: the nodes' defaults); ``--steps`` and
``--samples`` shrink a smoke run. Phases: the concept
images, (saliency: only for a ranked module selection), each preserved prompt's pool, the
timestep gaps, the training steps. This is the API and CLI path; the ComfyUI node path needs a
ComfyUI on the same machine and is not timed here.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memory import DITS, NAMES, PRESERVE, build  # noqa: E402  (the meter's networks)

from spare_core import run_method  # noqa: E402
from spare_core.auto_settings import choose  # noqa: E402
from spare_core.recipes import RECIPES, SALIENCY_MICRO_BATCH  # noqa: E402

SPARE = RECIPES["spare"]


class PhaseClock:
    """Seconds and peak device bytes of each phase, from the engine's progress callbacks: a
    phase ends when the next one reports (or the run ends). On CUDA the clock synchronizes."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.rows, self.current, self.start = device, [], None, 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _peak(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def enter(self, name: str) -> None:
        if name == self.current:
            return
        now = self._now()
        if self.current is not None:
            self.rows.append((self.current, now - self.start, self._peak()))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.current, self.start = name, now

    def end(self) -> None:
        self.enter("")  # closes the last phase
        self.current = None

    def phase(self, what: str, done: int, total: int) -> None:
        self.enter("preserve pools" if what.startswith("preserve pool") else what)
        if what == "timestep gaps" and done == total:  # the last phase before training (the
            self.enter("training steps")  # recipe's sampler), whose first report ends step 1

    def step(self, step: int, steps: int, loss: float) -> None:
        self.enter("training steps")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--arch", default="sd15", choices=["sd15", "sdxl", *DITS])
    p.add_argument("--storage", choices=["fp8"], default=None,
                   help="store the network's layers in float8_e4m3fn, computed in --dtype")
    p.add_argument("--size", type=int, default=512, help="image size in pixels")
    p.add_argument("--steps", type=int, default=SPARE.steps, help="training steps (the recipe's)")
    p.add_argument("--samples", type=int, default=SPARE.num_samples,
                   help="images per concept and per preserved prompt (the recipe's)")
    p.add_argument("--controls", choices=["auto", "on", "off"], default="auto",
                   help="gradient checkpointing, split backward and saliency micro-batch 1: "
                        "as spare unlearn's auto picks them on this device, or forced")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    device = torch.device(a.device)
    t0 = time.perf_counter()
    den = build(a.device, dtype, a.size, a.arch, fp8=a.storage == "fp8")
    built = time.perf_counter() - t0
    forced = None if a.controls == "auto" else a.controls == "on"
    auto = choose(a.device, sum(p.numel() for p in den.unet.parameters()), dtype=a.dtype,
                  gradient_checkpointing=forced, split_backward=forced,
                  micro_batch=None if forced is None else (1 if forced else SALIENCY_MICRO_BATCH),
                  text_encoders="device")  # stand-in encoders: contexts made on the host
    print("controls: " + "; ".join(auto.reasons or ["forced"]))
    clock = PhaseClock(device)
    clock.enter("set-up (prompts, checks)")
    run_method("spare", den, concept="a concept", surrogate="a surrogate",
               preserve=[f"kept prompt {i}" for i in range(PRESERVE)], steps=a.steps,
               num_samples=a.samples, seed=0, gradient_checkpointing=auto.gradient_checkpointing,
               backward_per_term=auto.split_backward, saliency_batch_size=auto.micro_batch,
               phase_progress=clock.phase, progress=clock.step)
    clock.end()
    total = sum(secs for _, secs, _ in clock.rows)
    what = f"{NAMES[a.arch]}, {a.size} px, {a.dtype}" + (", fp8 storage" if a.storage else "")
    print(f"\n{what} on {device} (built in {built:.0f} s): the whole erasure at the shipped "
          f"defaults ({a.steps} steps, {a.samples} images per prompt, {PRESERVE} preserved "
          f"prompts{' and the empty one' if SPARE.hparams['preserve_uncond'] else ''}, "
          f"{SPARE.hparams['module_selection']} r{SPARE.hparams['rank']}), "
          f"{total:.1f} s\n")
    print("| phase | seconds | peak device GB |\n|---|---:|---:|")
    for name, secs, peak in clock.rows:
        if not name.startswith("set-up") or secs >= 0.05:
            print(f"| {name} | {secs:.1f} | {'' if peak is None else f'{peak:.2f}'} |")
    print(f"| **whole erasure** | **{total:.1f}** | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
