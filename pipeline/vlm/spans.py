"""Token spans of chat samples (SPEC "Token spans"), found from token ids only.

Given the ids a Qwen-VL style chat template produced, :func:`compute_spans` returns, per token,
which span it belongs to. Spans are pairwise disjoint and computed with a few vectorised torch
ops (it runs on every training step); they never look at characters.

A turn is ``<|im_start|>ROLE\\n CONTENT <|im_end|>\\n``. Span membership, precisely:

=============  ===========================================================================
``system``     S: the CONTENT tokens of system turns ("You are a helpful assistant.").
               Header, ``<|im_end|>`` and the newline after it are not in S, so the first
               token of the sequence (``<|im_start|>``, an attention sink) never counts as
               system. A sample without a system turn, or with an empty one, has S empty.
``image``      I: the ``<|image_pad|>`` tokens only, of every image, wherever they are.
``user``       U: the CONTENT tokens of user turns minus vision tokens (``<|image_pad|>``,
               ``<|video_pad|>``, ``<|vision_start|>``, ``<|vision_end|>``).
``response``   R: the CONTENT tokens of assistant turns plus each turn's closing
               ``<|im_end|>`` - exactly the tokens an assistant-only LM loss trains on
               (the ``{% generation %}`` region of ``prompts/chat_templates/qwen2_vl.jinja``).
               A bare generation prompt (``<|im_start|>assistant\\n``) contributes nothing.
=============  ===========================================================================

The header is ``<|im_start|>``, the role name's tokens and one newline token; if CONTENT
starts with newlines the tokenizer may merge them into that token, which then still counts
as header. Multi-turn: U and R cover all user/assistant turns; ``last_response`` is the R of
the last assistant turn that has any R tokens; ``turn`` and ``role`` give per-token turn
index and role code for finer per-turn reductions. Padding (``attention_mask == 0``, left or
right) belongs to no span and has ``turn == -1``; without a mask every token counts.
Turns with an unknown role (e.g. ``tool``) get ``role == ROLE_OTHER`` and belong to no span.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields
from typing import Any

import torch

ROLE_NONE, ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_OTHER = 0, 1, 2, 3, 4
ROLE_CODES = {"system": ROLE_SYSTEM, "user": ROLE_USER, "assistant": ROLE_ASSISTANT}

# Byte-level BPE (GPT-2/Qwen) spells "\n" as "Ċ", space "Ġ", tab "ĉ", "\r" "č", \v "ċ", \f "Č".
_BYTE_LEVEL_WHITESPACE = frozenset("ĊĠĉčċČ")


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids that delimit chat turns and images (Qwen-VL naming)."""

    im_start: int
    im_end: int
    image_pad: int
    vision_start: int
    vision_end: int
    video_pad: int | None
    pad: int | None
    role_headers: tuple[tuple[str, tuple[int, ...]], ...]  # (role, ids of the role name)
    newline_ids: frozenset[int]  # tokens that may close a turn header

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokens:
        """Read the ids from a tokenizer (or a processor holding one); cached per tokenizer."""
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        try:
            return _CACHE[tokenizer]
        except (KeyError, TypeError):
            pass
        special = cls._build(tokenizer)
        try:
            _CACHE[tokenizer] = special
        except TypeError:  # not weak-referenceable: just don't cache
            pass
        return special

    @classmethod
    def _build(cls, tokenizer: Any) -> SpecialTokens:
        vocab = tokenizer.get_vocab()

        def required(token: str) -> int:
            if token not in vocab:
                raise ValueError(f"tokenizer {type(tokenizer).__name__} has no special token "
                                 f"{token!r}: not a Qwen-VL style chat tokenizer")
            return vocab[token]

        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        newline = encode("\n")
        if len(newline) != 1:
            raise ValueError(f"tokenizer encodes '\\n' as {len(newline)} tokens; expected 1")
        newline_ids = {newline[0]} | {i for t, i in vocab.items()
                                      if "Ċ" in t and set(t) <= _BYTE_LEVEL_WHITESPACE}
        return cls(im_start=required("<|im_start|>"), im_end=required("<|im_end|>"),
                   image_pad=required("<|image_pad|>"), vision_start=required("<|vision_start|>"),
                   vision_end=required("<|vision_end|>"), video_pad=vocab.get("<|video_pad|>"),
                   pad=tokenizer.pad_token_id,
                   role_headers=tuple((role, encode(role)) for role in ROLE_CODES),
                   newline_ids=frozenset(newline_ids))

    @property
    def vision_ids(self) -> tuple[int, ...]:
        ids = (self.image_pad, self.vision_start, self.vision_end, self.video_pad)
        return tuple(i for i in ids if i is not None)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Spans:
    """Boolean masks ``[B, L]`` (see the module docstring) plus per-token turn info."""

    system: torch.Tensor
    image: torch.Tensor
    user: torch.Tensor
    response: torch.Tensor
    last_response: torch.Tensor
    role: torch.Tensor  # int8 [B, L]: ROLE_* code of the turn a token is in (ROLE_NONE outside)
    turn: torch.Tensor  # long [B, L]: 0-based turn index (count of <|im_start|>), -1 outside

    def counts(self) -> dict[str, torch.Tensor]:
        """Tokens per span and sample: ``{"system": [B], "image": [B], ...}``."""
        return {name: getattr(self, name).sum(dim=1) for name in _MASKS}

    def row(self, i: int) -> Spans:
        """Sample ``i`` as a batch of one."""
        return Spans(**{f.name: getattr(self, f.name)[i:i + 1] for f in fields(self)})

    def to(self, device: torch.device | str) -> Spans:
        return Spans(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


_MASKS = ("system", "image", "user", "response", "last_response")


def compute_spans(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  special: SpecialTokens | Any) -> Spans:
    """Spans of a batch of chat-template token ids ``[B, L]`` (a 1-D sequence is a batch of 1).

    ``special`` is a :class:`SpecialTokens` or a tokenizer/processor to read it from.
    """
    if not isinstance(special, SpecialTokens):
        special = SpecialTokens.from_tokenizer(special)
    ids = _as_batch(input_ids, "input_ids")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    batch, length = ids.shape
    if attention_mask is None:
        valid = torch.ones_like(ids, dtype=torch.bool)
    else:
        valid = _as_batch(attention_mask, "attention_mask").bool()
        if valid.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(valid.shape)} != input_ids shape "
                             f"{tuple(ids.shape)}")
    ids = ids.masked_fill(~valid, -1)  # padding then matches no special id
    pos = torch.arange(length, device=ids.device).expand(batch, length)

    is_start = ids == special.im_start
    last_start = torch.where(is_start, pos, -1).cummax(dim=1).values  # -1 before first turn
    in_turn = valid & (last_start >= 0)
    turn = torch.where(in_turn, is_start.long().cumsum(dim=1) - 1, -1)

    # Role and header length, decided at each <|im_start|> and broadcast to its turn.
    role_at, header_at = _roles_at_starts(ids, is_start, special)
    start_idx = last_start.clamp(min=0)
    role = torch.where(in_turn, role_at.gather(1, start_idx), ROLE_NONE)
    header_len = header_at.gather(1, start_idx)
    in_header = (pos - last_start) < header_len

    # A turn's content ends at its first <|im_end|>; what follows (the "\n") is no span's.
    is_end = ids == special.im_end
    ends = is_end.long().cumsum(dim=1)
    ended_before = (ends - is_end.long()) > ends.gather(1, start_idx)
    body = in_turn & ~in_header & ~ended_before
    content = body & ~is_end
    closing_end = body & is_end

    vision = torch.isin(ids, torch.tensor(special.vision_ids, device=ids.device))
    system = content & ~vision & (role == ROLE_SYSTEM)
    user = content & ~vision & (role == ROLE_USER)
    response = (content & ~vision | closing_end) & (role == ROLE_ASSISTANT)
    image = valid & (ids == special.image_pad)

    last_turn = torch.where(response, turn, -1).max(dim=1, keepdim=True).values
    last_response = response & (turn == last_turn)
    return Spans(system=system, image=image, user=user, response=response,
                 last_response=last_response, role=role.to(torch.int8), turn=turn)


def _roles_at_starts(ids: torch.Tensor, is_start: torch.Tensor, special: SpecialTokens
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Role code and header length (in tokens) at every ``<|im_start|>`` position.

    A header is ``<|im_start|>`` + the role name's ids + one newline token. A start whose
    following ids match no known header is ROLE_OTHER with a header of just ``<|im_start|>``.
    """
    longest = max(len(h) for _, h in special.role_headers) + 1
    padded = torch.nn.functional.pad(ids, (0, longest + 1), value=-1)
    length = ids.shape[1]
    newline = torch.tensor(sorted(special.newline_ids), device=ids.device)
    role_at = torch.where(is_start, ROLE_OTHER, ROLE_NONE)
    header_at = torch.ones_like(ids)
    for name, header in special.role_headers:
        match = is_start.clone()
        for k, token in enumerate(header):
            match &= padded[:, 1 + k:1 + k + length] == token
        after = len(header) + 1
        match &= torch.isin(padded[:, after:after + length], newline)
        role_at = torch.where(match, ROLE_CODES[name], role_at)
        header_at = torch.where(match, after + 1, header_at)
    return role_at, header_at


def _as_batch(tensor: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(tensor)
    if tensor.dim() == 1:
        return tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be [batch, length] or [length], got shape "
                         f"{tuple(tensor.shape)}")
    return tensor
