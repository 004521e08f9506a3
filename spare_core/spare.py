"""SPARE end to end: generate concept latents -> saliency -> sparse LoRA -> self-distillation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .adapter import UnlearnAdapter
from .denoiser import Denoiser
from .loop import UnlearnConfig, unlearn
from .recipes import RECIPES, SALIENCY_MICRO_BATCH, guidance_for
from .localize import (check_ranking_inputs, needs_saliency, network_for, rank_for_budget,
                       ranking_saliency, select_modules)
from .saliency import Saliency
from .sampling import sample
from .sparse_lora import check_rank, check_selection, sparse_lora_on
from .tasks import ConceptTask, PoolConfig, with_unconditional
from .text_encoder import TEXT_ENCODER


@dataclass
class SpareResult:
    adapter: UnlearnAdapter
    saliency: Saliency | None  # None for localisations that rank nothing (text_kv, random, all)
    history: dict


_R = RECIPES["spare"]
_H = _R.hparams


def spare_unlearn(denoiser: Denoiser, concept: str, surrogate: str = "",
                  preserve: Sequence[str] = (), *, num_samples: int = _R.num_samples,
                  sample_steps: int = _R.sample_steps, guidance: float | None = None,
                  clip_x0: float | None = None, rank: int = _H["rank"],
                  alpha: float | None = _H["alpha"],
                  module_fraction: float = _H["module_fraction"],
                  mask_fraction: float | None = _H["mask_fraction"],
                  module_selection: str = _H["module_selection"], budget: int | None = None,
                  steps: int = _R.steps, lr: float = _R.lr, batch_size: int = _R.batch_size,
                  timestep_sampler: str = _R.timestep_sampler,
                  forget_weight: float = _H["forget_weight"],
                  preserve_weight: float = _H["preserve_weight"],
                  preserve_uncond: bool = _H["preserve_uncond"],
                  compose: float = _H["compose"], seed: int = 0,
                  saliency_batch_size: int = SALIENCY_MICRO_BATCH, gradient_checkpointing: bool = False,
                  backward_per_term: bool = False, adversarial=None,
                  concept_latents: torch.Tensor | None = None,
                  preserve_latents: Mapping[str, torch.Tensor] | None = None,
                  progress: Callable[[int, int, float], None] | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  phase_progress: Callable[[str, int, int], None] | None = None) -> SpareResult:
    """Forget ``concept`` (overwritten by ``surrogate``) while keeping ``preserve`` prompts.
    Several concepts at once: one per line in ``concept``, their surrogates one per line (or one
    for all) in ``surrogate``; ``num_samples`` are drawn per concept.

    Defaults are SPARE's recipe (:data:`spare_core.recipes.RECIPES`, the config every front end
    reads); ``guidance`` None follows the model family (:func:`~spare_core.recipes.pool_guidance`).
    All arguments are checked before any generation or training. Returns the trained adapter
    (not attached: apply it with ``adapter.attach(denoiser.unet)`` or save it), the saliency
    map and the training history. Memory controls: ``saliency_batch_size`` (latents per saliency
    micro-batch), ``gradient_checkpointing`` (saliency and training), ``backward_per_term``
    (forget and preserve halves back-propagated one after the other); element scores are kept
    only when ``mask_fraction`` asks for an element mask. ``phase_progress(what, done, total)``
    reports the phases before training (``"concept samples"``, ``"saliency"``, ``"preserve pool
    i"``, ``"timestep gaps"``); ``progress(step, steps, loss)`` the training steps.
    ``module_selection`` is the localisation (:mod:`spare_core.localize`: ``saliency``,
    ``objective``, ``contrastive``, ``text_kv``, ``random``, ``all``, ``text_encoder``); only the
    rankings compute a saliency map (``result.saliency`` is None otherwise, unless an element
    mask needs one). ``text_encoder`` puts the LoRA on the first block of the CLIP text encoder
    instead of the UNet (diffusers SD1.x/SD2.x only; dense, not adversarial); apply its result
    with ``adapter.applied_to(denoiser)``.
    ``budget`` (trainable parameters) replaces ``rank`` with the rank whose LoRA on the chosen
    modules comes closest to it (:func:`~spare_core.localize.rank_for_budget`), so
    localisations compare at equal size. ``adversarial`` (True or an
    :class:`~spare_core.probe.adversarial.AdversarialConfig`) trains against the prompt attack
    (:mod:`spare_core.probe.adversarial`); its seconds are in ``history["attack_seconds"]``.
    ``compose`` is the share of forget rows that put the concept beside a preserved prompt
    (:class:`~spare_core.tasks.ConceptTask`). ``preserve_uncond`` adds the empty prompt to the
    preserved ones (:func:`~spare_core.tasks.with_unconditional`): the unconditional prediction
    that guidance subtracts from every prompt's stays the frozen model's.
    ``concept_latents`` ``[N, C, H, W]`` (N/k per concept line, in their order) and
    ``preserve_latents`` (``{prompt: [n, C, H, W]}``, the empty prompt's included; prompts it
    lacks are sampled, extra keys ignored) are pools made before, by the frozen model: given,
    they are not sampled again (a list's jobs share them: :mod:`spare_core.multi_concept`).
    """
    guidance = guidance_for(denoiser, guidance)
    given = list(preserve)  # what the contrastive ranking contrasts with: the prompts' words
    pool = PoolConfig(size=num_samples, steps=sample_steps, guidance=guidance, clip_x0=clip_x0)
    kept = with_unconditional(given) if preserve_uncond else given
    task = concept_task = ConceptTask(
        concept, surrogate, kept, concept_latents=concept_latents,
        preserve_latents=[preserve_latents.get(p) for p in kept] if preserve_latents else None,
        pool=pool, compose=compose)
    if adversarial:
        from .probe.adversarial import AdversarialConceptTask, AdversarialConfig

        adv = adversarial if isinstance(adversarial, AdversarialConfig) else AdversarialConfig()
        task = AdversarialConceptTask(concept_task, adv, seed=seed)
    task.validate(denoiser)
    config = UnlearnConfig(steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                           timestep_sampler=timestep_sampler,
                           gradient_checkpointing=gradient_checkpointing,
                           backward_per_term=backward_per_term)
    config.validate()
    check_selection(module_selection)
    net = network_for(denoiser, module_selection)  # the UNet, or the CLIP text encoder's
    if budget is None:
        check_rank(net, rank)
    elif not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive number of parameters, got {budget!r}")
    element_masks = mask_fraction is not None and mask_fraction < 1.0
    if module_selection == TEXT_ENCODER and (element_masks or adversarial):
        why = ("an element mask ranks UNet weights by saliency: set mask_fraction None or 1"
               if element_masks else "the adversarial attack feeds the UNet contexts that the "
               "adapted text encoder does not make: switch adversarial off")
        raise ValueError(f"module_selection 'text_encoder' trains a dense LoRA on the text "
                         f"encoder; {why}, or choose a UNet module selection")
    check_ranking_inputs(module_selection, given,
                         element_masks and needs_saliency(module_selection))
    if not (0.0 < module_fraction <= 1.0):
        raise ValueError(f"module fraction must be in (0, 1], got {module_fraction}")
    if mask_fraction is not None and not (0.0 < mask_fraction <= 1.0):
        raise ValueError(f"sparsity (mask fraction) must be in (0, 1], got {mask_fraction}")

    if concept_latents is None:
        gen = torch.Generator().manual_seed(seed)
        prompts = task.sample_prompts(num_samples)  # num_samples per concept line
        latents = sample(denoiser, prompts, steps=sample_steps, guidance=guidance,
                         method="ddim", generator=gen, clip_x0=clip_x0,
                         callback=phase_callback(phase_progress, "concept samples"))
    else:  # validated by the task: N/k per concept line
        num_samples = concept_latents.shape[0] // len(concept_task.pairs)
        prompts, latents = task.sample_prompts(num_samples), concept_latents
    sal = None
    if needs_saliency(module_selection) or element_masks:
        ranking = module_selection if needs_saliency(module_selection) else "saliency"
        surrogates = [s for _, s in concept_task.pairs for _ in range(num_samples)]
        sal = ranking_saliency(denoiser, ranking, prompts, latents, surrogates=surrogates,
                               preserve=given, element_scores=element_masks,
                               seed=seed, should_stop=should_stop, batch_size=saliency_batch_size,
                               gradient_checkpointing=gradient_checkpointing,
                               progress=phase_callback(phase_progress, "saliency"))
    modules = select_modules(net, module_selection, saliency=sal, fraction=module_fraction,
                             seed=seed)
    if budget is not None:
        rank = rank_for_budget(net, modules, budget)
    adapter = sparse_lora_on(net, modules, rank=rank, alpha=alpha, saliency=sal,
                             mask_fraction=mask_fraction, seed=seed, selection=module_selection,
                             clamp_rank=budget is not None)
    adapter.meta.update(method="spare", concept="\n".join(dict.fromkeys(prompts)),
                        surrogate=surrogate)
    if module_selection == TEXT_ENCODER:
        adapter.meta["root"] = TEXT_ENCODER  # attached to denoiser.text_encoder (adapter.root)
    concept_task.concept_latents = latents
    res = unlearn(denoiser, adapter, task, "self_distill", config,
                  objective_kwargs={"forget_weight": forget_weight, "preserve_weight": preserve_weight},
                  progress=progress, should_stop=should_stop, prepare_progress=phase_progress)
    return SpareResult(res.adapter, sal, res.history)


def phase_callback(report: Callable[[str, int, int], None] | None, what: str):
    """``(done, total)`` callback forwarding to ``report(what, done, total)`` (None if no report)."""
    if report is None:
        return None
    return lambda done, total: report(what, done, total)
