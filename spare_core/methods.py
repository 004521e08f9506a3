"""One entry point for every method of the engine: :func:`run_method`.

Each method is a choice of task, parameterization and objective of the one loop
(:func:`spare_core.loop.unlearn`); nothing here trains by itself.

================  =======  ==========================================  ======================
method            kind     trained weights (default)                   objective
================  =======  ==========================================  ======================
spare             concept  sparse LoRA on salient modules              ``self_distill``
salun             concept  saliency mask, top 50% of elements (full)   ``salun_rl``
esd               concept  ESD-x: cross-attention (full)               ``esd``
esd_u             concept  ESD-u: all but cross-attn/out/time (full)   ``esd``
uce               concept  cross-attention to_k/to_v (full)            closed form, no steps
siss              data     LoRA rank 4 on every Linear/Conv2d          ``siss``
neggrad           data     every Linear/Conv2d weight (full)           ``neggrad``
erasediff         data     every Linear/Conv2d weight (full)           ``erasediff``
naive_deletion    data     every Linear/Conv2d weight (full)           ``naive_deletion``
================  =======  ==========================================  ======================

SPARE's ``module_selection`` (:mod:`spare_core.localize`) picks the LoRA's modules;
``text_encoder`` puts it on the first block of the CLIP text encoder instead of the UNet
(:mod:`spare_core.text_encoder`; apply the result with ``adapter.applied_to(denoiser)``).

"(full)" is full fine-tuning of those weights (:func:`~spare_core.adapter.init_masked_full`,
masked elements only; biases and norms stay frozen). ``parameterization="lora"`` swaps it for
LoRA of ``rank`` on the same modules (``"full"`` the other way).

Data methods stop early by default (``early_stop_every``, ``stop_ratio``): every few steps a
probe compares the forget images' denoising loss with held-out keep images' and ends training
once it is no longer lower (:meth:`spare_core.data_task.DataTask.stop_probe`); the history then
has ``stopped_at`` and ``probe``.

Step budget: the caller sets ``steps`` (equal for all methods in a comparison). The data
methods' recipes fix steps and lr from their front on the pattern model (benchmarks/RESULTS.md,
"Data unlearning"). A concept method without a recipe lr keeps its paper's total Adam
displacement ``lr x steps``:
``lr = paper_lr * paper_steps / steps`` (Adam moves each weight by about ``lr`` per step), so a
10x shorter run gets a 10x larger step. SPARE keeps the engine's own default (1e-3, LoRA).
Batch size defaults to 4 for every method (equal compute per step); timesteps are drawn
uniformly except for SPARE (``concept`` sampler).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .denoiser import Denoiser
from .loop import UnlearnConfig, UnlearnResult, unlearn
from .objectives import make_objective
from .recipes import RECIPES, SALIENCY_MICRO_BATCH, Recipe, guidance_for
from .spare import phase_callback
from .tasks import concept_pairs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSpec:
    """What a method is made of: its objective (registry name in
    :data:`spare_core.objectives.OBJECTIVES`, ``""`` for the closed-form UCE) and its
    :class:`~spare_core.recipes.Recipe` of defaults (the one config every front end reads)."""

    objective: str
    recipe: Recipe

    @property
    def kind(self) -> str:
        return self.recipe.kind

    @property
    def hparams(self):
        return self.recipe.hparams

    @property
    def reference(self) -> str:
        return self.recipe.reference

    def lr_for(self, steps: int) -> float | None:
        """The default learning rate at ``steps`` (None for a closed-form method: UCE)."""
        return self.recipe.lr_for(steps)


_OBJECTIVES = {"spare": "self_distill", "salun": "salun_rl", "esd": "esd", "esd_u": "esd",
               "uce": "", "siss": "siss", "neggrad": "neggrad", "erasediff": "erasediff",
               "naive_deletion": "naive_deletion"}

METHODS: dict[str, MethodSpec] = {name: MethodSpec(_OBJECTIVES[name], r)
                                  for name, r in RECIPES.items()}

CONCEPT_METHODS = tuple(n for n, s in METHODS.items() if s.kind == "concept")
DATA_METHODS = tuple(n for n, s in METHODS.items() if s.kind == "data")

# which hyperparameters go to the objective's constructor (the rest shape adapter / task)
_OBJECTIVE_KEYS = {
    "salun": ("alpha", "label", "target_model"),
    "esd": ("eta", "preserve_weight"),
    "esd_u": ("eta", "preserve_weight"),
    "siss": ("forget_scale", "normalize"),
    "neggrad": ("scale",),
    "erasediff": ("lambda_", "eta", "dynamic"),
    "naive_deletion": (),
}


def parse_value(text: str):
    """A KEY=VALUE option's value from text: int, float, true/false/none, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(items: Sequence[str], flag: str, defaults: Mapping | None = None) -> dict:
    """``["eta=2", "normalize=none"]`` -> ``{"eta": 2, "normalize": "none"}``: a key whose
    default in ``defaults`` (a method's hyperparameters) is a string keeps its text, any other
    value is read by :func:`parse_value` (``none`` -> None); ``flag`` names the option in the
    error (e.g. ``--param``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        text = isinstance((defaults or {}).get(key), str)
        out[key] = value if text else parse_value(value)
    return out


def method_defaults(name: str, steps: int = 100) -> dict:
    """The hyperparameters and learning rate ``name`` uses at a budget of ``steps``."""
    spec = _spec(name)
    return {**spec.hparams, "lr": spec.lr_for(steps)}


def _spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {list(METHODS)}")
    return METHODS[name]


def run_method(name: str, denoiser: Denoiser, *,
               concept: str | None = None, surrogate: str = "", preserve: Sequence[str] = (),
               forget=None, keep=None, forget_prompts=None, keep_prompts=None,
               encode: Callable[[Tensor], Tensor] | None = None,
               steps: int | None = None, lr: float | None = None,
               batch_size: int | None = None, grad_accum: int = 1, seed: int = 0,
               timestep_sampler: str | None = None, num_samples: int | None = None,
               sample_steps: int | None = None, guidance: float | None = None,
               clip_x0: float | None = None,
               progress: Callable[[int, int, float], None] | None = None,
               should_stop: Callable[[], bool] | None = None,
               phase_progress: Callable[[str, int, int], None] | None = None,
               gradient_checkpointing: bool = False, backward_per_term: bool = False,
               saliency_batch_size: int = SALIENCY_MICRO_BATCH,
               concept_latents: Tensor | None = None,
               preserve_latents: Mapping[str, Tensor] | None = None,
               **hparams) -> UnlearnResult:
    """Run method ``name`` (one of :data:`METHODS`) and return the trained adapter and history.

    Concept methods (spare, salun, esd, esd_u, uce) take ``concept``, ``surrogate``,
    ``preserve``; several concepts are erased in one adapter when ``concept`` holds one per line
    (``surrogate``: one per line, or one for all; ``num_samples`` per concept). Their concept latents are generated once from the frozen model (``num_samples`` DDIM samples
    of ``sample_steps`` at ``guidance``, seeded by ``seed``: the same pool for every concept
    method at a given seed). Data methods (siss, neggrad, erasediff, naive_deletion) take
    ``forget`` / ``keep`` (tensors ``[N, C, H, W]`` or image folders), optional prompts and
    ``encode`` (see :class:`~spare_core.data_task.DataTask`).

    ``**hparams`` are the method's own hyperparameters (``METHODS[name].hparams``, e.g.
    ``run_method("siss", ..., lambda_=0.5, forget_scale=0.1)``); unknown ones raise ValueError.
    Every setting left None takes the method's recipe (:mod:`spare_core.recipes`, the one
    config of defaults every front end reads): ``steps``, ``batch_size``, ``num_samples``,
    ``sample_steps``, ``timestep_sampler``, ``lr`` (the paper's step-scaled rate where the
    recipe sets none; module docstring); ``guidance`` follows the model family
    (:func:`~spare_core.recipes.pool_guidance`). Everything is validated before any sampling or
    training.

    Memory controls (see :class:`~spare_core.loop.UnlearnConfig`): ``gradient_checkpointing``,
    ``backward_per_term`` and ``saliency_batch_size`` (latents per saliency micro-batch).
    ``progress(step, steps, loss)`` reports training steps; ``phase_progress(what, done, total)``
    the work before them (concept samples, saliency, latent pools, encoding, timestep gaps).

    ``concept_latents`` ``[N, C, H, W]`` (N/k per concept line) and ``preserve_latents``
    (``{prompt: latents}``; prompts it lacks are sampled) give a concept method pools made before
    by the frozen model, which are then not sampled again (a list's jobs share them:
    :mod:`spare_core.multi_concept`); ``num_samples`` is then the given count.

    The result's ``history`` has the loop's keys plus ``method`` and ``lr``; methods that compute
    a saliency map (spare, salun) also set ``result.saliency``.
    """
    spec = _spec(name)
    unknown = sorted(set(hparams) - set(spec.hparams))
    if unknown:
        raise ValueError(f"{name} does not take {unknown}; its options are "
                         f"{sorted(spec.hparams)}")
    hp = {**spec.hparams, **hparams}
    if (concept_latents is not None or preserve_latents) and (name == "uce" or spec.kind != "concept"):
        raise ValueError(f"{name} takes no latent pools (concept_latents / preserve_latents are "
                         "for the concept methods that train on them)")
    if name == "uce":  # closed form: no training loop, steps and learning rate do not apply
        return _run_uce(denoiser, concept, surrogate, preserve, forget, keep, hp)
    rec = spec.recipe
    steps = rec.steps if steps is None else steps
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    lr = spec.lr_for(steps) if lr is None else lr
    sampler = timestep_sampler or rec.timestep_sampler
    batch_size = rec.batch_size if batch_size is None else batch_size
    num_samples = rec.num_samples if num_samples is None else num_samples
    sample_steps = rec.sample_steps if sample_steps is None else sample_steps
    guidance = guidance_for(denoiser, guidance)
    config = UnlearnConfig(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                           seed=seed, timestep_sampler=sampler,
                           gradient_checkpointing=gradient_checkpointing,
                           backward_per_term=backward_per_term)
    if not isinstance(saliency_batch_size, int) or saliency_batch_size < 1:
        raise ValueError(f"saliency_batch_size must be a positive integer, got {saliency_batch_size!r}")
    config.validate()
    if spec.kind == "concept":
        if forget is not None or keep is not None:
            raise ValueError(f"{name} forgets a concept prompt; forget/keep image sets are for the "
                             f"data methods {list(DATA_METHODS)}")
        if name == "spare":
            if grad_accum != 1:
                raise ValueError("spare (spare_unlearn) does not take grad_accum; raise batch_size")
            return _run_spare(denoiser, concept, surrogate, preserve, config, hp, num_samples,
                              sample_steps, guidance, clip_x0, progress, should_stop,
                              phase_progress, saliency_batch_size, concept_latents,
                              preserve_latents)
        return _run_concept(name, spec, denoiser, concept, surrogate, preserve, config, hp,
                            num_samples, sample_steps, guidance, clip_x0, progress, should_stop,
                            phase_progress, saliency_batch_size, concept_latents,
                            preserve_latents)
    if concept is not None:
        raise ValueError(f"{name} forgets data (forget=..., keep=...); concept prompts are for "
                         f"the concept methods {list(CONCEPT_METHODS)}")
    return _run_data(name, spec, denoiser, forget, keep, forget_prompts, keep_prompts, encode,
                     config, hp, progress, should_stop, phase_progress)


def _run_uce(denoiser, concept, surrogate, preserve, forget, keep, hp) -> UnlearnResult:
    """UCE's edit as an UnlearnResult: ``concept`` may hold several concepts, one per line, each
    with the guide on the same line of ``surrogate`` (or one guide for all)."""
    import time

    from .uce import uce_edit

    if forget is not None or keep is not None:
        raise ValueError("uce forgets concept prompts; forget/keep image sets are for the data "
                         f"methods {list(DATA_METHODS)}")
    if concept is None:
        raise ValueError("uce needs concept= (one concept per line for several)")
    pairs = concept_pairs(concept, surrogate)
    t0 = time.perf_counter()
    adapter = uce_edit(denoiser, pairs, list(preserve), erase_scale=hp["erase_scale"],
                       preserve_scale=hp["preserve_scale"], lamb=hp["lamb"])
    history = {"method": "uce", "loss": [], "terms": [], "seconds": time.perf_counter() - t0,
               "trainable_params": adapter.num_trainable(), "lr": None, "ignored": []}
    return UnlearnResult(adapter, history)


def reads_pools(name: str, hparams: Mapping | None = None) -> tuple[bool, bool]:
    """``(concept pools, preserve pools)``: whether concept method ``name`` at ``hparams`` (the
    rest its defaults) trains on latent pools of its concepts, and of its preserved prompts (its
    objective has a preserve term). UCE, a closed form, reads neither."""
    hp = {**_spec(name).hparams, **(hparams or {})}
    if name == "uce":
        return False, False
    if name == "spare":
        return True, float(hp["preserve_weight"]) != 0.0
    return True, bool(getattr(_objective(name, hp), "uses_preserve", True))


def _objective(name: str, hp: dict):
    spec = METHODS[name]
    return make_objective(spec.objective, **{k: hp[k] for k in _OBJECTIVE_KEYS[name]})


def _finish(res: UnlearnResult, name: str, config: UnlearnConfig) -> UnlearnResult:
    res.history["method"] = name
    res.history["lr"] = config.lr
    res.adapter.meta["method"] = name
    return res


def _run_spare(denoiser, concept, surrogate, preserve, config, hp, num_samples, sample_steps,
               guidance, clip_x0, progress, should_stop, phase_progress=None,
               saliency_batch_size=SALIENCY_MICRO_BATCH, concept_latents=None,
               preserve_latents=None) -> UnlearnResult:
    from .spare import spare_unlearn

    adversarial = None
    if hp["adversarial"]:
        from .probe.adversarial import AdversarialConfig
        adversarial = AdversarialConfig(every=hp["adv_every"], attack_steps=hp["adv_steps"],
                                        fraction=hp["adv_fraction"])  # checked by the task
    res = spare_unlearn(denoiser, concept, surrogate, list(preserve), num_samples=num_samples,
                        sample_steps=sample_steps, guidance=guidance, clip_x0=clip_x0,
                        rank=hp["rank"], alpha=hp["alpha"], module_fraction=hp["module_fraction"],
                        mask_fraction=hp["mask_fraction"],
                        module_selection=hp["module_selection"], budget=hp["budget"],
                        steps=config.steps, lr=config.lr,
                        batch_size=config.batch_size, timestep_sampler=config.timestep_sampler,
                        forget_weight=hp["forget_weight"], preserve_weight=hp["preserve_weight"],
                        preserve_uncond=hp["preserve_uncond"], compose=hp["compose"],
                        seed=config.seed, progress=progress, should_stop=should_stop,
                        phase_progress=phase_progress, saliency_batch_size=saliency_batch_size,
                        gradient_checkpointing=config.gradient_checkpointing,
                        backward_per_term=config.backward_per_term, adversarial=adversarial,
                        concept_latents=concept_latents, preserve_latents=preserve_latents)
    out = UnlearnResult(res.adapter, dict(res.history))
    out.saliency = res.saliency
    return _finish(out, "spare", config)


def _run_concept(name, spec, denoiser, concept, surrogate, preserve, config, hp, num_samples,
                 sample_steps, guidance, clip_x0, progress, should_stop,
                 phase_progress=None, saliency_batch_size=SALIENCY_MICRO_BATCH,
                 concept_latents=None, preserve_latents=None) -> UnlearnResult:
    from .esd import init_esd_adapter
    from .saliency import compute_saliency
    from .sampling import sample
    from .tasks import ConceptTask, PoolConfig

    objective = _objective(name, hp)  # checks the objective's options first
    pool = PoolConfig(size=num_samples, steps=sample_steps, guidance=guidance, clip_x0=clip_x0)
    task = ConceptTask(concept if concept is not None else "", surrogate, list(preserve),
                       concept_latents=concept_latents,
                       preserve_latents=([preserve_latents.get(p) for p in preserve]
                                         if preserve_latents else None), pool=pool)
    task.validate(denoiser)
    if hp["parameterization"] not in ("full", "lora"):
        raise ValueError(f"parameterization must be 'full' or 'lora', got {hp['parameterization']!r}")
    if name == "salun" and not (0.0 < hp["mask_fraction"] <= 1.0):
        raise ValueError(f"mask_fraction must be in (0, 1], got {hp['mask_fraction']}")

    if concept_latents is None:
        gen = torch.Generator().manual_seed(config.seed)
        prompts = task.sample_prompts(num_samples)  # num_samples per concept line
        latents = sample(denoiser, prompts, steps=sample_steps, guidance=guidance,
                         method="ddim", generator=gen, clip_x0=clip_x0,
                         callback=phase_callback(phase_progress, "concept samples"))
        task.concept_latents = latents
    else:  # validated by the task: N/k per concept line
        latents = concept_latents
        prompts = task.sample_prompts(latents.shape[0] // len(task.pairs))
    saliency = None
    if name == "salun":
        saliency = compute_saliency(denoiser, prompts, latents, seed=config.seed,
                                    should_stop=should_stop, batch_size=saliency_batch_size,
                                    gradient_checkpointing=config.gradient_checkpointing,
                                    progress=phase_callback(phase_progress, "saliency"))
        masks = saliency.mask(fraction=hp["mask_fraction"], scope=hp["mask_scope"])
        if hp["parameterization"] == "full":
            from .adapter import init_masked_full
            adapter = init_masked_full(denoiser.unet, masks)
        else:
            from .adapter import init_sparse_lora
            mods = [n for n, m in masks.items() if bool(m.any())]
            adapter = init_sparse_lora(denoiser.unet, mods, rank=hp["rank"], alpha=hp["lora_alpha"],
                                       masks=masks, seed=config.seed)
        adapter.meta.update(mask_fraction=repr(hp["mask_fraction"]))
    else:
        variant = "x" if name == "esd" else "u"
        adapter = init_esd_adapter(denoiser.unet, variant, hp["parameterization"], hp["rank"],
                                   hp["lora_alpha"], seed=config.seed)
    adapter.meta.update(concept=concept, surrogate=surrogate,
                        parameterization=hp["parameterization"])
    res = unlearn(denoiser, adapter, task, objective, config, progress=progress,
                  should_stop=should_stop, prepare_progress=phase_progress)
    if saliency is not None:
        res.saliency = saliency
    return _finish(res, name, config)


def _run_data(name, spec, denoiser, forget, keep, forget_prompts, keep_prompts, encode, config,
              hp, progress, should_stop, phase_progress=None) -> UnlearnResult:
    from .data_task import DataTask
    from .esd import init_module_adapter

    if forget is None:
        raise ValueError(f"{name} needs forget=... (images or latents of the data to forget)")
    if keep is None and name != "neggrad":
        raise ValueError(f"{name} needs keep=... (images or latents of the data to keep)")
    objective = _objective(name, hp)
    mixture = {"mixture_lambda": hp["lambda_"]} if name == "siss" else {}  # else DataTask's
    every = hp["early_stop_every"]  # every data recipe has the early stop's two settings
    if every and keep is None:  # neggrad alone: nothing to compare the forget images with
        log.warning("%s without keep images: no early stop (its probe compares the forget images "
                    "with held-out keep images); training runs all %d steps", name, config.steps)
        every = 0
    config = dataclasses.replace(config, early_stop_every=every)
    config.validate()
    task = DataTask(forget, keep, forget_prompts, keep_prompts, encode=encode,
                    stop_ratio=hp["stop_ratio"], **mixture)
    task.validate(denoiser)
    adapter = init_module_adapter(denoiser.unet, None, hp["parameterization"], hp["rank"],
                                  hp["lora_alpha"], seed=config.seed,
                                  meta={"parameterization": hp["parameterization"]})
    res = unlearn(denoiser, adapter, task, objective, config, progress=progress,
                  should_stop=should_stop, prepare_progress=phase_progress)
    return _finish(res, name, config)
