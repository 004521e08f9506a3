"""One config of defaults per method: what the API (``run_method``, ``spare_unlearn``), the CLI
(``spare unlearn``), the ComfyUI nodes and the bench (``spare bench``, ``spare demo``) read, so
that every front end runs one recipe and the tables measure what ships.

Each :class:`Recipe` holds the run settings (steps, learning rate, batch, concept images) and
the method's own options (``hparams``, the keyword arguments ``run_method`` takes). One name and
one meaning per knob:

- ``batch_size``: latents per training step, forget and preserve each;
- ``num_samples``: images generated per concept (and per preserved prompt) before training;
- ``module_fraction``: share of the candidate modules a ranked or random localisation adapts;
- ``mask_fraction``: share of each adapted weight's elements *kept* by an element mask (None or
  1.0: a dense low-rank update);
- ``alpha``: LoRA alpha, None = the rank (scale 1).

What depends on the model is a rule, not a copy (:func:`pool_guidance`, :func:`image_size`); the
embedded models carry their own sampler settings (``EmbeddedBench.settings``). No torch here: the
CLI's ``--help`` and argument checks read this module before torch loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


LOCALIZATIONS = ("saliency", "objective", "contrastive", "text_kv", "random", "all",
                 "text_encoder")
"""Module selections of :mod:`spare_core.localize`."""
UNET_LOCALIZATIONS = tuple(x for x in LOCALIZATIONS if x != "text_encoder")
"""The selections inside the denoising network (``text_encoder`` edits the CLIP text encoder,
which the ComfyUI nodes do not carry into an adapter)."""
RANKED = ("saliency", "objective", "contrastive")
"""The selections that rank modules by a saliency map."""


@dataclass(frozen=True)
class Recipe:
    """Defaults of one method.

    Attributes:
        kind: ``"concept"`` or ``"data"``.
        steps: training steps (None: closed form, no training).
        lr: AdamW learning rate; None = the paper's ``lr x steps`` budget scaled to ``steps``
            (``paper_lr * paper_steps / steps``).
        batch_size: latents per training step (forget and preserve each).
        num_samples: images generated per concept (and per preserved prompt).
        sample_steps: DDIM steps per generated image.
        timestep_sampler: ``"concept"`` or ``"uniform"``.
        hparams: the method's own options, with their defaults.
        paper_lr, paper_steps: the reference run an unset ``lr`` is scaled from.
        reference: where the values come from.
    """

    kind: str
    steps: int | None
    lr: float | None
    batch_size: int
    num_samples: int
    sample_steps: int
    timestep_sampler: str
    hparams: Mapping = field(default_factory=dict)
    paper_lr: float | None = None
    paper_steps: int | None = None
    reference: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hparams", MappingProxyType(dict(self.hparams)))

    def lr_for(self, steps: int) -> float | None:
        """The learning rate at ``steps`` (None for a closed-form method)."""
        if self.lr is not None:
            return float(self.lr)
        if self.paper_lr is None:
            return None
        return self.paper_lr * self.paper_steps / steps

    def run(self) -> dict:
        """The run settings as ``run_method`` keywords (``lr`` left to :meth:`lr_for`)."""
        return {"steps": self.steps, "batch_size": self.batch_size,
                "num_samples": self.num_samples, "sample_steps": self.sample_steps,
                "timestep_sampler": self.timestep_sampler}


_FULL = {"parameterization": "full", "rank": 4, "lora_alpha": None}
_LORA = {**_FULL, "parameterization": "lora"}
_CONCEPT_RUN = dict(steps=100, batch_size=8, num_samples=16, sample_steps=25)
_DATA_RUN = dict(batch_size=4, num_samples=16, sample_steps=25, timestep_sampler="uniform")
_EARLY_STOP = {"early_stop_every": 10, "stop_ratio": 1.0}
"""The data methods' early stop: the probe every 10 steps (a check costs about a third of the
steps between two checks; NegGrad, which collapses within tens of steps, checks every 5), stop once
the forget images' denoising loss reaches the held-out keep images'
(spare_core.data_task.DataTask.stop_probe)."""
_DATA_FRONT = ("benchmarks/RESULTS.md, 'Data unlearning': the front on the pattern model "
               "(benchmarks/data_front.py, seeds 0 and 1)")

SPARE_LOCALIZATION = {"module_selection": "all", "module_fraction": 0.5, "rank": 2}
"""SPARE's localisation and adapter size (benchmarks/RESULTS.md, "Localisation")."""

def _esd(train_method: str) -> Recipe:
    """ESD-x (``xattn``) and ESD-u (``noxattn``): one recipe, two module sets (spare_core.esd)."""
    return Recipe("concept", lr=None, timestep_sampler="uniform", **_CONCEPT_RUN,
                  hparams={"eta": 1.0, "preserve_weight": 0.0, **_FULL},
                  paper_lr=1e-5, paper_steps=1000,
                  reference=f"ESD train-esd.py: --train_method {train_method}, negative_guidance "
                            "1, lr 1e-5, 1000 iterations")


RECIPES: dict[str, Recipe] = {
    "spare": Recipe(
        "concept", lr=6e-3, timestep_sampler="concept", **{**_CONCEPT_RUN, "steps": 150},
        hparams={**SPARE_LOCALIZATION, "alpha": None, "mask_fraction": None, "budget": None,
                 "forget_weight": 1.0, "preserve_weight": 1.0, "preserve_uncond": True,
                 "compose": 0.0, "adversarial": False,
                 "adv_every": 5, "adv_steps": 5, "adv_fraction": 0.5},
        reference="benchmarks/RESULTS.md: localisation screening and tuning on canvas and "
                  "digits; 150 steps: 'The recipe at 150 steps, on every target'; preserve_uncond: "
                  "'The unconditional prediction held'"),
    "salun": Recipe(
        "concept", lr=None, timestep_sampler="uniform", **_CONCEPT_RUN,
        hparams={"mask_fraction": 0.5, "mask_scope": "global", "alpha": 0.5,
                 "label": "surrogate", "target_model": "teacher", **_FULL},
        paper_lr=1e-5, paper_steps=600,
        reference="SalUn SD: random_label.py --alpha 0.5 --lr 1e-5 --epochs 5 (about 120 "
                  "steps/epoch), mask with_0.5 (top 50%)"),
    "esd": _esd("xattn"),
    "esd_u": _esd("noxattn"),
    "uce": Recipe(
        "concept", steps=None, lr=None, batch_size=_CONCEPT_RUN["batch_size"],
        num_samples=_CONCEPT_RUN["num_samples"], sample_steps=_CONCEPT_RUN["sample_steps"],
        timestep_sampler="uniform",
        hparams={"erase_scale": 1.0, "preserve_scale": 1.0, "lamb": 0.5},
        reference="UCE (Gandikota et al., WACV 2024): closed-form edit of cross-attention "
                  "to_k/to_v, erase -> guide, preserve list; scales are the engine's defaults "
                  "(spare_core.uce)"),
    "siss": Recipe(
        "data", steps=200, lr=5e-4, **_DATA_RUN,
        hparams={"lambda_": 0.5, "forget_scale": 0.1, "normalize": "relative",
                 **_LORA, **_EARLY_STOP},
        reference=f"{_DATA_FRONT}: LoRA rank 4, lr 5e-4, 200 steps (pattern rate 0.002, FD_rest "
                  "1.34x the original's); objective as SISS delete_tshirt.yaml (lambd 0.5, "
                  "forget gradient at 10% of the keep gradient's norm, README)"),
    "neggrad": Recipe(
        "data", steps=150, lr=5e-5, **_DATA_RUN,
        hparams={"scale": 1.0, **_FULL, **_EARLY_STOP, "early_stop_every": 5},
        reference=f"{_DATA_FRONT}: its best point is the early stop (step 15); SISS code "
                  "simple_neg_del (superfactor 1)"),
    "erasediff": Recipe(
        "data", steps=150, lr=5e-5, **_DATA_RUN,
        hparams={"lambda_": 0.1, "eta": 0.1, "dynamic": False, **_FULL, **_EARLY_STOP},
        reference=f"{_DATA_FRONT}: its lowest pattern rate (0.037); EraseDiff DDPM "
                  "lambda_bome 0.1, eta_bome 0.1"),
    "naive_deletion": Recipe(
        "data", steps=150, lr=5e-5, **_DATA_RUN, hparams={**_FULL, **_EARLY_STOP},
        reference=f"{_DATA_FRONT}: its lowest pattern rate (0.023); SISS code naive_del"),
}

SALIENCY_MICRO_BATCH = 8
"""Concept latents per saliency forward/backward where memory is not tight (the API's default;
the CLI's ``--micro-batch`` when the memory controls are off; the nodes default to 1)."""
FAMILY_IMAGE_SIZE = {"sd": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}
FAMILY_GUIDANCE = {"sd": 7.5, "sdxl": 7.0, "sd3": 7.0, "flux": 1.0}


def recipe(method: str) -> Recipe:
    """The recipe of ``method``; ValueError listing the methods for an unknown name."""
    if method not in RECIPES:
        raise ValueError(f"unknown method {method!r}; choose one of {list(RECIPES)}")
    return RECIPES[method]


def pool_guidance(family: str) -> float:
    """Classifier-free guidance of the images generated for training, by model family: the
    guidance-distilled Flux.1 samples without it (1.0; its own guidance input carries the
    distilled scale), the others at their usual scale."""
    return FAMILY_GUIDANCE.get(family, FAMILY_GUIDANCE["sd"])


def guidance_for(denoiser, guidance: float | None = None) -> float:
    """``guidance`` when given, else :func:`pool_guidance` of the denoiser's ``family`` (a
    backend without one is read as SD1.x/SD2.x)."""
    return pool_guidance(getattr(denoiser, "family", "sd")) if guidance is None else guidance


def image_size(family: str) -> int:
    """Side in pixels of the images generated for training, by model family (SD1.x/SD2.x 512,
    SDXL, SD3 and Flux 1024)."""
    return FAMILY_IMAGE_SIZE.get(family, FAMILY_IMAGE_SIZE["sd"])


FRONT_ENDS = (
    ("API", "run_method(name, ...), spare_unlearn(...)"),
    ("CLI", "spare unlearn --method NAME"),
    ("ComfyUI", "SparseLoRAInit, ComputeSaliency, SelfDistillUnlearn, UCE Erase, DataUnlearn"),
    ("bench", "spare bench, spare demo (plus the embedded model's guidance and x0 clip)"),
)


def defaults_table() -> str:
    """The README's defaults table (Markdown), one row per method (concept methods, then the
    data methods, which generate no images), printed from :data:`RECIPES`: every front end in
    :data:`FRONT_ENDS` runs these values (a test checks that the README holds exactly this table
    and that no front end drifts from it)."""
    def fmt(v) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    rows = ["| method | steps | lr | batch | images per concept | sample steps | timesteps | "
            "own options |", "|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(RECIPES.items(), key=lambda kv: kv[1].kind != "concept"):
        own = ", ".join(f"{k} {fmt(v) if v is not None else 'none'}" for k, v in r.hparams.items()
                        if not k.startswith("adv_"))
        if r.steps is None:  # closed form: no training, no images
            rows.append(f"| {name} | closed form | - | - | - | - | - | {own} |")
            continue
        lr = fmt(r.lr) if r.lr is not None else f"{r.paper_lr:g} x {r.paper_steps} / steps"
        images = (r.num_samples, r.sample_steps) if r.kind == "concept" else ("-", "-")
        rows.append(f"| {name} | {r.steps} | {lr} | {r.batch_size} | {images[0]} | "
                    f"{images[1]} | {r.timestep_sampler} | {own} |")
    return "\n".join(rows)
