"""CPU thread counts on a quiet and on a loaded machine: one forward+backward step per model.

For each model (the embedded digits UNet at batch 8; an 81 M-parameter diffusers UNet built from
a config, batch 2 at a 32x32 latent), thread count (1, 2) and OpenMP wait policy (default,
PASSIVE), a fresh child process times forward+backward steps (OMP_* set before torch is
imported) and reports the median and mean wall time and the CPU time per step. The "loaded" rows
run the same grid with one competing CPU-bound process per core (``python -c 'while True:
pass'``), killed after. The last column is the CPU that other processes used meanwhile (the
machine is shared: a "quiet" cell waits for it to fall under 0.3 cores first).

    python benchmarks/threads.py                       # quiet, then loaded; Markdown table
    python benchmarks/threads.py --models digits --loads quiet
    python benchmarks/threads.py --time .venv/bin/spare demo --overwrite   # time a command
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BIG = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
           block_out_channels=(96, 192, 384, 384), cross_attention_dim=768,
           attention_head_dim=8)  # diffusers' default (SD1.5) block types, narrower


def _child(model: str, reps: int, budget_s: float) -> dict:
    """Time ``reps`` forward+backward steps (after one warm-up) of ``model``; stop early once
    ``budget_s`` seconds are spent (at least 2 timed steps)."""
    import torch

    if model == "digits":
        from spare_core.digits.metrics import load_default_model
        den = load_default_model()
        unet, batch = den.unet, 8
        ctx = den.encode(["a handwritten digit three"] * batch)
        x = torch.randn(batch, *den.latent_shape)
    else:
        from diffusers import UNet2DConditionModel
        torch.manual_seed(0)
        unet, batch = UNet2DConditionModel(**BIG), 2
        ctx = torch.randn(batch, 77, BIG["cross_attention_dim"])
        x = torch.randn(batch, 4, BIG["sample_size"], BIG["sample_size"])
    unet.train()
    t = torch.randint(0, 1000, (batch,))
    params = sum(p.numel() for p in unet.parameters())

    def step() -> None:
        unet.zero_grad(set_to_none=True)
        unet(x, t, encoder_hidden_states=ctx).sample.square().mean().backward()

    step()
    walls, cpus, start = [], [], time.perf_counter()
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        if len(walls) >= 2 and time.perf_counter() - start > budget_s:
            break
    return {"params": params, "batch": batch, "threads": torch.get_num_threads(),
            "wall_ms": 1000 * statistics.median(walls), "cpu_ms": 1000 * statistics.median(cpus),
            "wall_mean_ms": 1000 * statistics.mean(walls),
            "wall_min_ms": 1000 * min(walls), "wall_max_ms": 1000 * max(walls), "n": len(walls)}


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot (Linux /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v) - idle, sum(v)


def _other_load(before: tuple[int, int], after: tuple[int, int], own_cpu_s: float,
                wall_s: float) -> float:
    """Cores kept busy by other processes over ``wall_s`` (machine busy time minus ours)."""
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, ((after[0] - before[0]) / hz - own_cpu_s) / wall_s)


def _wait_until_quiet(max_wait_s: float, limit: float = 0.3) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``limit`` cores for 3 s;
    returns the load seen last."""
    end = time.time() + max_wait_s
    while True:
        b = _busy_jiffies()
        time.sleep(3.0)
        load = _other_load(b, _busy_jiffies(), 0.0, 3.0)
        if load < limit or time.time() > end:
            return load


def _run_child(model: str, threads: int, wait: str, reps: int, budget_s: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               SPARE_THREADS=str(threads))
    env.pop("OMP_WAIT_POLICY", None)
    if wait == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", model, "--reps", str(reps),
           "--budget", str(budget_s)]
    import resource

    r0, j0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_jiffies(), time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    r1, j1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_jiffies(), time.perf_counter() - t0
    own = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["other_load"] = _other_load(j0, j1, own, wall)
    return res


def _spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def time_command(cmd: list[str]) -> int:
    """Run ``cmd`` (its stdout discarded) and print its wall and CPU time and the CPU other
    processes used meanwhile."""
    import resource

    r0, j0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_jiffies(), time.perf_counter()
    rc = subprocess.call(cmd, stdout=subprocess.DEVNULL)
    r1, j1 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_jiffies()
    wall = time.perf_counter() - t0
    u, s = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    print(f"rc={rc} wall={wall:.1f}s user={u:.1f}s sys={s:.1f}s "
          f"others_load={_other_load(j0, j1, u + s, wall):.2f} cores")
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="digits,big", help="comma list of digits, big")
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts")
    ap.add_argument("--waits", default="default,passive", help="comma list of default, passive")
    ap.add_argument("--loads", default="quiet,loaded", help="comma list of quiet, loaded")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per cell (median reported)")
    ap.add_argument("--budget", type=float, default=40.0, help="seconds per cell before stopping")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="before each quiet cell, wait up to this many seconds for other "
                         "processes to use under 0.3 cores")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--time", nargs=argparse.REMAINDER, default=None, metavar="COMMAND",
                    help="instead: run COMMAND, print its wall/CPU time and others' load")
    a = ap.parse_args(argv)
    if a.time:
        return time_command(a.time)
    if a.child:
        print(json.dumps(_child(a.child, a.reps, a.budget)))
        return 0
    cores = os.cpu_count() or 1
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {cores} cores, load average before: "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    print("| model | params | batch | load | threads | OMP_WAIT_POLICY | wall ms (median) | "
          "wall ms (mean) | wall ms (min-max) | CPU ms per step (median) | steps | "
          "others' load (cores) |")
    print("|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for load in a.loads.split(","):
        procs = _spinners(cores) if load == "loaded" else []
        try:
            time.sleep(1.0 if procs else 0.0)
            for model in a.models.split(","):
                for wait in a.waits.split(","):
                    for th in (int(x) for x in a.threads.split(",")):
                        if not procs:
                            _wait_until_quiet(a.quiet_wait)
                        r = _run_child(model, th, wait, a.reps, a.budget)
                        print(f"| {model} | {r['params'] / 1e6:.2f} M | {r['batch']} | {load} | "
                              f"{r['threads']} | {wait} | {r['wall_ms']:.0f} | "
                              f"{r['wall_mean_ms']:.0f} | "
                              f"{r['wall_min_ms']:.0f}-{r['wall_max_ms']:.0f} | "
                              f"{r['cpu_ms']:.0f} | {r['n']} | {r['other_load']:.2f} |",
                              flush=True)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
