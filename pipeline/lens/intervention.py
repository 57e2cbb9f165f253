"""Training-free intervention (SPEC "Training-free intervention"): key-column logit scaling.

On the chosen decoder layers the pre-softmax logits are rescaled per key column,
``Z' = Z * (1 + a_img)`` on image keys and ``Z * (1 - a_sys)`` on system keys (other keys
unchanged), for query rows after the image. Usage::

    with key_column_scaling(model, spans.image, spans.system, a_img=0.15, a_sys=0.05):
        out = model.generate(**inputs, max_new_tokens=256)

"After the image" means positions after the sample's last image token; rows up to and
including it (system prompt, image tokens) are untouched, and a sample without image tokens is
not changed at all. Every decoding step's query row is after the image, so the scaling applies
to everything generated. Scaling logit column ``j`` equals scaling key vector ``k_j``; the KV
cache keeps the original keys, the scaling happens inside attention (see
:class:`KeyColumnScale`). With ``a_img = a_sys = 0`` the model's outputs are
bitwise those of the SDPA model. It composes with the lens: a capture taken inside the block
measures the intervened attention.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pipeline.lens.modules import decoder_attention_modules, resolve_layers, scaling_keys

NEVER = torch.iinfo(torch.long).max


@dataclass
class InterventionConfig:
    """Settings of the key-column logit scaling."""

    a_img: float = field(default=0.15, metadata={
        "help": "Image-key logits are multiplied by 1 + a_img (paper: 0.15)."})
    a_sys: float = field(default=0.05, metadata={
        "help": "System-key logits are multiplied by 1 - a_sys (paper grid: 0, 0.05, 0.40, 0.60)."})
    layers: list[int] | None = field(default=None, metadata={
        "help": "Decoder layer indices to intervene on (negative from the end); null = all layers."})

    def __post_init__(self):
        if not self.a_img > -1:
            raise ValueError(f"a_img must be > -1 (the image logit factor 1 + a_img must stay positive), got {self.a_img}")
        if not self.a_sys < 1:
            raise ValueError(f"a_sys must be < 1 (the system logit factor 1 - a_sys must stay positive), got {self.a_sys}")


@dataclass
class KeyColumnScale:
    """Multiply pre-softmax logits of key column ``j`` by ``factor[b, j]`` on rows at or after
    ``row_start[b]`` (absolute positions; keys beyond ``factor``'s length keep factor 1).

    Installed on attention modules by :func:`pipeline.lens.scaling_keys`; a capturing lens runs
    its one-call attention through :meth:`rows_of`, so it measures the scaled attention exactly.
    Query positions are ``kv_len - q_len + i``, true for prefill and for decoding with a dynamic
    cache.
    """

    factor: torch.Tensor  # [B, L0] float32
    row_start: torch.Tensor  # [B] long

    def key_factor(self, kv_len: int, device, dtype) -> torch.Tensor:
        factor = self.factor.to(device=device, dtype=dtype)
        if factor.shape[1] >= kv_len:
            return factor[:, :kv_len]
        ones = torch.ones(factor.shape[0], kv_len - factor.shape[1], device=device, dtype=dtype)
        return torch.cat([factor, ones], dim=1)

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, n]``: which of these absolute query positions (``[B, n]``) are scaled."""
        return positions >= self.row_start.to(positions.device)[:, None]

    def rows_of(self, query, key, attend, index: torch.Tensor | None = None):
        """``attend(keys) -> (output [B, q, H, d], masses [B, H, Q, n] or None)`` with the keys
        scaled on the scaled rows and as they are on the others (scaling logit column j = scaling
        key k_j); one call when every row is scaled (decoding), two otherwise (a prefill).
        ``index`` ``[B, Q]``: the query rows the masses are of."""
        q_len, kv_len = query.shape[2], key.shape[2]
        positions = torch.arange(kv_len - q_len, kv_len, device=query.device).expand(query.shape[0], -1)
        rows = self.rows(positions)  # [B, q_len]
        factor = self.key_factor(kv_len, key.device, key.dtype)
        scaled = attend(key * factor[:, None, :, None])
        if bool(rows.all()):
            return scaled
        plain = attend(key)
        out = torch.where(rows[:, :, None, None], scaled[0], plain[0])
        if scaled[1] is None:
            return out, None
        picked = rows.gather(1, index)[:, None, :, None]  # which captured rows are scaled
        return out, torch.where(picked, scaled[1], plain[1])

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        """The layer output under the scaling (SDPA), for layers no lens is capturing."""
        def attend(keys):
            return sdpa_attention_forward(module, query, keys, value, attention_mask, **kwargs)[0], None
        return self.rows_of(query, key, attend)[0], None


def rows_after_image(image_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` first position after each sample's last image token (never for no image)."""
    length = image_mask.shape[1]
    positions = torch.arange(length, device=image_mask.device).expand_as(image_mask)
    last = torch.where(image_mask, positions, -1).max(dim=1).values
    return torch.where(last >= 0, last + 1, torch.full_like(last, NEVER))


def key_factors(image_mask: torch.Tensor, system_mask: torch.Tensor, a_img: float, a_sys: float) -> torch.Tensor:
    """``[B, L]`` logit factor per key column: ``1 + a_img`` on I, ``1 - a_sys`` on S, else 1."""
    if bool((image_mask & system_mask).any()):
        raise ValueError("image_mask and system_mask overlap; a key is either an image or a system token")
    factor = torch.ones(image_mask.shape, dtype=torch.float32, device=image_mask.device)
    factor = torch.where(image_mask, torch.tensor(1.0 + a_img), factor)
    return torch.where(system_mask, torch.tensor(1.0 - a_sys), factor)


@contextmanager
def key_column_scaling(model: nn.Module, image_mask: torch.Tensor, system_mask: torch.Tensor,
                       a_img: float = 0.15, a_sys: float = 0.05,
                       layers: Sequence[int] | None = None) -> Iterator[None]:
    """Apply the intervention to ``model`` inside the block (forward or ``generate``).

    ``image_mask``/``system_mask`` are bool ``[B, L]`` over the prompt batch as passed to the
    model (same padding); keys beyond ``L`` (generated tokens) are neither. Decoding must use a
    dynamic KV cache (``generate``'s default) so query positions are ``kv_len - q_len + i``.
    """
    config = InterventionConfig(a_img=a_img, a_sys=a_sys, layers=list(layers) if layers is not None else None)
    for name, mask in (("image_mask", image_mask), ("system_mask", system_mask)):
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError(f"{name} must be a bool [batch, seq_len] tensor")
    if image_mask.shape != system_mask.shape:
        raise ValueError(f"image_mask {tuple(image_mask.shape)} and system_mask {tuple(system_mask.shape)} differ in shape")
    image_mask, system_mask = image_mask.bool(), system_mask.bool()
    patch = KeyColumnScale(key_factors(image_mask, system_mask, config.a_img, config.a_sys),
                           rows_after_image(image_mask))
    modules = resolve_layers(decoder_attention_modules(model), config.layers)
    with scaling_keys(modules, patch):
        yield


@contextmanager
def intervene(model: nn.Module, image_mask: torch.Tensor, system_mask: torch.Tensor,
              config: InterventionConfig) -> Iterator[None]:
    """:func:`key_column_scaling` with settings from an :class:`InterventionConfig`."""
    with key_column_scaling(model, image_mask, system_mask, config.a_img, config.a_sys, config.layers):
        yield
