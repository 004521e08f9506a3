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


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word: merge the adjacent pair of lowest rank until none applies."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i)
                 for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def _vocab_and_merges(words=None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab (token -> id) and BPE merges that make every word of ``words`` (default
    :data:`WORDS`) one token: each word's merges join, left to right, the pieces the merges
    before it already make of the word (appended merges rank below every earlier one, so they
    never split an earlier word; for the digits words this is the plain left-to-right chain)."""
    vocab: dict[str, int] = {}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in WORDS if words is None else words:
        symbols = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
        cur = symbols[0]
        for s in symbols[1:]:
            if (cur, s) not in ranks:
                ranks[(cur, s)] = len(merges)
                merges.append((cur, s))
            cur += s
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_tokenizer_files(folder: str, words=None) -> tuple[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` (for ``words``, default :data:`WORDS`) into
    ``folder``; returns their paths."""
    vocab, merges = _vocab_and_merges(words)
    os.makedirs(folder, exist_ok=True)
    vpath, mpath = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vpath, "w") as f:
        json.dump(vocab, f)
    with open(mpath, "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vpath, mpath


def build_tokenizer(max_length: int = MAX_LENGTH, words=None, prompts=None):
    """A ``CLIPTokenizer`` over the local vocab of ``words`` (default the digits' :data:`WORDS`;
    pad = ``<|endoftext|>``), checked by :func:`check_tokenizer` on ``prompts`` (default the
    digits prompts and the empty prompt)."""
    from transformers import CLIPTokenizer

    vpath, mpath = write_tokenizer_files(tempfile.mkdtemp(prefix="embedded-tok-"), words)
    tok = CLIPTokenizer(vpath, mpath, model_max_length=max_length, pad_token="<|endoftext|>")
    check_tokenizer(tok, words, prompts)
    return tok


def check_tokenizer(tok, words=None, prompts=None) -> None:
    """Raise if a word of ``words`` is not one token, ids repeat across ``prompts``, or an
    unknown appears (defaults: the digits model's words and prompts)."""
    vocab = tok.get_vocab()
    words = WORDS if words is None else words
    prompts = [EMPTY_PROMPT, *PROMPTS] if prompts is None else list(prompts)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        if ids != [vocab[w + "</w>"]]:
            raise RuntimeError(f"word {w!r} tokenized to {tok.convert_ids_to_tokens(ids)}")
    seqs = [tuple(tok(p).input_ids) for p in prompts]
    if len(set(seqs)) != len(seqs):
        raise RuntimeError("two prompts share a token sequence")
    # CLIP's unknown token is <|endoftext|>: it must not appear inside a prompt's own ids
    unk = tok.unk_token_id
    if any(unk in tok(p, add_special_tokens=False).input_ids for p in prompts if p):
        raise RuntimeError("a prompt contains an unknown token")
    if max(len(s) for s in seqs) > tok.model_max_length:
        raise RuntimeError("a prompt is longer than model_max_length")
