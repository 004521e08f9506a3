"""Differentiable access to a model's prompt encoder, for attacks that optimise token embeddings.

An attack needs three things a :class:`~spare_core.denoiser.Denoiser` does not offer (its
``encode`` is frozen text in, context out):

- ``table()``: the token embedding table ``[V, D]`` and the ids a prompt may use ``[A]`` (whole
  words: :func:`whole_word_ids`);
- ``encode(prefix, prompts)``: the context ``[P, L, D]`` of each prompt with ``k`` free token
  embeddings ``prefix`` ``[P, k, D]`` inserted after the start token, differentiable in
  ``prefix``;
- ``text(ids)``: the words of token ids (so a found prefix becomes a prompt anyone can type);
- ``token_ids(text)``: a prompt's token ids (no start/end token) and ``end_id``, the end/pad
  token (adversarial training swaps the concept's tokens in a prefix for the surrogate's).

:class:`CLIPPromptAccess` does this for one CLIP text encoder (SD1.x/SD2.x, the embedded
models) with a forward hook on the input embedding module, which leaves the encoder's code and
weights untouched; the ComfyUI bridge gives its own for ComfyUI's CLIP. Families with several
text encoders (SDXL, SD3, Flux) are refused by :func:`prompt_access`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn


class PromptAccess(Protocol):
    def table(self) -> tuple[Tensor, Tensor]: ...

    def encode(self, prefix: Tensor, prompts: Sequence[str]) -> Tensor: ...

    def text(self, ids: Sequence[int]) -> str: ...

    def token_ids(self, text: str) -> list[int]: ...

    end_id: int


@contextmanager
def prefix_injected(embedding: nn.Module, prefix: Tensor, start: int = 1,
                    placeholder_id: int | None = None) -> Iterator[None]:
    """While open, ``embedding``'s output ``[P, L, D]`` has rows ``start : start + k`` replaced by
    ``prefix`` ``[P, k, D]`` (or ``[1, k, D]``, broadcast); gradients flow into ``prefix``. With
    ``placeholder_id``, only the rows whose input ids there are all that id are changed (a text
    stack that also embeds other rows, such as ComfyUI's empty prompt for weighted prompts)."""
    k = prefix.shape[1]

    def hook(_module, args, out: Tensor) -> Tensor:
        rows = (slice(None) if placeholder_id is None
                else (args[0][:, start:start + k] == placeholder_id).all(-1))
        n = out.shape[0] if placeholder_id is None else int(rows.sum())
        if n == 0:
            return out
        out = out.clone()
        out[rows, start:start + k] = prefix.to(out.device, out.dtype).expand(n, -1, -1)
        return out

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def with_placeholders(ids: Tensor, k: int, lengths: Tensor, max_length: int) -> Tensor:
    """Token ids ``[P, L]`` (start token first) with ``k`` placeholder ids inserted after the
    start token (the start id; the hook overwrites their embeddings), cut back to
    ``max_length``; ValueError when a prompt (``lengths`` tokens with start and end) would lose
    tokens."""
    longest = int(lengths.max())
    if longest + k > max_length:
        raise ValueError(f"a prompt of {longest} tokens plus {k} attack tokens exceeds the text "
                         f"encoder's {max_length} positions: use fewer attack tokens or a "
                         "shorter prompt")
    ph = ids[:, :1].expand(-1, k)
    return torch.cat([ids[:, :1], ph, ids[:, 1:]], 1)[:, :max_length]


def whole_word_ids(tokenizer, vocab_size: int) -> Tensor:
    """Ids ``[A]`` of a CLIP BPE vocabulary that end a word (``"...</w>"``), special tokens left
    out. Only these are offered to the attack: a prefix of word pieces would decode to text
    (``"handwri" + "three"`` -> ``"handwrithree"``) that tokenizes to other ids, so the found
    prompt would not be the prompt that was attacked."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    return torch.tensor([i for i, t in enumerate(tokens)
                         if i not in special and t is not None and t.endswith("</w>")])


class CLIPPromptAccess:
    """:class:`PromptAccess` over a transformers ``CLIPTokenizer`` + ``CLIPTextModel``."""

    def __init__(self, tokenizer, text_encoder: nn.Module) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    def table(self) -> tuple[Tensor, Tensor]:
        weight = self.text_encoder.get_input_embeddings().weight.detach()
        return weight, whole_word_ids(self.tokenizer, weight.shape[0])

    def encode(self, prefix: Tensor, prompts: Sequence[str]) -> Tensor:
        tok = self.tokenizer
        max_length = tok.model_max_length
        enc = tok(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="pt", return_attention_mask=True)
        ids = with_placeholders(enc.input_ids, prefix.shape[1], enc.attention_mask.sum(1),
                                max_length)
        dev = next(self.text_encoder.parameters()).device
        with prefix_injected(self.text_encoder.get_input_embeddings(), prefix):
            return self.text_encoder(ids.to(dev))[0]

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids]).strip()

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    @property
    def end_id(self) -> int:
        return int(self.tokenizer.eos_token_id)


def prompt_access(denoiser) -> PromptAccess:
    """The :class:`PromptAccess` of ``denoiser``: its own ``prompt_access()`` where it has one
    (the ComfyUI bridge), a :class:`CLIPPromptAccess` for one-CLIP diffusers backends (SD1.x,
    SD2.x, the embedded digits and canvas models); ValueError naming them otherwise."""
    own = getattr(denoiser, "prompt_access", None)
    if own is not None:
        return own()
    from ..denoiser import DiffusersDenoiser

    if type(denoiser) is DiffusersDenoiser and denoiser.text_encoder is not None:
        return CLIPPromptAccess(denoiser.tokenizer, denoiser.text_encoder)
    raise ValueError(f"the prompt attack needs one CLIP text encoder (SD1.x, SD2.x, the embedded "
                     f"digits and canvas models); {type(denoiser).__name__} has another text "
                     "stack. Probe it with paraphrases instead.")
