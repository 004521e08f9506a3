"""Which modules does SPARE's saliency ranking pick, and do other rankings forget faster?

On the embedded digits model, for each forget digit: rank the UNet's Linear/Conv2d modules (input
and output convolutions excluded, as in SPARE) by mean |grad| (SPEC's rule), max |grad|,
mean |grad x weight| and ||grad|| / ||weight||, plus a seeded random draw; put a rank-4 LoRA on the
top half of each ranking, train SPARE's self-distillation for ``--steps`` steps with the concept
timestep sampler, and print UA / RA / to_surrogate and how many of the chosen modules lie in the
low-resolution blocks. Sampling and training settings are the bench's (spare_digits_defaults).

    python benchmarks/module_ranking.py --forget 3,5,7 --steps 20 --n 10
"""
from __future__ import annotations

import argparse

import torch

from spare_core.adapter import init_sparse_lora
from spare_core.digits.bench import default_surrogate, digit_metrics, spare_digits_defaults
from spare_core.digits import metrics as M
from spare_core.digits.data import prompt_for
from spare_core.loop import UnlearnConfig, unlearn
from spare_core.families.unet import adaptable_modules
from spare_core.saliency import compute_saliency
from spare_core.sampling import sample
from spare_core.sparse_lora import IO_CONVS, sparse_lora_from_saliency
from spare_core.tasks import ConceptTask, PoolConfig

LOW_RES = ("mid_block", "down_blocks.1", "up_blocks.0")  # the 4x4 blocks of the 8x8 digits UNet


def other_rankings(sal, weights: dict) -> dict[str, list[str]]:
    """Candidate module names ordered by the rules SPARE does not use, highest first."""
    names = [n for n in sal.scores if n not in IO_CONVS]
    s, w = sal.scores, {n: weights[n].detach().abs() for n in names}
    rules = {
        "max|g|": lambda n: float(s[n].amax()),
        "mean|g*w|": lambda n: float((s[n] * w[n]).mean()),
        "|g|/|w|": lambda n: float(s[n].norm() / w[n].norm()),
    }
    return {k: sorted(names, key=lambda n, f=f: -f(n)) for k, f in rules.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forget", default="3,5,7")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n", type=int, default=10, help="images per digit for the metrics")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    den, clf = M.load_default_model(), M.load_classifier()
    kw = spare_digits_defaults(a.steps, a.seed)
    weights = {n: m.weight for n, m in adaptable_modules(den.unet).items()}
    cands = [n for n in weights if n not in IO_CONVS]
    print(f"{len(cands)} candidate modules, {sum(n.startswith(LOW_RES) for n in cands)} in the "
          f"low-resolution blocks {LOW_RES}")
    print(f"{'digit':>5}  {'ranking':<10} {'UA':>6} {'RA':>6} {'to_sur':>6} {'trainable':>9}  low-res")
    for d in (int(x) for x in a.forget.split(",")):
        concept, sur = prompt_for(d), prompt_for(default_surrogate(d))
        keep = [prompt_for(k) for k in range(10) if k != d]
        gen = torch.Generator().manual_seed(a.seed)
        lat = sample(den, [concept] * kw["num_samples"], steps=kw["sample_steps"],
                     guidance=kw["guidance"], method="ddim", generator=gen, clip_x0=kw["clip_x0"])
        sal = compute_saliency(den, concept, lat, seed=a.seed)
        count = round(kw["module_fraction"] * len(cands))
        # SPARE's own rule and its random control come from the code SPARE runs
        adapters = {rule: sparse_lora_from_saliency(den.unet, sal, rank=kw["rank"],
                                                    module_fraction=kw["module_fraction"],
                                                    selection=sel, seed=a.seed)
                    for rule, sel in (("mean|g|", "saliency"), ("random", "random"))}
        for rule, order in other_rankings(sal, weights).items():
            adapters[rule] = init_sparse_lora(den.unet, order[:count], rank=kw["rank"], seed=a.seed)
        for rule, adapter in adapters.items():
            chosen = adapter.names
            pool = PoolConfig(size=kw["num_samples"], steps=kw["sample_steps"],
                              guidance=kw["guidance"], clip_x0=kw["clip_x0"])
            task = ConceptTask(concept, sur, keep, concept_latents=lat, pool=pool)
            res = unlearn(den, adapter, task, "self_distill",
                          UnlearnConfig(steps=a.steps, lr=kw["lr"], batch_size=kw["batch_size"],
                                        seed=a.seed, timestep_sampler="concept"))
            with res.adapter.applied(den.unet):
                m = digit_metrics(den, clf, d, a.n, a.seed, M.SAMPLE_STEPS)
            low = sum(n.startswith(LOW_RES) for n in chosen)
            print(f"{d:>5}  {rule:<10} {m['UA']:6.3f} {m['RA']:6.3f} {m['to_surrogate']:6.3f} "
                  f"{adapter.num_trainable():9d}  {low}/{len(chosen)}", flush=True)


if __name__ == "__main__":
    main()
