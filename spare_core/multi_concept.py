"""Per-concept training, then fusion: a list of concepts erased by one adapter per concept, each
trained alone from the base model, fused into one :class:`~spare_core.adapter.UnlearnAdapter`.

The shared-adapter mode (``run_method(..., concept="a\\nb")``) trains the whole list in one
adapter and one step budget. :func:`unlearn_concepts` instead runs ``run_method`` once per
concept (:class:`~spare_core.concept_list.ConceptJob`: its concept, surrogate, the shared
preserved prompts plus the list's other concepts, the method's recipe, the same seed as a
single-concept run) and fuses the results (:mod:`spare_core.fusion`: ``sum``, ``ties``,
``least_squares``). The latent pools are sampled once for the list (:func:`list_pools`, one
per concept and per shared preserved prompt) and shared by the jobs and the fusion: a list of k
samples k + P pools where k single runs sample k (1 + P).

Spread over processes: under ``torchrun --nproc-per-node N`` (``torch.distributed`` initialised:
gloo on CPU, NCCL on GPU) each rank samples every N-th pool and the ranks exchange them; job
``j`` runs on rank ``j % N``. After each round of N jobs the ranks
exchange their status, so one failing rank makes every rank raise :class:`ConceptJobError` (naming
the rank, the concept and the error) after its current job, and nothing is written. Then every
rank receives every adapter (``all_gather_object``: LoRA state dicts are small); for
``least_squares`` each rank adds its own concepts' input Grams and the partial sums are reduced
to rank 0. Rank 0 fuses and returns the result (saving is the caller's: ``save_adapter`` writes
atomically); the other ranks return None. The fused adapter equals the one-process run's up to
float summation order (tests/test_per_concept.py).
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .adapter import UnlearnAdapter
from .concept_list import DEFAULT_FUSION, ConceptJob, plan_jobs
from .denoiser import Denoiser, compute_dtype_of, device_of, prediction
from .families.unet import adaptable_modules
from .fusion import LS_RIDGE, TIES_DENSITY, GramSums, check_fusion, fuse, union_names
from .loop import UnlearnResult
from .tasks import PoolConfig, concept_pairs, sample_pool, with_unconditional

log = logging.getLogger(__name__)


class ConceptJobError(RuntimeError):
    """A per-concept job failed (on some rank); nothing was fused or written."""


@dataclass
class MultiConceptResult(UnlearnResult):
    """The fused adapter, the run's history (``jobs``: one summary per concept), ``parts``, the
    per-concept adapters in list order, and ``sums``, the least-squares fusion's statistics
    (:class:`~spare_core.fusion.GramSums`; None for the other fusions)."""

    parts: list = field(default_factory=list)
    sums: GramSums | None = None


# ---- torch.distributed, or one process ----
def world() -> tuple[int, int]:
    """``(rank, world size)``: torch.distributed's when initialised, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj) -> list:
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def _check_all(rank: int, err: str | None) -> None:
    """Exchange every rank's error (None when fine); raise ConceptJobError on every rank if any
    failed."""
    failed = [e for e in _all_gather(err) if e]
    if failed:
        raise ConceptJobError("per-concept unlearning failed, nothing was written: "
                              + "; ".join(failed))


def _reduce_to_rank0(tensors: Sequence[Tensor]) -> None:
    import torch.distributed as dist

    if world()[1] == 1:
        return
    nccl = dist.get_backend() == "nccl"
    for t in tensors:
        buf = t.cuda() if nccl and not t.is_cuda else t
        dist.reduce(buf, dst=0)
        if buf is not t:
            t.copy_(buf)


def init_distributed(device: str = "cpu", timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (``WORLD_SIZE`` > 1): NCCL when
    ``device`` is CUDA (each rank on ``cuda:LOCAL_RANK``), else gloo. Returns ``(rank, size)``;
    ``(0, 1)`` without torchrun."""
    import datetime
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return world()
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    import atexit
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return world()


def rank_device(device: str) -> str:
    """``cuda:LOCAL_RANK`` for a CUDA device under torchrun, else ``device``."""
    import os

    if str(device).startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def rank_bars(job: ConceptJob | None, total: int):
    """``(progress, phase_progress)`` drawing tqdm bars named by rank and concept (one line per
    rank: ``position`` = rank); ``job`` None: the list's latent pools, before the jobs."""
    from tqdm.auto import tqdm

    rank, size = world()
    tag = f"rank {rank}/{size} " if size > 1 else ""
    name = f"{tag}[{job.index + 1}/{total}] {job.concept[:24]}" if job else f"{tag}latent pools"
    bars: dict[str, object] = {}

    def bar(what: str, n: int):
        b = bars.get(what)
        if b is None:
            b = bars[what] = tqdm(total=n, desc=f"{name}: {what}", position=rank, leave=False,
                                  dynamic_ncols=True)
        return b

    def progress(step: int, steps: int, loss: float) -> None:
        b = bar("train", steps)
        b.n = step
        b.set_postfix(loss=f"{loss:.4g}", refresh=False)
        b.refresh()
        if step == steps:
            b.close()

    def phase(what: str, done: int, n: int) -> None:
        b = bar(what, n)
        b.n = done
        b.refresh()
        if done >= n:
            b.close()

    return progress, phase


# ---- the least-squares fusion's inputs ----
@torch.no_grad()
def input_grams(denoiser: Denoiser, adapter: UnlearnAdapter, names: Sequence[str],
                prompts: Sequence[str], latents: Tensor | None, seed: int,
                batch_size: int = 4) -> dict[str, Tensor]:
    """Mean ``x x^T`` (float64, ``[in, in]``) of the inputs ``x`` of each Linear module
    ``names`` while the base model (no adapter) reads ``prompts``: a text-encoder adapter's
    modules see the prompts' token states; a UNet's see ``latents[i]`` (one per prompt) noised
    to uniformly drawn steps with prompt ``i``'s context (text-reading projections: its prompt
    embeddings)."""
    net = adapter.network(adapter.root_of(denoiser))
    mods = adaptable_modules(net)
    linear = [n for n in names if mods[n].weight.dim() == 2]
    acc = {n: torch.zeros(mods[n].weight.shape[1], mods[n].weight.shape[1], dtype=torch.float64,
                          device=mods[n].weight.device) for n in linear}
    count = dict.fromkeys(linear, 0)

    def hook_for(n):
        def hook(_m, args, _out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc[n] += x.T @ x
            count[n] += x.shape[0]
        return hook

    handles = [mods[n].register_forward_hook(hook_for(n)) for n in linear]
    try:
        if adapter.root != "unet":
            for p in prompts:
                denoiser.encode([p])
        else:
            from .process import process_of

            proc = process_of(denoiser)
            gen = torch.Generator().manual_seed(seed + 7)
            dev = device_of(denoiser)
            for s in range(0, len(prompts), batch_size):
                x0 = latents[s:s + batch_size].float()
                t = torch.randint(0, proc.num_steps, (x0.shape[0],), generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                x_t = proc.q_sample(x0, t, noise)
                ctx = denoiser.encode(list(prompts[s:s + batch_size]))
                prediction(denoiser, x_t.to(dev, compute_dtype_of(denoiser)), t.to(dev), ctx)
    finally:
        for h in handles:
            h.remove()
    return {n: (acc[n] / max(count[n], 1)).cpu() for n in linear}


LS_SAMPLES = 16
"""Latents per concept (and for the preserved prompts) whose layer inputs the least-squares
fusion reads, taken from the list's pools (the recipe's pool holds 16). 16, chosen by the canvas lists (benchmarks/RESULTS.md, "The least-squares
fusion's inputs"): with 4, fewer rows than a 2-style list has preserved prompts, the kept
prompts' FD rose 14% above the original's; with 16 no list of 2 to 14 concepts rose more than
3.4% (either seed), erasure and retention kept."""


def gram_sums(denoiser: Denoiser, parts: Sequence[UnlearnAdapter],
              concept_inputs: Mapping[int, tuple[Sequence[str], Tensor]],
              preserve_inputs: tuple[Sequence[str], Tensor] | None = None, *, seed: int,
              preserve_weight: float = 1.0) -> GramSums:
    """The least-squares fusion's statistics over the Linear modules of ``parts``: for each
    ``index -> (prompts, latents)`` of ``concept_inputs``, part ``index``'s delta and the Grams of
    its layer inputs (:func:`input_grams`, ``seed``); the preserved prompts' Grams from
    ``preserve_inputs`` (``seed + 1``), weighted ``preserve_weight``. Partial when
    ``concept_inputs`` holds only some parts (one rank's share: the sums add up)."""
    names = union_names(parts)
    sums = GramSums({n: next(p[n].weight_shape for p in parts if n in p.names) for n in names})
    for i, (prompts, lat) in concept_inputs.items():
        sums.add(parts[i].merged(), input_grams(denoiser, parts[i], list(sums.shapes), prompts,
                                                lat, seed))
    if preserve_inputs is not None:
        prompts, lat = preserve_inputs
        sums.set_preserve(input_grams(denoiser, parts[0], list(sums.shapes), prompts, lat,
                                      seed + 1), preserve_weight)
    return sums


def pool_generator(seed: int, index: int) -> torch.Generator:
    """The initial noise of a list's pool ``index`` at ``seed``: a stream of its own, so a pool
    does not depend on which rank samples it and no two pools of a list (or of two seeds) share
    their noise."""
    return torch.Generator().manual_seed(1_000_003 * (seed + 1) + index)


def list_pools(denoiser: Denoiser, prompts: Sequence[str], pool: PoolConfig, seed: int,
               progress: Callable[[str, int, int], None] | None = None) -> dict[str, Tensor]:
    """One pool of ``pool.size`` latents per prompt of a list (its concepts, then the shared
    preserved prompts), sampled once by the frozen model (:func:`~spare_core.tasks.sample_pool`,
    as a task samples its own) for every job that reads it: a concept's pool is its own job's
    forget set and the other jobs' preserve pool for it. Pool ``i`` starts from
    :func:`pool_generator` ``(seed, i)``; under torch.distributed each rank samples every
    N-th pool (rank r: pools r, r + N, ..., the concepts of its own jobs) and the ranks exchange
    them. ``progress(what, done, total)`` per pool."""
    rank, n_ranks = world()
    mine, err = {}, None
    try:
        for i in range(rank, len(prompts), n_ranks):
            what = f"pool {i + 1}/{len(prompts)}"
            cb = (lambda d, n, what=what: progress(what, d, n)) if progress else None
            mine[prompts[i]] = sample_pool(denoiser, prompts[i], pool, pool_generator(seed, i), cb)
    except Exception as e:
        if n_ranks == 1:
            raise
        log.error("rank %d, latent pools:\n%s", rank, traceback.format_exc())
        err = f"rank {rank} failed sampling the list's latent pools: {type(e).__name__}: {e}"
    _check_all(rank, err)
    pools: dict[str, Tensor] = {}
    for part in _all_gather(mine):
        pools.update(part)
    return {p: pools[p] for p in prompts}


def ls_inputs(pools: Mapping[str, Tensor], concepts: Sequence[str], kept: Sequence[str],
              samples: int = LS_SAMPLES) -> tuple[dict, tuple | None]:
    """The least-squares fusion's inputs from pools the jobs trained on, no new image:
    ``({i: ([concept] * m, first m latents of its pool)}, (kept prompts, latents))``, at most
    ``samples`` each; the preserved rows drawn round robin over ``kept`` (row j of each pool in
    turn), None without kept prompts. ``concepts`` by job index."""
    mine = {i: ([c] * len(pools[c][:samples]), pools[c][:samples]) for i, c in enumerate(concepts)}
    rows = [(kept[i % len(kept)], i // len(kept)) for i in range(samples)] if kept else []
    rows = [(p, j) for p, j in rows if j < pools[p].shape[0]]
    preserve = ([p for p, _ in rows], torch.stack([pools[p][j] for p, j in rows])) if rows else None
    return mine, preserve


# ---- the jobs ----
def _train_job(method: str, denoiser: Denoiser, job: ConceptJob, run_kwargs: dict,
               bars, pools: Mapping[str, Tensor]) -> UnlearnResult:
    """Job ``job`` through :func:`~spare_core.methods.run_method`, on the list's ``pools``
    (its concept's as the forget set, the others' for its preserved prompts; empty: the
    method samples its own, UCE)."""
    from .methods import run_method

    kw = dict(run_kwargs)
    if bars is not None:
        kw["progress"], kw["phase_progress"] = bars
    if pools:
        kw["concept_latents"] = pools[job.concept]
        kw["preserve_latents"] = {p: x for p, x in pools.items() if p != job.concept}
    return run_method(method, denoiser, concept=job.concept, surrogate=job.surrogate,
                      preserve=list(job.preserve), **kw)


def _pairs(concepts, surrogate) -> list[tuple[str, str]]:
    if isinstance(concepts, str):
        return concept_pairs(concepts, surrogate if isinstance(surrogate, str) else "\n".join(surrogate))
    items = list(concepts)
    if items and all(isinstance(c, (tuple, list)) for c in items):
        return [(str(c), str(s)) for c, s in items]
    return concept_pairs("\n".join(items), surrogate if isinstance(surrogate, str)
                         else "\n".join(surrogate))


def unlearn_concepts(method: str, denoiser: Denoiser, concepts, surrogate="",
                     preserve: Sequence[str] = (), *, fusion: str = DEFAULT_FUSION,
                     fused_rank: int | None = None, ties_density: float = TIES_DENSITY,
                     ls_ridge: float = LS_RIDGE, ls_samples: int = LS_SAMPLES,
                     ls_preserve_weight: float = 1.0,
                     bars: Callable[[ConceptJob, int], tuple] | bool | None = None,
                     **run_kwargs) -> MultiConceptResult | None:
    """Erase a list of concepts with one adapter per concept, then fuse them into one.

    ``concepts``: a list of prompts, of ``(concept, surrogate)`` pairs, or one per line;
    ``surrogate``: one for all or one per concept (as :func:`~spare_core.tasks.concept_pairs`).
    ``preserve``: the shared preserved prompts (each job adds the list's other concepts).
    ``**run_kwargs`` go to :func:`~spare_core.methods.run_method` unchanged for every job (steps,
    lr, seed, num_samples, the method's hyperparameters...; None = the recipe). ``fusion``:
    ``sum``, ``ties`` (``ties_density``) or ``least_squares`` (``ls_ridge``; at most ``ls_samples``
    pool latents per concept and as many of the preserved prompts for its input Grams, weighted
    ``ls_preserve_weight``; the empty prompt among them where the method preserves the
    unconditional prediction, SPARE's ``preserve_uncond``); ``fused_rank``: the fused LoRA's rank where the fusion is not an
    exact concatenation (None: the sum of the jobs' ranks; 0: keep it dense). ``bars``: True for
    tqdm bars per rank, or a ``(job, total) -> (progress, phase_progress)`` factory (``job``
    None for the list's latent pools).

    The latent pools are sampled once for the list (:func:`list_pools`: each concept's, and each
    shared preserved prompt's where the method reads them or the fusion is least squares) and
    every job trains on them: its concept's pool as its forget set, the other concepts' and the
    shared prompts' as its preserve pools; the least-squares fusion reads the same pools
    (:func:`ls_inputs`).

    Runs in one process, or spread over torch.distributed's processes when initialised (module
    docstring). Returns the fused :class:`MultiConceptResult` on rank 0, None on the others;
    raises :class:`ConceptJobError` (on every rank) when a job fails.
    """
    from .methods import CONCEPT_METHODS, METHODS, reads_pools
    from .recipes import guidance_for, recipe

    if method not in CONCEPT_METHODS:
        raise ValueError(f"per-concept training takes a concept method {list(CONCEPT_METHODS)}, "
                         f"got {method!r}")
    check_fusion(fusion)
    if fusion == "least_squares" and ls_samples < 1:
        raise ValueError(f"ls_samples must be >= 1, got {ls_samples!r}")
    unknown = sorted(set(run_kwargs) - _run_keys() - set(METHODS[method].hparams))
    if unknown:
        raise ValueError(f"unlearn_concepts does not take {unknown}")
    if bars and ("progress" in run_kwargs or "phase_progress" in run_kwargs):
        raise ValueError("give progress either by `bars` or by `progress`/`phase_progress`")
    jobs = plan_jobs(_pairs(concepts, surrogate), list(preserve))
    rank, size = world()
    factory = rank_bars if bars is True else (bars or None)
    t0 = time.perf_counter()

    # the pools, sampled once for the whole list (each job would sample the shared preserved
    # prompts', and the list's other concepts', again): what the method trains on, and what
    # the least-squares fusion reads
    uncond = run_kwargs.get("preserve_uncond")
    if uncond is None:
        uncond = recipe(method).hparams.get("preserve_uncond", False)
    kept = with_unconditional(preserve) if uncond else list(preserve)
    train_concepts, train_kept = reads_pools(
        method, {k: v for k, v in run_kwargs.items() if k in METHODS[method].hparams})
    least_squares = fusion == "least_squares"
    pooled = ([j.concept for j in jobs] if train_concepts or least_squares else []) + (
        kept if train_kept or least_squares else [])
    pools: dict[str, Tensor] = {}
    if pooled:
        pool = PoolConfig(size=run_kwargs.get("num_samples") or recipe(method).num_samples,
                          steps=run_kwargs.get("sample_steps") or recipe(method).sample_steps,
                          guidance=guidance_for(denoiser, run_kwargs.get("guidance")),
                          clip_x0=run_kwargs.get("clip_x0"))
        pools = list_pools(denoiser, pooled, pool, int(run_kwargs.get("seed") or 0),
                           progress=factory(None, len(jobs))[1] if factory else None)

    results: dict[int, tuple] = {}
    for start in range(0, len(jobs), size):
        job = jobs[start + rank] if start + rank < len(jobs) else None
        err = None
        if job is not None:
            try:
                res = _train_job(method, denoiser, job, run_kwargs,
                                 factory(job, len(jobs)) if factory else None,
                                 pools if train_concepts else {})
                tensors, meta = res.adapter.to_tensors()
                loss = res.history.get("loss") or []
                results[job.index] = (tensors, meta, {
                    "concept": job.concept, "surrogate": job.surrogate, "rank": rank,
                    "seconds": res.history.get("seconds"),
                    "final_loss": loss[-1] if loss else None,
                    "trainable_params": res.history.get("trainable_params")})
            except Exception as e:  # reported on every rank, then raised there
                if size == 1:
                    raise ConceptJobError(f"concept {job.concept!r} (job {job.index + 1}/"
                                          f"{len(jobs)}) failed: {type(e).__name__}: {e}") from e
                log.error("rank %d, concept %r:\n%s", rank, job.concept, traceback.format_exc())
                err = (f"rank {rank} failed on concept {job.concept!r} (job {job.index + 1}/"
                       f"{len(jobs)}): {type(e).__name__}: {e}")
        _check_all(rank, err)

    every: dict[int, tuple] = {}
    for part in _all_gather(results):
        every.update(part)
    parts = [UnlearnAdapter.from_tensors(*every[j.index][:2]) for j in jobs]

    sums = None
    if least_squares:  # each rank its own concepts' Grams, rank 0 the preserved prompts'
        err = None
        try:
            mine, kept_rows = ls_inputs(pools, [j.concept for j in jobs], kept, ls_samples)
            sums = gram_sums(denoiser, parts, {i: mine[i] for i in range(rank, len(jobs), size)},
                             kept_rows if rank == 0 else None,
                             seed=int(run_kwargs.get("seed") or 0),
                             preserve_weight=ls_preserve_weight)
        except Exception as e:
            if size == 1:
                raise
            log.error("rank %d, least-squares inputs:\n%s", rank, traceback.format_exc())
            err = f"rank {rank} failed collecting the least-squares inputs: {type(e).__name__}: {e}"
        _check_all(rank, err)
        _reduce_to_rank0(sums.tensors())
    if rank != 0:
        return None

    meta = {"concept": "\n".join(j.concept for j in jobs),
            "surrogate": "\n".join(j.surrogate for j in jobs),
            "preserve": "\n".join(preserve), "per_concept": "true"}
    fused = fuse(fusion, parts, rank=fused_rank, density=ties_density, sums=sums,
                 ridge=ls_ridge, meta=meta)
    history = {"method": method, "per_concept": True, "fusion": fusion, "processes": size,
               "jobs": [every[j.index][2] for j in jobs], "loss": [], "terms": [],
               "seconds": time.perf_counter() - t0,
               "trainable_params": fused.num_trainable(), "ignored": []}
    return MultiConceptResult(fused, history, parts=parts, sums=sums)


def _run_keys() -> set[str]:
    """The run settings :func:`~spare_core.methods.run_method` takes (its keyword parameters but
    the task's inputs, which each job sets), read from its signature."""
    import inspect

    from .methods import run_method

    task_inputs = {"concept", "surrogate", "preserve", "forget", "keep", "forget_prompts",
                   "keep_prompts", "encode", "hparams", "concept_latents", "preserve_latents"}
    return {n for n, p in inspect.signature(run_method).parameters.items()
            if p.kind == p.KEYWORD_ONLY} - task_inputs
