"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024), a closed-form edit of the
cross-attention key/value projections.

Every cross-attention ``to_k`` / ``to_v`` weight ``W`` ``[out, d]`` reads the text sequence
directly, so where the erased concept's token embeddings ``c_i`` should now produce what the
guide's ``c*_i`` produced, and the preserved prompts' ``c_j`` what they produced before, the least
squares solution is

    W' = (e * sum_i W c*_i c_i^T + p * sum_j W c_j c_j^T + lam * W)
         (e * sum_i c_i c_i^T   + p * sum_j c_j c_j^T   + lam * I)^-1

(``e`` erase scale, ``p`` preserve scale, ``lam`` ties ``W'`` to ``W`` where the sums say
nothing). No gradient, no sampling: one solve per layer, well under a second at SD1.5 size.
The result is an :class:`~spare_core.adapter.UnlearnAdapter` of full deltas ``W' - W`` on those
layers, so it saves, applies, exports and bakes like any other method's adapter.

Token pairing. Concept and guide are paired token by token from each prompt's last word token to
the end of the sequence (the end-of-text and padding positions, where CLIP gathers the whole
prompt), as UCE's code aligns them: ``c[i:i+n]`` with ``c*[j:j+n]``, ``i`` / ``j`` the last word
positions, ``n`` the shorter tail. Every backend says where that is through the denoiser's
``last_word_index(prompt)`` (diffusers: its tokenizer; ComfyUI: ``CLIP.tokenize`` with word ids,
as CLIPTextEncode tokenizes; SDXL's two encoders share positions), so the edit is the same on
every backend; a denoiser that cannot say is refused before any encoding. Preserved prompts
contribute every position. Several (concept, guide) pairs go into one solve: multi-concept
erasure.

UCE edits cross-attention, so it applies to the UNet families (SD1.x, SD2.x, SDXL); a DiT's joint
attention reads the text through per-block projections of a transformed sequence, and is refused.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .adapter import MaskedFullDelta, UnlearnAdapter
from .conditioning import text_sequence
from .denoiser import Denoiser
from .families import adaptable_modules, is_text_projection
from .families.unet import is_cross_attention

def uce_modules(net: torch.nn.Module) -> list[str]:
    """Cross-attention key/value projections (``attn2.to_k`` / ``attn2.to_v``, diffusers and
    CompVis names alike); ValueError naming the supported families when there are none (a DiT),
    so callers can check a network before encoding any prompt."""
    names = [n for n in adaptable_modules(net)  # the UNet's text projections, not a DiT's
             if is_cross_attention(n) and is_text_projection(n)]
    if not names:
        raise ValueError("UCE edits cross-attention key/value projections (attn2.to_k/to_v), "
                         "which this network has none of: it applies to SD1.x, SD2.x and SDXL "
                         "UNets, not to SD3/Flux transformers")
    return names


def _last_word_index(denoiser: Denoiser, prompt: str) -> int:
    """Position of the prompt's last word token in its encoded sequence (start token at 0):
    ``denoiser.last_word_index(prompt)``; ValueError naming the fix when the backend cannot
    count (no such method, or it answers None: an SDXLDenoiser built without a tokenizer)."""
    count = getattr(denoiser, "last_word_index", None)
    i = count(prompt) if callable(count) else None
    if i is None:
        raise ValueError(f"{type(denoiser).__name__} cannot say where a prompt's words end in its "
                         "text sequence, which UCE pairs concept and guide tokens from: give it "
                         "a last_word_index(prompt) method (SDXLDenoiser: pass tokenizer=, or "
                         "build it with from_pipeline)")
    return int(i)


def _pair(denoiser: Denoiser, concept: str, guide: str) -> tuple[Tensor, Tensor]:
    """Aligned ``(c [n, d], c* [n, d])`` token embeddings of a concept and its guide, float64 on
    the CPU: each sequence from its prompt's last word token on, ``n`` the shorter tail."""
    i, j = _last_word_index(denoiser, concept), _last_word_index(denoiser, guide)
    c = text_sequence(denoiser.encode([concept]))[0].double().cpu()
    g = text_sequence(denoiser.encode([guide]))[0].double().cpu()
    if not (0 <= i < c.shape[0] and 0 <= j < g.shape[0]):
        raise ValueError(f"{type(denoiser).__name__}.last_word_index gave positions ({i}, {j}) "
                         f"outside the encoded sequences ({c.shape[0]}, {g.shape[0]} tokens) of "
                         f"{concept!r} / {guide!r}: the backend counts tokens differently from "
                         "how it encodes them")
    n = min(c.shape[0] - i, g.shape[0] - j)
    return c[i:i + n], g[j:j + n]


def uce_edit(denoiser: Denoiser, pairs: Sequence[tuple[str, str]],
             preserve: Sequence[str] = (), *, erase_scale: float = 1.0,
             preserve_scale: float = 1.0, lamb: float = 0.5,
             modules: Sequence[str] | None = None) -> UnlearnAdapter:
    """Erase each ``(concept, guide)`` of ``pairs`` (guide ``""``: the empty prompt) while keeping
    ``preserve`` prompts; returns the adapter (not attached). Checked before any work: at least
    one pair, no concept equal to its guide or listed as preserved, positive scales, a UNet with
    cross-attention, a denoiser that can place each prompt's last word (``last_word_index``)."""
    pairs = [(str(c), str(g)) for c, g in pairs]
    if not pairs:
        raise ValueError("UCE needs at least one (concept, guide) pair")
    for c, g in pairs:
        if not c.strip():
            raise ValueError("a UCE concept is empty: type the concept to erase")
        if c.strip().casefold() == g.strip().casefold():
            raise ValueError(f"the guide equals the concept ({c!r}): choose what it should become")
        if any(c.strip().casefold() == p.strip().casefold() for p in preserve):
            raise ValueError(f"the concept {c!r} is also listed as a preserved prompt")
    if not (erase_scale > 0 and preserve_scale >= 0 and lamb > 0):
        raise ValueError("UCE needs erase_scale > 0, preserve_scale >= 0 and lamb > 0")
    net = denoiser.unet
    names = list(modules) if modules is not None else uce_modules(net)
    mods = adaptable_modules(net)
    ctx_dim = mods[names[0]].weight.shape[1]
    for c, g in pairs:  # the backend can place every prompt's last word: before any encoding
        _last_word_index(denoiser, c), _last_word_index(denoiser, g)
    erase = [_pair(denoiser, c, g) for c, g in pairs]
    keep = [text_sequence(denoiser.encode([p]))[0].double().cpu() for p in preserve]
    for c, _ in erase:
        if c.shape[1] != ctx_dim:
            raise ValueError(f"text embeddings have {c.shape[1]} dims but {names[0]} reads "
                             f"{ctx_dim}: the denoiser's encoder does not feed this network")
    c_e = torch.cat([c for c, _ in erase])            # [N_e, d]
    g_e = torch.cat([g for _, g in erase])            # [N_e, d]
    c_p = torch.cat(keep) if keep else c_e.new_zeros((0, ctx_dim))
    eye = torch.eye(ctx_dim, dtype=torch.float64)
    # the right-hand factor is shared by every layer (it only involves the text embeddings)
    rhs = erase_scale * c_e.T @ c_e + preserve_scale * c_p.T @ c_p + lamb * eye
    rhs_inv = torch.linalg.inv(rhs)
    deltas = {}
    with torch.no_grad():
        for n in names:
            w = mods[n].weight.detach().double().cpu()   # [out, d]
            lhs = (erase_scale * (w @ g_e.T) @ c_e + preserve_scale * (w @ c_p.T) @ c_p
                   + lamb * w)
            new = lhs @ rhs_inv
            d = MaskedFullDelta(tuple(w.shape), torch.ones(w.shape, dtype=torch.bool))
            d.values.copy_((new - w).float())
            deltas[n] = d
    return UnlearnAdapter(deltas, {"method": "uce", "concept": "; ".join(c for c, _ in pairs),
                                   "surrogate": "; ".join(g for _, g in pairs)})
