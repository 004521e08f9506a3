"""Metrics of the canvas benchmark (UnlearnCanvas's protocol at toy scale) and the loaders of the
committed canvas assets.

For erased concepts of one domain (styles, or objects) and images generated from every
``a {object} in {style} style`` prompt:

- **UA**: share of the images of prompts holding an erased concept that the classifier does NOT
  give that concept (mean over the erased concepts; each in its own domain);
- **IRA** (in-domain retain): accuracy in the erased domain on the prompts holding no erased
  concept;
- **CRA** (cross-domain retain): accuracy in the other domain on those same prompts;
- a list of both domains (a "mixed" list: every concept but ``plain`` and ``square``, say) has no
  in- and cross-domain; its retention is measured per domain instead, **RA_style**: the style
  accuracy on every prompt whose style is kept (whatever its object), and **RA_object**: the
  object accuracy on every prompt whose object is kept. (On a one-domain list RA of the erased
  domain is IRA and RA of the other is CRA's accuracy over more prompts; only mixed lists get
  them.)
- **UA_para**: UA on the same prompts worded with the concepts' other names (``"a circle in lines
  style"`` for stripes): wordings the erasure was not given;
- **FD**: Frechet distance of classifier features, retained prompts' images vs renders of the same
  (style, object) pairs.

Images everywhere are ``[N, 3, 16, 16]`` in ``[-1, 1]``.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..digits.metrics import ASSETS, frechet_distance
from .data import render
from .names import OBJECTS, STYLES, domain_of, prompt

CANVAS_MODEL = os.path.join(ASSETS, "canvas")
CLASSIFIER = os.path.join(ASSETS, "canvas_classifier.safetensors")
SAMPLE_STEPS = 25  # ancestral DDPM steps of the canvas bench sampler (eval.json: 25 and 50)
SAMPLE_GUIDANCE = 4.0  # CFG scale of the bench sampler (eval.json; benchmarks/RESULTS.md): at 3.0 the dots texture came out faint, at 5.0 the dark end of gradient ramps sank into the background and took shapes with it (object accuracy down to 0.88), at 7.5 worse (0.64)
PAIRS = [(s, o) for s in STYLES for o in OBJECTS]
"""Every (style, object) pair, style-major: the bench's 64 prompts."""


def load_model(device: str | torch.device = "cpu"):
    """The committed canvas model as a ``DiffusersDenoiser`` (offline)."""
    from ..families import load_denoiser

    return load_denoiser(CANVAS_MODEL, device=device)


def load_classifier():
    """The committed :class:`~spare_core.canvas.classifier.CanvasClassifier` (eval, CPU)."""
    from .classifier import load_classifier_file

    return load_classifier_file(CLASSIFIER)


def generate(denoiser, pairs: Sequence[tuple[str, str]], n: int, seed: int = 0, *,
             wording: int = 0, template: int = 0, steps: int = SAMPLE_STEPS, guidance: float = SAMPLE_GUIDANCE,
             method: str = "ddpm", callback: Callable[[int, int], None] | None = None) -> Tensor:
    """``n`` images per (style, object) pair from its prompt (``wording`` 0: the given names,
    1: the paraphrase names; ``template`` 0: ``a {o} in {s} style``, 1: ``an image of a {o},
    {s} style``), in one batched call with noise fixed by ``seed`` and the pair's
    position, so before/after comparisons are paired. Returns ``[len(pairs) * n, 3, 16, 16]``,
    pair-major."""
    from ..sampling import sample

    prompts = [prompt(s, o, wording, template) for s, o in pairs for _ in range(n)]
    return sample(denoiser, prompts, steps=steps, guidance=guidance, method=method,
                  generator=torch.Generator().manual_seed(seed), clip_x0=1.0,
                  callback=callback).clamp(-1, 1)


def predictions(classifier, images: Tensor, pairs: Sequence[tuple[str, str]],
                n: int) -> dict[tuple[str, str], tuple[Tensor, Tensor]]:
    """``{(style, object): (predicted style indices [n], predicted object indices [n])}``."""
    ps, po = classifier.predict(images)
    return {pair: (ps[i * n:(i + 1) * n], po[i * n:(i + 1) * n]) for i, pair in enumerate(pairs)}


def _hits(preds, pairs, domain: str) -> Tensor:
    """Correct-or-not ``[sum n]`` in ``domain`` over ``pairs``."""
    out = []
    for s, o in pairs:
        ps, po = preds[(s, o)]
        out.append(ps == STYLES.index(s) if domain == "style" else po == OBJECTS.index(o))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def _rate(hits: Tensor) -> float:
    return int(hits.sum()) / hits.numel() if hits.numel() else float("nan")


def check_erased(erased: Sequence[str], mixed: bool = False) -> str:
    """The domain of the erased concepts: ``"style"`` or ``"object"``, or ``"mixed"`` for a
    list of both when ``mixed`` is allowed; ValueError otherwise."""
    if not erased:
        raise ValueError("name at least one erased concept")
    domains = {domain_of(c) for c in erased}
    if len(domains) != 1:
        if mixed:
            return "mixed"
        raise ValueError(f"erase concepts of one domain at a time (styles or objects), got {list(erased)}")
    return domains.pop()


def _holds(pair: tuple[str, str], concepts: Sequence[str]) -> bool:
    return pair[0] in concepts or pair[1] in concepts


def scores(preds, preds_para, erased: Sequence[str], surrogate: str | None = None,
           preds_template=None) -> dict:
    """UA, IRA, CRA, UA_para (and ``to_surrogate`` when the erased concepts share a surrogate
    concept of their domain) from :func:`predictions` of every pair (``preds``) and of the
    erased concepts' pairs in the paraphrase wording (``preds_para``); ``UA_tmpl`` from those
    pairs in the second template, given names (``preds_template``, when given)."""
    domain = check_erased(erased, mixed=True)

    def ua(pr) -> float:
        per = [1 - _rate(_hits(pr, [p for p in pr if _holds(p, [c])], domain_of(c)))
               for c in erased]
        return sum(per) / len(per)

    out = {"UA": ua(preds), "UA_para": ua(preds_para)}
    if domain == "mixed":
        out["RA_style"] = _rate(_hits(preds, [p for p in preds if p[0] not in erased], "style"))
        out["RA_object"] = _rate(_hits(preds, [p for p in preds if p[1] not in erased], "object"))
    else:
        other = "object" if domain == "style" else "style"
        kept = [p for p in preds if not _holds(p, erased)]
        out["IRA"] = _rate(_hits(preds, kept, domain))
        out["CRA"] = _rate(_hits(preds, kept, other))
    if preds_template is not None:
        out["UA_tmpl"] = ua(preds_template)
    if surrogate is not None and domain != "mixed":
        idx = (STYLES if domain == "style" else OBJECTS).index(surrogate)
        got = torch.cat([(pr[0] if domain == "style" else pr[1]) == idx
                         for p, pr in preds.items() if _holds(p, erased)])
        out["to_surrogate"] = _rate(got)
    return out


_REAL: dict[int, Tensor] = {}


def real_features(classifier, pairs: Sequence[tuple[str, str]], per_pair: int = 32) -> Tensor:
    """Classifier features of ``per_pair`` renders of each pair (seeded, cached per pair list)."""
    key = hash((tuple(pairs), per_pair))
    if key not in _REAL:
        gen = torch.Generator().manual_seed(777)
        s = torch.tensor([STYLES.index(p[0]) for p in pairs]).repeat_interleave(per_pair)
        o = torch.tensor([OBJECTS.index(p[1]) for p in pairs]).repeat_interleave(per_pair)
        with torch.no_grad():
            _REAL[key] = classifier.features(render(s, o, gen))
    return _REAL[key]


@torch.no_grad()
def fd(classifier, images: Tensor, pairs: Sequence[tuple[str, str]]) -> float:
    """FD of the classifier features of ``images`` vs renders of the same ``pairs``."""
    return frechet_distance(classifier.features(images.clamp(-1, 1)), real_features(classifier, pairs))


def canvas_metrics(denoiser, classifier, erased: Sequence[str], n: int, seed: int,
                   steps: int = SAMPLE_STEPS, surrogate: str | None = None,
                   callback: Callable[[int, int], None] | None = None) -> dict:
    """Every metric of ``denoiser`` for the ``erased`` concepts: UA, IRA and CRA (a list of both
    domains: RA_style and RA_object instead), UA_para, UA_tmpl
    (the erased pairs in the template that the erasure's one-domain prompt does not share), FD
    (retained prompts) and ``to_surrogate``, from ``n`` images per prompt; also ``images``
    ``{(style, object): [n, 3, 16, 16]}`` of every pair (for grids). ``callback(i, total)``
    reports the sampler's steps over the three sampling calls."""
    check_erased(erased, mixed=True)
    para_pairs = [p for p in PAIRS if _holds(p, erased)]
    total = 3 * steps

    def cb(offset):
        return None if callback is None else (lambda i, _n: callback(offset + i, total))

    imgs = generate(denoiser, PAIRS, n, seed, steps=steps, callback=cb(0))
    para = generate(denoiser, para_pairs, n, seed, wording=1, steps=steps, callback=cb(steps))
    tmpl = generate(denoiser, para_pairs, n, seed, template=1, steps=steps, callback=cb(2 * steps))
    preds = predictions(classifier, imgs, PAIRS, n)
    out = scores(preds, predictions(classifier, para, para_pairs, n), erased, surrogate,
                 predictions(classifier, tmpl, para_pairs, n))
    kept_idx = [i for i, p in enumerate(PAIRS) if not _holds(p, erased)]
    kept_imgs = torch.cat([imgs[i * n:(i + 1) * n] for i in kept_idx])
    out["FD"] = fd(classifier, kept_imgs, [PAIRS[i] for i in kept_idx])
    out["images"] = {p: imgs[i * n:(i + 1) * n] for i, p in enumerate(PAIRS)}
    return out
