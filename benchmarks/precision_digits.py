"""SPARE end to end in float32, bfloat16 and float16 on the embedded digits model: the same run
(`spare demo`'s settings: forget "three" -> "four", 100 steps) with the UNet stored and computed
in each dtype; prints UA / RA / FD before and after, the final loss scale and skipped steps.

    python benchmarks/precision_digits.py [--dtypes float32,bfloat16,float16] [--n 10]

The adapter trains in float32 in every case; float16 uses the loop's dynamic loss scaling.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spare_core import DiffusersDenoiser, spare_unlearn  # noqa: E402
from spare_core.digits.bench import digit_metrics, spare_digits_defaults  # noqa: E402
from spare_core.digits import metrics as M  # noqa: E402
from spare_core.digits.data import prompt_for  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--forget", type=int, default=3)
    ap.add_argument("--n", type=int, default=10, help="samples per digit for the metrics")
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args(argv)
    clf = M.load_classifier()
    sur = (a.forget + 1) % 10
    print(f"{'dtype':<10}{'UA':>13}{'RA':>13}{'FD_forget':>20}{'FD_retain':>16}"
          f"{'final loss':>12}{'loss scale':>12}{'skipped':>9}{'seconds':>9}")
    for name in a.dtypes.split(","):
        dtype = getattr(torch, name)
        base = M.load_default_model()
        den = DiffusersDenoiser(base.unet.to(dtype), base.text_encoder, base.tokenizer,
                                base.scheduler)
        t0 = time.perf_counter()
        before = digit_metrics(den, clf, a.forget, a.n, 0, M.SAMPLE_STEPS)
        res = spare_unlearn(den, prompt_for(a.forget), prompt_for(sur),
                            [prompt_for(d) for d in range(10) if d != a.forget],
                            **spare_digits_defaults(a.steps, 0))
        with res.adapter.applied(den.unet):
            after = digit_metrics(den, clf, a.forget, a.n, 0, M.SAMPLE_STEPS)
        h = res.history
        print(f"{name:<10}{before['UA']:>6.3f}->{after['UA']:.3f}{before['RA']:>6.3f}->"
              f"{after['RA']:.3f}{before['FD_forget']:>9.1f}->{after['FD_forget']:<9.1f}"
              f"{before['FD_retain']:>7.1f}->{after['FD_retain']:<7.1f}{h['loss'][-1]:>12.4g}"
              f"{h['loss_scale']:>12.0f}{h['skipped_steps']:>9d}{time.perf_counter() - t0:>9.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
