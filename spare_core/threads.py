"""CPU thread policy of the command line and the tests (measured: benchmarks/RESULTS.md, "CPU
threads").

OpenMP workers spin while they wait; on a machine whose cores are busy with other work they are
descheduled mid-spin and a step takes many times longer (measured on 2 cores with one competing
process per core: the digits UNet's forward+backward had 7-second outliers with 2 threads, an
81 M-parameter UNet took 12x longer than with 1 thread). A second thread gained little for the
digits UNet on a quiet machine (15%) and 1.6x for the 81 M-parameter UNet. So:

- models under :data:`SMALL_MODEL_PARAMS` parameters: one thread;
- larger models: the cores that are free when the run starts (usable cores minus the 1-minute
  load average, at least one);
- ``SPARE_THREADS=N`` (else ``OMP_NUM_THREADS=N``) overrides both.

``OMP_WAIT_POLICY=PASSIVE`` was measured too and not adopted: it made 2 threads slower than 1
even on a quiet machine (digits 81 vs 36 ms, 81 M UNet 1.7 vs 1.8 s). This module imports torch
only inside :func:`apply`.
"""
from __future__ import annotations

import os

ENV = "SPARE_THREADS"
SMALL_MODEL_PARAMS = 20_000_000  # below this, one thread (digits UNet: 0.8 M; SD1.5: 860 M)


def requested_threads() -> int | None:
    """Thread count asked for by ``SPARE_THREADS`` (else ``OMP_NUM_THREADS``), or None.

    ValueError naming the fix for a value that is not a positive integer (checked before torch
    is imported, so a typo costs no start-up time)."""
    for var in (ENV, "OMP_NUM_THREADS"):
        text = os.environ.get(var, "").strip()
        if not text:
            continue
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{var}={text!r} is not a positive integer; set e.g. {var}=1 "
                             "or unset it")
        return n
    return None


def choose_threads(num_params: int, cores: int | None = None, load: float | None = None) -> int:
    """Threads for a model of ``num_params`` parameters: the request if any, else 1 for small
    models and the free cores (``cores`` minus ``load``, default: this machine's usable cores and
    1-minute load average) for large ones."""
    asked = requested_threads()
    if asked is not None:
        return asked
    if num_params < SMALL_MODEL_PARAMS:
        return 1
    cores = usable_cores() if cores is None else cores
    load = _load_average() if load is None else load
    return max(1, cores - round(load))  # load averages are >= 0


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def apply(model) -> int:
    """Set torch's intra-op threads for ``model`` (an ``nn.Module``, or anything with ``.unet``)
    by :func:`choose_threads`; returns the count set."""
    import torch

    net = getattr(model, "unet", model)
    n = choose_threads(sum(p.numel() for p in net.parameters()))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
