"""Cost of SPARE's adversarial option on an embedded model: plain and adversarial SPARE trained
back to back in one process, alternating, with the bench's settings (the same concept pool,
steps and seed; ``spare bench`` trains with exactly these).

Prints, per run, the wall seconds of the whole method (concept samples, saliency, training) and,
for the adversarial runs, the seconds spent in attack rounds and the forget batches that got
attack rows (0: the gate never opened and the run is plain SPARE's); then each adversarial run's
time against the plain run before it.

    python benchmarks/adversarial_cost.py                              # digits, forget 3
    python benchmarks/adversarial_cost.py --model canvas --forget stripes
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spare_core.bench import run_concept_method  # noqa: E402
from spare_core.embedded import get  # noqa: E402
from spare_core.threads import apply as apply_threads  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits", choices=["digits", "canvas"])
    p.add_argument("--forget", default=None, help="digit or canvas concept (default 3 / stripes)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="plain/adversarial pairs")
    a = p.parse_args(argv)
    target = a.forget or ("3" if a.model == "digits" else "stripes")
    target = int(target) if a.model == "digits" else target
    den, _ = get(a.model).load()
    threads = apply_threads(den)
    print(f"{a.model}, forget {target}, {a.steps} steps, seed {a.seed}, {threads} thread(s)")
    plain = None
    for _ in range(a.repeats):
        for adversarial in (False, True):
            t0 = time.perf_counter()
            res = run_concept_method("spare", den, target, steps=a.steps, seed=a.seed,
                                     options={"adversarial": adversarial}, model=a.model)
            secs = time.perf_counter() - t0
            h = res.history
            if not adversarial:
                plain = secs
                print(f"plain        {secs:6.1f} s")
            else:
                print(f"adversarial  {secs:6.1f} s  ({secs / plain - 1:+.0%} on the plain run "
                      f"before), attack rounds {h['attack_seconds']:.1f} s, "
                      f"{h['adversarial_batches']} of {len(h['loss'])} batches with attack rows")


if __name__ == "__main__":
    main()
