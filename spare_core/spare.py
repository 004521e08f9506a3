"""SPARE end to end: generate concept latents -> saliency -> sparse LoRA -> self-distillation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .adapter import UnlearnAdapter
from .denoiser import Denoiser
from .loop import UnlearnConfig, unlearn
from .saliency import Saliency, check_gradient_storage, compute_saliency
from .sampling import sample
from .sparse_lora import check_rank, check_selection, sparse_lora_from_saliency
from .tasks import ConceptTask, PoolConfig


@dataclass
class SpareResult:
    adapter: UnlearnAdapter
    saliency: Saliency
    history: dict


def spare_unlearn(denoiser: Denoiser, concept: str, surrogate: str = "",
                  preserve: Sequence[str] = (), *, num_samples: int = 16, sample_steps: int = 25,
                  guidance: float = 3.0, clip_x0: float | None = None, rank: int = 4,
                  alpha: float | None = None, module_fraction: float = 0.25,
                  mask_fraction: float | None = None, module_selection: str = "saliency",
                  steps: int = 100, lr: float = 1e-3, batch_size: int = 4,
                  timestep_sampler: str = "concept",
                  forget_weight: float = 1.0, preserve_weight: float = 1.0, seed: int = 0,
                  saliency_batch_size: int = 8, gradient_checkpointing: bool = False,
                  backward_per_term: bool = False, adversarial=None,
                  progress: Callable[[int, int, float], None] | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  phase_progress: Callable[[str, int, int], None] | None = None) -> SpareResult:
    """Forget ``concept`` (overwritten by ``surrogate``) while keeping ``preserve`` prompts.
    Several concepts at once: one per line in ``concept``, their surrogates one per line (or one
    for all) in ``surrogate``; ``num_samples`` are drawn per concept.

    All arguments are checked before any generation or training. Returns the trained adapter
    (not attached: apply it with ``adapter.attach(denoiser.unet)`` or save it), the saliency
    map and the training history. Memory controls: ``saliency_batch_size`` (latents per saliency
    micro-batch), ``gradient_checkpointing`` (saliency and training), ``backward_per_term``
    (forget and preserve halves back-propagated one after the other); element scores are kept
    only when ``mask_fraction`` asks for an element mask. ``phase_progress(what, done, total)``
    reports the phases before training (``"concept samples"``, ``"saliency"``, ``"preserve pool
    i"``, ``"timestep gaps"``); ``progress(step, steps, loss)`` the training steps.
    ``module_selection="random"`` adapts as many random modules instead of the most salient ones
    (an ablation control; see ``sparse_lora_from_saliency``). ``adversarial`` (True or an
    :class:`~spare_core.probe.adversarial.AdversarialConfig`) trains against the prompt attack
    (:mod:`spare_core.probe.adversarial`); its seconds are in ``history["attack_seconds"]``.
    """
    pool = PoolConfig(size=num_samples, steps=sample_steps, guidance=guidance, clip_x0=clip_x0)
    task = concept_task = ConceptTask(concept, surrogate, list(preserve), pool=pool)
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
    check_rank(denoiser.unet, rank)
    check_gradient_storage(denoiser.unet)
    check_selection(module_selection)
    if not (0.0 < module_fraction <= 1.0):
        raise ValueError(f"module fraction must be in (0, 1], got {module_fraction}")
    if mask_fraction is not None and not (0.0 < mask_fraction <= 1.0):
        raise ValueError(f"sparsity (mask fraction) must be in (0, 1], got {mask_fraction}")

    gen = torch.Generator().manual_seed(seed)
    prompts = task.sample_prompts(num_samples)  # num_samples per concept line
    latents = sample(denoiser, prompts, steps=sample_steps, guidance=guidance,
                     method="ddim", generator=gen, clip_x0=clip_x0,
                     callback=phase_callback(phase_progress, "concept samples"))
    element_masks = mask_fraction is not None and mask_fraction < 1.0
    sal = compute_saliency(denoiser, prompts, latents, seed=seed, should_stop=should_stop,
                           batch_size=saliency_batch_size, element_scores=element_masks,
                           gradient_checkpointing=gradient_checkpointing,
                           progress=phase_callback(phase_progress, "saliency"))
    adapter = sparse_lora_from_saliency(denoiser.unet, sal, rank=rank, alpha=alpha,
                                        module_fraction=module_fraction,
                                        mask_fraction=mask_fraction,
                                        selection=module_selection, seed=seed)
    adapter.meta.update(method="spare", surrogate=surrogate)
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
