"""A list of concepts to erase, read and planned without torch (the CLI checks it before importing
torch): one concept per line, ``concept | surrogate`` or ``concept`` (the shared surrogate);
blank lines and lines starting with ``#`` are skipped.

:func:`plan_jobs` turns the list into one :class:`ConceptJob` per concept for the per-concept
mode (:mod:`spare_core.multi_concept`): each job keeps the shared preserved prompts and adds
the list's other concepts to them, so training one erasure does not undo another.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

FUSIONS = ("sum", "ties", "least_squares")
"""How per-concept adapters become one (:mod:`spare_core.fusion`)."""

DEFAULT_FUSION = "least_squares"
"""The fusion a list gets unless one is named: chosen by the lists' table (benchmarks/RESULTS.md,
"Lists of 4 and 7 styles"): on the mean of UA, IRA and CRA over k = 4 and 7, seeds 0 and 1, it is
ahead of ``sum`` (0.991 against 0.987) with the kept prompts' FD lower on every list."""
LIST_PER_CONCEPT_METHOD = "spare"
"""The method whose lists of several concepts train per concept (fused by
:data:`DEFAULT_FUSION`) unless told ``--shared``, in the CLI as in the node (canvas lists of 4 and 7
styles and the mixed list of 14: benchmarks/RESULTS.md)."""


def prompt_key(p: str) -> str:
    """A prompt as compared for sameness: case and runs of white space ignored."""
    return " ".join(p.casefold().split())


def parse_concept_list(text: str, surrogate: str = "", source: str = "concept list"
                       ) -> list[tuple[str, str]]:
    """``(concept, surrogate)`` per line of ``text``; ValueError naming the line (``source``
    line N) for an empty concept, more than one ``|``, a repeated concept or an empty list."""
    pairs: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for no, raw in enumerate(str(text).splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|")]
        where = f"{source} line {no} ({raw.strip()!r})"
        if len(parts) > 2:
            raise ValueError(f"{where}: one '|' at most, as 'concept | surrogate'")
        concept = parts[0]
        sur = parts[1] if len(parts) == 2 else surrogate
        if not concept:
            raise ValueError(f"{where}: the concept before '|' is empty")
        if prompt_key(concept) == prompt_key(sur):
            raise ValueError(f"{where}: the surrogate equals the concept; give what it should "
                             "turn into, or nothing after '|' for the shared surrogate")
        if prompt_key(concept) in seen:
            raise ValueError(f"{where}: {concept!r} is already listed on line "
                             f"{seen[prompt_key(concept)]}")
        seen[prompt_key(concept)] = no
        pairs.append((concept, sur))
    if not pairs:
        raise ValueError(f"{source} holds no concept: write one per line, "
                         "'concept | surrogate' or 'concept'")
    return pairs


def read_concept_list(path: str, surrogate: str = "") -> list[tuple[str, str]]:
    """:func:`parse_concept_list` of a UTF-8 text file (FileNotFoundError naming it)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--concept-list {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        return parse_concept_list(f.read(), surrogate, source=path)


@dataclass(frozen=True)
class ConceptJob:
    """One concept's training job: its own concept, surrogate and preserve set (the shared
    preserved prompts, then the list's other concepts)."""

    index: int
    concept: str
    surrogate: str
    preserve: tuple[str, ...]


def plan_jobs(pairs: Sequence[tuple[str, str]], preserve: Sequence[str] = ()) -> list[ConceptJob]:
    """One job per ``(concept, surrogate)``; ValueError for a surrogate that the list erases or a
    concept also listed as preserved (the fix named)."""
    concepts = [c for c, _ in pairs]
    keys = [prompt_key(c) for c in concepts]
    if len(set(keys)) != len(keys):
        raise ValueError("a concept is listed twice; give each concept once")
    for c, s in pairs:
        if s and prompt_key(s) in keys:
            raise ValueError(f"the surrogate {s!r} of {c!r} is itself erased by the list: "
                             "choose a surrogate that is kept")
        if any(prompt_key(p) == prompt_key(c) for p in preserve):
            raise ValueError(f"the concept {c!r} is also listed as a preserved prompt")
    jobs = []
    for i, (c, s) in enumerate(pairs):
        others = [o for o in concepts if prompt_key(o) != prompt_key(c)
                  and all(prompt_key(o) != prompt_key(p) for p in preserve)]
        jobs.append(ConceptJob(i, c, s, tuple(preserve) + tuple(others)))
    return jobs


# ---- ``spare unlearn``'s list flags (torch-free: checked before torch is imported) ----
def add_arguments(p) -> None:
    """``--concept-list``, ``--per-concept``, ``--fusion``, ``--fused-rank``, ``--processes``."""
    p.add_argument("--concept-list", default=None, metavar="FILE",
                   help="text file of concepts to erase, one per line: 'concept | surrogate', or "
                        "'concept' (then the shared --surrogate); '#' starts a comment line")
    p.add_argument("--per-concept", action="store_true",
                   help="train one adapter per concept from the base model (the list's other "
                        "concepts join its --preserve prompts), then fuse them into one file "
                        "(--fusion); spread over processes with torchrun or --processes. "
                        "The default for a list of several concepts with --method "
                        f"{LIST_PER_CONCEPT_METHOD}; other methods opt in")
    p.add_argument("--shared", action="store_true",
                   help="train one adapter for the whole list instead, in the time of one "
                        "concept's run (it erases less as a list of styles grows; for a list "
                        "of objects given one surrogate it keeps the other objects best)")
    p.add_argument("--fusion", choices=FUSIONS, default=None,
                   help="how --per-concept adapters become one: least_squares (MACE's closed "
                        "form on each concept's and the preserved prompts' layer inputs), sum "
                        "of the deltas, or ties (TIES-merging); default "
                        f"{DEFAULT_FUSION}")
    p.add_argument("--fused-rank", type=int, default=None, metavar="R",
                   help="rank of the fused LoRA where the fusion is not an exact sum (default: "
                        "the sum of the jobs' ranks; 0 keeps it dense)")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="--per-concept over N processes: starts 'torchrun --standalone "
                        "--nproc-per-node N -m spare_core.cli ...' (gloo on CPU, NCCL on GPUs)")


def check_arguments(a) -> None:
    """Read ``--concept-list`` into ``a.concept`` / ``a.surrogate`` (one per line) and check the
    per-concept flags; ValueError naming the fix."""
    listed = getattr(a, "concept_list", None)
    if listed is not None:
        if a.concept is not None:
            raise ValueError("give --concept or --concept-list, not both")
        if "\n" in (a.surrogate or ""):
            raise ValueError("with --concept-list, --surrogate is the one shared surrogate; put "
                             "a line's own after '|' in the list")
        pairs = read_concept_list(listed, a.surrogate or "")
        sur = [s for _, s in pairs]
        if any(sur) and not all(sur):
            empty = next(c for c, s in pairs if not s)
            raise ValueError(f"{listed}: {empty!r} has no surrogate while others do: give every "
                             "line one ('concept | surrogate'), or a shared --surrogate")
        a.concept = "\n".join(c for c, _ in pairs)
        a.surrogate = "\n".join(sur) if len(set(sur)) > 1 else sur[0]
    per = getattr(a, "per_concept", False)
    if getattr(a, "shared", False):
        if per:
            raise ValueError("--per-concept and --shared contradict: choose one")
    elif (getattr(a, "method", None) == LIST_PER_CONCEPT_METHOD and a.concept is not None
          and len([c for c in a.concept.split("\n") if c.strip()]) > 1):
        per = a.per_concept = True  # a list: one adapter per concept, fused (the default)
    if not per:
        for flag, v in (("--fusion", a.fusion), ("--fused-rank", a.fused_rank),
                        ("--processes", a.processes)):
            if v is not None:
                raise ValueError(f"{flag} applies to --per-concept")
        return
    a.fusion = a.fusion or DEFAULT_FUSION
    if a.fused_rank is not None and a.fused_rank < 0:
        raise ValueError(f"--fused-rank takes a rank >= 1, or 0 for dense; got {a.fused_rank}")
    if a.processes is not None and a.processes < 1:
        raise ValueError(f"--processes takes a number >= 1, got {a.processes}")
    if a.concept is None:
        raise ValueError("--per-concept erases a list: give --concept-list FILE or repeat "
                         "--concept")


def torchrun_arguments(a) -> list[str] | None:
    """The ``torchrun`` arguments that ``--processes N`` (N > 1, outside torchrun) runs: the same
    command without ``--processes``; None when this process should run the work itself."""
    n = getattr(a, "processes", None)
    if not n or n < 2 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    argv, rest = [], list(a.argv)
    while rest:
        x = rest.pop(0)
        if x == "--processes":
            rest.pop(0)
        elif not x.startswith("--processes="):
            argv.append(x)
    return ["--standalone", f"--nproc-per-node={n}", "-m", "spare_core.cli", *argv]
