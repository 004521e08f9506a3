"""Names and prompts of the canvas model (no torch: the ``spare`` command's argument checks use
them): 8 objects x 8 styles, two names per concept (the first is the one the bench gives an
erasure, the second its paraphrase), two templates of the full prompt, and one-domain prompts
(``"stripes style"``, ``"a circle"``), which are what an erasure of a style or an object is given.
"""
from __future__ import annotations

OBJECTS = ["circle", "square", "triangle", "plus", "diamond", "moon", "heart", "hourglass"]
STYLES = ["plain", "stripes", "dots", "outline", "gradient", "checker", "grain", "neon"]
OBJECT_NAMES = {"circle": ("circle", "disc"), "square": ("square", "box"),
                "triangle": ("triangle", "pyramid"), "plus": ("plus", "cross"),
                "diamond": ("diamond", "rhombus"), "moon": ("moon", "crescent"),
                "heart": ("heart", "valentine"), "hourglass": ("hourglass", "sandglass")}
STYLE_NAMES = {"plain": ("plain", "photo"), "stripes": ("stripes", "lines"),
               "dots": ("dots", "polka"), "outline": ("outline", "contour"),
               "gradient": ("gradient", "fade"), "checker": ("checker", "chess"),
               "grain": ("grain", "speckle"), "neon": ("neon", "glow")}
TEMPLATES = ("a {o} in {s} style", "an image of a {o}, {s} style")
STYLE_ONLY = ("{s} style", "an image in {s} style")
OBJECT_ONLY = ("a {o}", "an image of a {o}")
EMPTY_PROMPT = ""


def prompt(style: str, obj: str, wording: int = 0, template: int = 0) -> str:
    """Full prompt of (style, object); ``wording`` 0 is the given names, 1 the paraphrase names."""
    return TEMPLATES[template].format(o=OBJECT_NAMES[obj][wording], s=STYLE_NAMES[style][wording])


def concept_prompt(concept: str, wording: int = 0) -> str:
    """One-domain prompt of a style (``"stripes style"``) or an object (``"a circle"``): what an
    erasure of that concept is given (``wording`` 0) or its paraphrase (``wording`` 1)."""
    if concept in STYLE_NAMES:
        return STYLE_ONLY[0].format(s=STYLE_NAMES[concept][wording])
    if concept in OBJECT_NAMES:
        return OBJECT_ONLY[0].format(o=OBJECT_NAMES[concept][wording])
    raise ValueError(f"unknown canvas concept {concept!r}; styles {STYLES}, objects {OBJECTS}")


def domain_of(concept: str) -> str:
    """``"style"`` or ``"object"``."""
    if concept in STYLE_NAMES:
        return "style"
    if concept in OBJECT_NAMES:
        return "object"
    raise ValueError(f"unknown canvas concept {concept!r}; styles {STYLES}, objects {OBJECTS}")


def all_words() -> list[str]:
    """Every word of every prompt (for the tokenizer)."""
    words = {w for t in (*TEMPLATES, *STYLE_ONLY, *OBJECT_ONLY)
             for w in t.replace(",", " ").replace("{o}", "").replace("{s}", "").split()}
    for names in (*OBJECT_NAMES.values(), *STYLE_NAMES.values()):
        words.update(names)
    return sorted(words)


def training_prompts() -> list[str]:
    """Every prompt the model is trained on, in a fixed order: full prompts (64 pairs x 2 names
    x 2 templates), one-domain prompts and the empty prompt."""
    out = [TEMPLATES[t].format(o=OBJECT_NAMES[o][wo], s=STYLE_NAMES[s][ws])
           for s in STYLES for o in OBJECTS for ws in (0, 1) for wo in (0, 1) for t in (0, 1)]
    out += [t.format(s=STYLE_NAMES[s][w]) for s in STYLES for w in (0, 1) for t in STYLE_ONLY]
    out += [t.format(o=OBJECT_NAMES[o][w]) for o in OBJECTS for w in (0, 1) for t in OBJECT_ONLY]
    return out + [EMPTY_PROMPT]
