"""Argument types and checks of the ``spare`` command line, importable without torch: a bad
argument is refused in a fraction of a second, before torch, a model or a progress bar loads."""
from __future__ import annotations

import argparse
import math
import os
import re

# the engine's method names (spare_core.methods.METHODS; tests/test_cli.py checks they agree)
CONCEPT_METHODS = ("spare", "salun", "esd", "esd_u", "uce")
DATA_METHODS = ("siss", "neggrad", "erasediff", "naive_deletion")
EMBEDDED_NAMES = ("digits", "digits-dit", "canvas")
"""``--model`` of demo and bench (== spare_core.embedded.EMBEDDED, checked by tests)."""
METHOD_NAMES = CONCEPT_METHODS + DATA_METHODS

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list) and not d):
            return action.help or ""
        return super()._get_help_string(action)


def _int_at_least(text: str, lo: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= {lo}, got {text!r}") from None
    if v < lo:
        raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def seed(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    v = _finite(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    v = _finite(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    v = _finite(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def prompt(text: str) -> str:
    """argparse type: a prompt with at least one non-space character."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a prompt, e.g. \"Van Gogh style\"")
    return text


def is_digit(text: str) -> bool:
    """One digit 0..9 (surrounding spaces allowed)."""
    return text.strip() in tuple("0123456789")


def digit(text: str) -> int:
    """argparse type: one digit 0..9."""
    if not is_digit(text):
        raise argparse.ArgumentTypeError(f"must be a digit 0..9, got {text!r}")
    return int(text)


def device(text: str) -> str:
    """argparse type: auto, cpu, cuda, cuda:N or mps (availability is checked after start-up)."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def is_key_value(text: str) -> bool:
    """``KEY=VALUE`` with a non-blank key."""
    key, sep, _ = text.partition("=")
    return bool(sep and key.strip())


def key_value(text: str) -> str:
    """argparse type: KEY=VALUE (the value is parsed by spare_core.methods.parse_options)."""
    if not is_key_value(text):
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, got {text!r}")
    return text


def digit_list(text: str) -> list[int]:
    """``"3,5,7"`` -> ``[3, 5, 7]``; ValueError naming the fix otherwise."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or not all(map(is_digit, items)):
        raise ValueError(f"--forget must be a comma list of digits 0..9, got {text!r}")
    return [int(x) for x in items]


def forget_targets(model: str, text: str, mixed: bool = False) -> list:
    """``--forget`` of embedded ``model``: digits ``"3,5"`` -> ``[3, 5]``; canvas styles or
    objects ``"stripes,dots"`` -> ``["stripes", "dots"]`` (one domain at a time unless
    ``mixed``). ValueError naming the fix otherwise."""
    if model != "canvas":
        return digit_list(text)
    from .canvas.names import OBJECTS, STYLES  # no torch

    items = [x.strip().lower() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in STYLES + OBJECTS]
    if not items or bad:
        raise ValueError(f"--forget on the canvas model takes a comma list of styles "
                         f"({', '.join(STYLES)}) or objects ({', '.join(OBJECTS)}); got {text!r}")
    if not mixed and any(x in STYLES for x in items) and any(x in OBJECTS for x in items):
        raise ValueError(f"--forget {text!r} mixes styles and objects: erase one domain at a time")
    return items


def check_new_path(path: str | None, flag: str, overwrite: bool) -> None:
    """ValueError if ``path`` exists and ``overwrite`` is off (the fix: another path or
    ``--overwrite``)."""
    if path and os.path.lexists(path) and not overwrite:
        raise ValueError(f"{flag} {path!r} already exists; choose another path or pass "
                         "--overwrite to replace it")


def check_pipeline_folder(path: str) -> None:
    """ValueError/FileNotFoundError naming the problem unless ``path`` is a diffusers pipeline
    folder (``unet/`` or ``transformer/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model {path!r} does not exist; give the folder written by "
                                "pipe.save_pretrained()")
    if not os.path.isdir(path):
        raise ValueError(f"--model {path!r} is a file; give the folder written by "
                         "pipe.save_pretrained() (single-file checkpoints: load them with "
                         "StableDiffusionPipeline.from_single_file and save_pretrained first)")
    has = lambda sub: os.path.isdir(os.path.join(path, sub))  # noqa: E731
    net = "unet" if has("unet") else "transformer" if has("transformer") else None
    for sub in (net or "unet", "text_encoder", "tokenizer", "scheduler"):
        if not has(sub):
            raise FileNotFoundError(f"{path!r} is not a diffusers pipeline folder: no {sub}/ "
                                    "inside (SD1.x/SD2.x/SDXL: unet/, SD3/Flux: transformer/). "
                                    "Save one with pipe.save_pretrained(folder).")


def check_image_folder(path: str | None, flag: str) -> None:
    """FileNotFoundError unless ``path`` (if given) is an existing folder."""
    if path is not None and not os.path.isdir(path):
        what = "is not a folder" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"{flag} {path!r} {what}; give a folder of images")
