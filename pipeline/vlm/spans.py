"""Token spans of chat samples (SPEC "Token spans"), found from token ids only.

Given the ids a chat template produced, :func:`compute_spans` returns, per token, which span it
belongs to. Spans are pairwise disjoint and computed with a few vectorised torch ops (it runs on
every training step); they never look at characters. The turn delimiters of each family are a
:class:`ChatFormat` (:data:`QWEN_CHAT` for Qwen2-VL / Qwen2.5-VL / Qwen3-VL, :data:`GEMMA_CHAT`
for Gemma 3); :meth:`SpecialTokens.from_tokenizer` picks the one whose tokens the vocabulary has.

A turn is ``START ROLE\\n CONTENT END\\n`` (Qwen: ``<|im_start|>``/``<|im_end|>``, Gemma:
``<start_of_turn>``/``<end_of_turn>`` with the assistant role spelled ``model``). Span
membership, precisely:

=============  ===========================================================================
``system``     S: the CONTENT tokens of system turns ("You are a helpful assistant.").
               Header, END and the newline after it are not in S, so the first token of the
               sequence (an attention sink) never counts as system. A sample without a system
               turn, or with an empty one, has S empty. Families whose template folds the system
               prompt into the first user turn (Gemma 3: ``PROMPT\\n\\n`` + user content) have
               ``folded_system``: S is the first user turn's text before its first blank line
               (a token with two newlines, or two newline tokens in a row) or first image,
               whitespace tokens excluded, and empty without a blank line. That reading is only
               right when a system prompt was rendered, which is why the project always writes
               one (:func:`pipeline.vlm.inputs.with_system_prompt`) and refuses prompts holding
               a blank line for such families.
``image``      I: the image placeholder tokens only (``<|image_pad|>``, ``<image_soft_token>``),
               of every image, wherever they are.
``user``       U: the CONTENT tokens of user turns minus vision tokens (image placeholders,
               video pads, image start/end markers) and minus a folded S.
``response``   R: the CONTENT tokens of assistant turns plus each turn's closing END - exactly
               the tokens an assistant-only LM loss trains on (the ``{% generation %}`` region
               of ``prompts/chat_templates/*.jinja``). A bare generation prompt
               (``START assistant\\n``) contributes nothing.
=============  ===========================================================================

The header is START, the role name's tokens and one newline token; if CONTENT starts with
newlines the tokenizer may merge them into that token, which then still counts as header.
Multi-turn: U and R cover all user/assistant turns; ``last_response`` is the R of the last
assistant turn that has any R tokens; ``turn`` and ``role`` give per-token turn index and role
code for finer per-turn reductions. Padding (``attention_mask == 0``, left or right) belongs to
no span and has ``turn == -1``; without a mask every token counts. Turns with an unknown role
(e.g. ``tool``) get ``role == ROLE_OTHER`` and belong to no span.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields
from typing import Any

import torch

ROLE_NONE, ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_OTHER = 0, 1, 2, 3, 4
ROLE_CODES = {"system": ROLE_SYSTEM, "user": ROLE_USER, "assistant": ROLE_ASSISTANT}

# Whitespace as vocabulary strings: byte-level BPE (GPT-2/Qwen) spells "\n" as "Ċ", space "Ġ",
# tab "ĉ", "\r" "č", \v "ċ", \f "Č"; SentencePiece (Gemma) keeps "\n" and spells space "▁".
_WHITESPACE_PIECES = frozenset("ĊĠĉčċČ▁ \t\r\n\v\f")


@dataclass(frozen=True)
class ChatFormat:
    """The token strings that delimit a family's chat turns and images."""

    name: str
    turn_start: str
    turn_end: str
    image_token: str
    vision_tokens: tuple[str, ...]  # image start/end markers, video pads: in no text span
    role_names: tuple[tuple[str, str], ...]  # (our role, the template's spelling)
    folded_system: bool = False  # the template writes the system prompt into the first user turn


QWEN_CHAT = ChatFormat(
    name="qwen", turn_start="<|im_start|>", turn_end="<|im_end|>", image_token="<|image_pad|>",
    vision_tokens=("<|vision_start|>", "<|vision_end|>", "<|video_pad|>"),
    role_names=(("system", "system"), ("user", "user"), ("assistant", "assistant")))
GEMMA_CHAT = ChatFormat(
    name="gemma", turn_start="<start_of_turn>", turn_end="<end_of_turn>",
    image_token="<image_soft_token>", vision_tokens=("<start_of_image>", "<end_of_image>"),
    role_names=(("user", "user"), ("assistant", "model")), folded_system=True)
CHAT_FORMATS = (QWEN_CHAT, GEMMA_CHAT)


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids that delimit chat turns and images. The names are Qwen's: ``im_start`` /
    ``im_end`` are the turn start / end of any :class:`ChatFormat`, ``image_pad`` its image
    placeholder, ``vision_start`` / ``vision_end`` the markers around an image."""

    im_start: int
    im_end: int
    image_pad: int
    vision_start: int
    vision_end: int
    video_pad: int | None
    pad: int | None
    role_headers: tuple[tuple[str, tuple[int, ...]], ...]  # (role, ids of the role name)
    newline_ids: frozenset[int]  # whitespace tokens holding a newline (may close a turn header)
    # For folded system prompts (see _folded_system): whitespace tokens holding a blank line,
    # text tokens ending in one (byte-level BPE merges ".\n\n"), tokens ending / starting with "\n".
    blank_ids: frozenset[int] = frozenset()
    text_blank_ids: frozenset[int] = frozenset()
    ends_newline_ids: frozenset[int] = frozenset()
    starts_newline_ids: frozenset[int] = frozenset()
    folded_system: bool = False
    format_name: str = QWEN_CHAT.name

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, chat_format: ChatFormat | None = None) -> SpecialTokens:
        """Read the ids from a tokenizer (or a processor holding one); cached per tokenizer.
        Without ``chat_format``, the first of :data:`CHAT_FORMATS` the vocabulary has."""
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        try:
            cached = _CACHE[tokenizer]
            if chat_format is None or cached.format_name == chat_format.name:
                return cached
        except (KeyError, TypeError):
            pass
        special = cls._build(tokenizer, chat_format)
        try:
            _CACHE[tokenizer] = special
        except TypeError:  # not weak-referenceable: just don't cache
            pass
        return special

    @classmethod
    def _build(cls, tokenizer: Any, chat_format: ChatFormat | None) -> SpecialTokens:
        vocab = tokenizer.get_vocab()
        if chat_format is None:
            chat_format = next((f for f in CHAT_FORMATS
                                if f.turn_start in vocab and f.image_token in vocab), None)
            if chat_format is None:
                raise ValueError(f"tokenizer {type(tokenizer).__name__} has the turn and image tokens "
                                 f"of no supported chat format: not a VLM chat tokenizer (formats: "
                                 + "; ".join(f"{f.name}: {f.turn_start}, {f.image_token}"
                                             for f in CHAT_FORMATS) + ")")

        def required(token: str) -> int:
            if token not in vocab:
                raise ValueError(f"tokenizer {type(tokenizer).__name__} has no special token "
                                 f"{token!r}: not a {chat_format.name} chat tokenizer")
            return vocab[token]

        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        newline = encode("\n")
        if len(newline) != 1:
            raise ValueError(f"tokenizer encodes '\\n' as {len(newline)} tokens; expected 1")
        newline_ids = {i for t, i in vocab.items()
                       if set(t) <= _WHITESPACE_PIECES and ("Ċ" in t or "\n" in t)} | {newline[0]}
        folded = {}
        if chat_format.folded_system:
            text = {i: t.replace("Ċ", "\n") for t, i in vocab.items()}
            only_newlines = {i: "".join(c for c in text[i] if c in "\n\r") for i in newline_ids}
            folded = {
                "blank_ids": frozenset(i for i, t in only_newlines.items() if "\n\n" in t.replace("\r", "")),
                "text_blank_ids": frozenset(i for i, t in text.items()
                                            if t.endswith("\n\n") and i not in newline_ids),
                "ends_newline_ids": frozenset(i for i, t in text.items() if t.endswith("\n")),
                "starts_newline_ids": frozenset(i for i, t in text.items() if t.startswith("\n"))}
        start_marker, end_marker = chat_format.vision_tokens[:2]
        return cls(im_start=required(chat_format.turn_start), im_end=required(chat_format.turn_end),
                   image_pad=required(chat_format.image_token), vision_start=required(start_marker),
                   vision_end=required(end_marker),
                   video_pad=next((vocab[t] for t in chat_format.vision_tokens[2:] if t in vocab), None),
                   pad=tokenizer.pad_token_id,
                   role_headers=tuple((role, encode(spelled)) for role, spelled in chat_format.role_names),
                   newline_ids=frozenset(newline_ids), folded_system=chat_format.folded_system,
                   format_name=chat_format.name, **folded)

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
    folded = _folded_system(ids, content, role, turn, special) if special.folded_system else \
        torch.zeros_like(content)
    system = content & ~vision & ((role == ROLE_SYSTEM) | folded)
    user = content & ~vision & (role == ROLE_USER) & ~folded
    response = (content & ~vision | closing_end) & (role == ROLE_ASSISTANT)
    image = valid & (ids == special.image_pad)

    last_turn = torch.where(response, turn, -1).max(dim=1, keepdim=True).values
    last_response = response & (turn == last_turn)
    return Spans(system=system, image=image, user=user, response=response,
                 last_response=last_response, role=role.to(torch.int8), turn=turn)


def _folded_system(ids: torch.Tensor, content: torch.Tensor, role: torch.Tensor, turn: torch.Tensor,
                   special: SpecialTokens) -> torch.Tensor:
    """The first user turn's content before its first blank line (a folded system prompt).

    The blank line is cut where it starts: a whitespace token holding one is not S, a text token
    ending in one (".\\n\\n") still is, and so is a text token ending in a newline that the
    next token continues. S also ends at the turn's first vision token (the template writes the
    prompt before all content) and holds no whitespace-only token. Without any blank line
    nothing was folded in."""
    def member(id_set: frozenset[int]) -> torch.Tensor:
        return torch.isin(ids, torch.tensor(sorted(id_set) or [-2], device=ids.device))

    first_user_turn = torch.where(role == ROLE_USER, turn, torch.iinfo(turn.dtype).max).min(
        dim=1, keepdim=True).values
    in_first = content & (role == ROLE_USER) & (turn == first_user_turn)
    whitespace = member(special.newline_ids)
    next_starts = torch.nn.functional.pad(member(special.starts_newline_ids)[:, 1:], (0, 1), value=False)
    pair = member(special.ends_newline_ids) & next_starts  # a blank line across two tokens
    cut_here = member(special.blank_ids) | (pair & whitespace)
    cut_after = member(special.text_blank_ids) | (pair & ~whitespace)
    vision = member(frozenset(special.vision_ids))  # the prompt precedes the turn's first image
    cut = in_first & (cut_here | vision | torch.nn.functional.pad(cut_after[:, :-1], (1, 0), value=False))
    blank_found = (in_first & (cut_here | cut_after)).any(dim=1, keepdim=True)
    return in_first & ~whitespace & (cut.long().cumsum(dim=1) == 0) & blank_found


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
