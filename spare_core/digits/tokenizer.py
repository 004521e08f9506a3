"""A real ``transformers.CLIPTokenizer`` built locally (no hub): word-level tokens for the prompt
words, every single character (and its ``</w>`` end-of-word form) so any lowercase text encodes
without unknowns, and CLIP's ``<|startoftext|>`` / ``<|endoftext|>``."""
from __future__ import annotations

import json
import os
import string
import tempfile

from .data import EMPTY_PROMPT, NAMES, PROMPTS

WORDS = ["a", "handwritten", "digit", *NAMES]
CHARS = string.ascii_lowercase + string.digits + ".,'-!?&:;/()"
MAX_LENGTH = 16


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab (token -> id) and BPE merges that assemble every word of :data:`WORDS` left to right."""
    vocab: dict[str, int] = {}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for w in WORDS:
        symbols = list(w[:-1]) + [w[-1] + "</w>"]
        cur = symbols[0]
        for s in symbols[1:]:
            if (cur, s) not in merges:
                merges.append((cur, s))
            cur += s
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_tokenizer_files(folder: str) -> tuple[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder``; returns their paths."""
    vocab, merges = _vocab_and_merges()
    os.makedirs(folder, exist_ok=True)
    vpath, mpath = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vpath, "w") as f:
        json.dump(vocab, f)
    with open(mpath, "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vpath, mpath


def build_tokenizer(max_length: int = MAX_LENGTH):
    """A ``CLIPTokenizer`` over the local vocab (pad = ``<|endoftext|>``), checked by
    :func:`check_tokenizer`."""
    from transformers import CLIPTokenizer

    vpath, mpath = write_tokenizer_files(tempfile.mkdtemp(prefix="digits-tok-"))
    tok = CLIPTokenizer(vpath, mpath, model_max_length=max_length, pad_token="<|endoftext|>")
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok) -> None:
    """Raise if a prompt word is not one token, ids repeat across prompts, or an unknown appears."""
    vocab = tok.get_vocab()
    for w in WORDS:
        ids = tok(w, add_special_tokens=False).input_ids
        if ids != [vocab[w + "</w>"]]:
            raise RuntimeError(f"word {w!r} tokenized to {tok.convert_ids_to_tokens(ids)}")
    seqs = [tuple(tok(p).input_ids) for p in [EMPTY_PROMPT, *PROMPTS]]
    if len(set(seqs)) != len(seqs):
        raise RuntimeError("two prompts share a token sequence")
    # CLIP's unknown token is <|endoftext|>: it must not appear inside a prompt's own ids
    unk = tok.unk_token_id
    if any(unk in tok(p, add_special_tokens=False).input_ids for p in PROMPTS):
        raise RuntimeError("a prompt contains an unknown token")
    if max(len(s) for s in seqs) > tok.model_max_length:
        raise RuntimeError("a prompt is longer than model_max_length")
