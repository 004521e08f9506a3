"""Progress bars of the command line: one tqdm bar per phase (concept samples, saliency, preserve
pools, timestep gaps, encoding, training, evaluation), so each bar's rate and ETA measure that
phase alone; and the switch that silences the libraries' own bars and log lines."""
from __future__ import annotations

import sys
from typing import Callable

# how the engine's phase names (``phase_progress(what, done, total)``) read on a bar
_UNITS = {"concept samples": "step", "saliency": "sample", "timestep gaps": "bin",
          "encode forget": "batch", "encode keep": "batch"}


class PhaseBars:
    """``phase(what, done, total)`` and ``train(step, steps, loss)`` callbacks that draw one bar
    per phase, closing the previous phase's bar when a new one starts; ``label`` prefixes each
    bar (e.g. the method). Use as a context manager so the last bar closes on any exit."""

    def __init__(self, label: str = "", file=None, disable: bool | None = False) -> None:
        self.label = label
        self.file = file if file is not None else sys.stderr
        self.disable = disable
        self._bar = None
        self._what: str | None = None

    def _open(self, what: str, total: int, unit: str):
        from tqdm.auto import tqdm

        self.close()
        desc = f"{self.label}: {what}" if self.label else what
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.file, disable=self.disable,
                         dynamic_ncols=True, leave=True)
        self._what = what
        return self._bar

    def phase(self, what: str, done: int, total: int) -> None:
        """Engine phase callback: ``what`` has done ``done`` of ``total``."""
        bar = self._bar
        if what != self._what or bar is None or bar.total != total or done < bar.n:
            bar = self._open(what, total, _UNITS.get(what, "step"))
        bar.update(done - bar.n)

    def train(self, step: int, steps: int, loss: float) -> None:
        """Training callback: ``step`` of ``steps`` done, last loss ``loss``."""
        if self._what != "training" or self._bar is None:
            self._open("training", steps, "step")
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def sampler(self, what: str) -> Callable[[int, int], None]:
        """``callback(i, n)`` for :func:`spare_core.sampling.sample` drawing a bar ``what``."""
        return lambda i, n: self.phase(what, i, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._what = None, None

    def __enter__(self) -> "PhaseBars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quiet_libraries() -> None:
    """Silence transformers' and diffusers' own progress bars ("Loading weights") and their
    info/warning log lines, so the command prints only its own output."""
    import warnings

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for log in (tlog, dlog):
        log.set_verbosity_error()
        log.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(diffusers|transformers)")
