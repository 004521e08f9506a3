"""Wall time of a list of concepts through ``spare unlearn`` (issue 24): one concept's run, the
list in one process, the list over N processes (``--processes N``: torchrun, gloo on CPUs), each
a fresh CLI process with one thread per process; prints a markdown table with the ratios the
issue bounds (list in one process <= k x one concept + 10%; N processes <= 0.6 of one process).

    python benchmarks/list_wall_time.py                       # canvas, four styles, 2 processes
    python benchmarks/list_wall_time.py --concepts "stripes style,dots style" --processes 2

Run it with nothing else on the machine: the processes share its cores. The adapters are
written to a temporary folder and deleted.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANVAS = os.path.join(ROOT, "spare_core", "assets", "canvas")
STYLES4 = "stripes style,dots style,outline style,gradient style"
PRESERVE = "checker style,grain style,neon style"


def timed(args: list[str], threads: int) -> float:
    """Seconds of wall time of ``python -m spare_core.cli *args`` (raises when it fails)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "spare_core.cli", *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    secs = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"spare {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return secs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=CANVAS, help="pipeline folder (default: the canvas model)")
    p.add_argument("--concepts", default=STYLES4, help="the list, comma-separated")
    p.add_argument("--surrogate", default="plain style")
    p.add_argument("--preserve", default=PRESERVE, help="shared preserved prompts, comma-separated")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    a = p.parse_args()
    concepts = [c.strip() for c in a.concepts.split(",") if c.strip()]
    if len(concepts) < 2 or a.processes < 2:
        p.error("give at least 2 concepts and --processes 2 or more")
    keep = [x for c in a.preserve.split(",") if c.strip() for x in ("--preserve", c.strip())]

    with tempfile.TemporaryDirectory() as tmp:
        listed = os.path.join(tmp, "list.txt")
        with open(listed, "w") as f:
            f.write("".join(f"{c} | {a.surrogate}\n" for c in concepts))
        base = ["unlearn", "--model", a.model, *keep]
        one = timed([*base, "--concept", concepts[0], "--surrogate", a.surrogate,
                     "--out", os.path.join(tmp, "one.safetensors")], a.threads)
        print(f"one concept: {one:.1f} s", flush=True)
        lst = timed([*base, "--concept-list", listed, "--out",
                     os.path.join(tmp, "list1.safetensors")], a.threads)
        print(f"list, one process: {lst:.1f} s", flush=True)
        par = timed([*base, "--concept-list", listed, "--processes", str(a.processes),
                     "--out", os.path.join(tmp, "list2.safetensors")], a.threads)
        print(f"list, {a.processes} processes: {par:.1f} s", flush=True)

    k = len(concepts)
    print(f"\n| run | wall seconds | against |\n|---|---|---|\n| one concept | {one:.1f} | |\n"
          f"| list of {k}, one process | {lst:.1f} | {lst / one / k:.2f} x {k} single runs "
          f"(aim: at most 1.10) |\n"
          f"| list of {k}, {a.processes} processes | {par:.1f} | {par / lst:.2f} of one process "
          f"(aim: at most 0.60) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
