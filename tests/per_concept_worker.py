"""One process of the 2-process per-concept test (tests/test_per_concept.py): erase two digits of
the embedded digits model with one adapter per digit, fuse them, and on rank 0 write the fused
files (least squares from the run; sum and ties of its parts). Run as it is for one process, or
under ``torchrun --nproc-per-node 2``; ``--fail-rank R`` makes rank R's training raise."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

from spare_core import multi_concept as mc  # noqa: E402
from spare_core.digits.data import prompt_for  # noqa: E402
from spare_core.embedded import get  # noqa: E402
from spare_core.files import save_adapter  # noqa: E402
from spare_core.fusion import fuse_sum, fuse_ties  # noqa: E402

SETTINGS = dict(steps=2, num_samples=2, sample_steps=2, batch_size=2, seed=0, guidance=2.0,
                clip_x0=1.0)
CONCEPTS = [(prompt_for(3), prompt_for(4)), (prompt_for(5), prompt_for(6))]
PRESERVE = [prompt_for(1), prompt_for(7)]


def run(out: str, fail_rank: int | None = None) -> int:
    """Train, fuse and (rank 0) write; 3 when a job failed (ConceptJobError)."""
    rank, _ = mc.init_distributed("cpu", timeout_s=120)
    if fail_rank == rank:
        def fail(*_a, **_k):
            raise RuntimeError("injected failure")
        mc._train_job = fail
    den, _ = get("digits").load()
    try:
        res = mc.unlearn_concepts("spare", den, CONCEPTS, preserve=PRESERVE,
                                  fusion="least_squares", ls_samples=2, bars=True, **SETTINGS)
    except mc.ConceptJobError as e:
        print(f"ConceptJobError: {e}", file=sys.stderr)
        return 3
    if res is not None:
        save_adapter(res.adapter, os.path.join(out, "least_squares.safetensors"))
        save_adapter(fuse_sum(res.parts), os.path.join(out, "sum.safetensors"))
        save_adapter(fuse_ties(res.parts), os.path.join(out, "ties.safetensors"))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--fail-rank", type=int, default=None)
    a = p.parse_args()
    return run(a.out, a.fail_rank)


if __name__ == "__main__":
    sys.exit(main())
