"""What the lens records of one forward pass (:class:`Capture`) and how to ask for it
(:class:`AttentionLens`); see :mod:`pipeline.lens` for the method."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from pipeline.lens.mass import KeyLayout, KeySetMass, Rows, compact, masses_from_lse
from pipeline.lens.modules import (
    LENS_ATTR,
    decoder_attention_modules,
    patched_attention,
    resolve_layers,
)

DEFAULT_CHUNK_BYTES = 64 * 2**20


@dataclass
class Capture:
    """Per-query attention masses of one forward pass (filled by :meth:`AttentionLens.capture`).

    ``masses`` is float32 ``[n_layers, B, H, Qmax, n_sets]``; query ``j`` of sample ``b`` is
    sequence position ``query_index[b, j]`` where ``query_valid[b, j]`` (padding slots hold 0).
    Set names are ``set_names`` (the keyword names given to ``capture``, plus ``"total"``: the mass
    on all allowed keys, 1 up to rounding).
    """

    layers: list[int]
    query_mask: torch.Tensor
    key_masks: dict[str, torch.Tensor]
    query_index: torch.Tensor
    query_valid: torch.Tensor
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    kernel_lse: bool = True
    _by_layer: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _layouts: dict[tuple, SharedLayout] = field(default_factory=dict, repr=False)

    @property
    def set_names(self) -> list[str]:
        return [*self.key_masks, "total"]

    @property
    def masses(self) -> torch.Tensor:
        missing = [layer for layer in self.layers if layer not in self._by_layer]
        if missing:
            raise RuntimeError(f"no attention was observed for layers {missing}: run exactly one forward "
                               "pass of the model inside the capture block")
        device = self._by_layer[self.layers[0]].device  # layers may sit on several devices
        return torch.stack([self._by_layer[layer].to(device) for layer in self.layers])

    def mass(self, name: str) -> torch.Tensor:
        """``[n_layers, B, H, Qmax]`` mass on key set ``name`` (0 at padding query slots)."""
        if name not in self.set_names:
            raise KeyError(f"unknown key set {name!r}; captured {self.set_names}")
        return self.masses[..., self.set_names.index(name)]

    @property
    def image(self) -> torch.Tensor:
        return self.mass("image")

    @property
    def system(self) -> torch.Tensor:
        return self.mass("system")

    @property
    def total(self) -> torch.Tensor:
        return self.mass("total")

    def dense(self, name: str) -> torch.Tensor:
        """``[n_layers, B, H, L]`` per-position masses, zero outside the query mask."""
        compact = self.mass(name)
        n_layers, batch, heads, _ = compact.shape
        out = compact.new_zeros(n_layers, batch, heads, self.query_mask.shape[1])
        index = self.query_index.to(compact.device)[None, :, None, :].expand_as(compact)
        return out.scatter_add(-1, index, compact * self.query_valid.to(compact.device)[None, :, None, :])

    def restricted(self, query_mask: torch.Tensor) -> Capture:
        """The same forward pass seen from a subset of its queries: a capture of ``U | R`` gives
        the views of ``U`` and of ``R`` (``query_mask`` must select captured queries only). The
        masses are shared, not copied; only which query slots count changes."""
        mask = _bool_mask("query_mask", query_mask, self.query_mask.shape).to(self.query_mask.device)
        if bool((mask & ~self.query_mask).any()):
            raise ValueError("restricted(): the mask selects queries that were not captured")
        index = self.query_index.to(mask.device)
        return replace(self, query_mask=mask, query_valid=mask.gather(1, index) & self.query_valid.to(mask.device))

    def key_counts(self, name: str) -> torch.Tensor:
        """``[B]`` number of keys in set ``name`` (e.g. ``|I|``)."""
        return self.key_masks[name].sum(dim=1)

    def _observe(self, module, query, key, attention_mask, scale: float, patch, lse):
        layer = module.layer_idx
        recomputing = torch._C._current_graph_task_id() != -1  # activation checkpointing, in backward
        if layer in self._by_layer and not recomputing:
            raise RuntimeError(f"layer {layer} ran twice inside one capture; capture one forward pass")
        # recomputation must save the same tensors as the original forward, so it computes again;
        # the first result (the one the loss was built from) is kept
        masses = self._compute(module, query, key, attention_mask, scale, patch, lse)
        self._by_layer.setdefault(layer, masses)

    def _compute(self, module, query, key, attention_mask, scale, patch, lse):
        batch, heads, q_len, _ = query.shape
        kv_len = key.shape[2]
        if self.query_mask.shape != (batch, q_len):
            raise ValueError(f"query_mask has shape {tuple(self.query_mask.shape)} but layer "
                             f"{module.layer_idx} sees {batch} sequences of {q_len} tokens")
        causal = getattr(module, "is_causal", True)
        clip = causal and (attention_mask is not None or q_len > 1)
        shared = self._shared(query.device, q_len, kv_len, clip)
        spec = Rows(attention_mask, shared.index, shared.valid,
                    upper_left_causal=attention_mask is None and q_len > 1 and causal)
        if patch is not None:
            spec.scaled = patch.rows(shared.positions)
            spec.key_factor = patch.key_factor(shared.k_end, query.device, torch.float32)
        if lse is not None:
            layout = shared.key_layout
            chunk_rows = max(1, self.chunk_bytes // (8 * batch * heads * layout.keys.shape[1]))
            return masses_from_lse(query, key, lse, layout, spec, scale, chunk_rows)
        with_total = torch.cat([shared.key_sets, torch.ones_like(shared.key_sets[..., :1])], dim=-1)
        chunk_rows = max(1, self.chunk_bytes // (8 * batch * heads * shared.k_end))
        return KeySetMass.apply(query, key[:, :, :shared.k_end], with_total, spec, scale, chunk_rows)

    def _shared(self, device, q_len: int, kv_len: int, clip: bool) -> SharedLayout:
        cache_key = (str(device), q_len, kv_len, clip)
        if cache_key not in self._layouts:
            self._layouts[cache_key] = SharedLayout.build(self, device, q_len, kv_len, clip)
        return self._layouts[cache_key]


@dataclass
class SharedLayout:
    """What every layer of one forward pass shares: the query rows, the end of the keys they can
    see, the key sets and (for the kernel path) their compacted layout. Built once per capture
    at the first layer, because building it reads values back from the device, which stalls a
    GPU: done at every layer, it made a Qwen3-VL-8B VAS forward at 2k tokens 1.48x a plain
    one instead of 1.10x (user queries; BENCHMARKS.md)."""

    index: torch.Tensor  # [B, Q] query rows
    valid: torch.Tensor  # [B, Q]
    positions: torch.Tensor  # [B, Q] key-space position of each query row
    k_end: int  # keys at and after k_end are never attended by the selected rows
    key_sets: torch.Tensor  # [B, k_end, n] bool
    _key_layout: KeyLayout | None = None

    @classmethod
    def build(cls, capture: Capture, device, q_len: int, kv_len: int, clip: bool) -> SharedLayout:
        index, valid = capture.query_index.to(device), capture.query_valid.to(device)
        positions = index + (kv_len - q_len)
        # under causal attention keys after the last selected query are masked: skip them
        k_end = max(1, min(kv_len, int(positions.max()) + 1)) if clip else kv_len
        key_sets = torch.stack([m.to(device)[:, :k_end] for m in capture.key_masks.values()], dim=-1)
        return cls(index, valid, positions, k_end, key_sets)

    @property
    def key_layout(self) -> KeyLayout:
        if self._key_layout is None:
            self._key_layout = KeyLayout.of(self.key_sets)
        return self._key_layout


class AttentionLens:
    """Exact per-query attention mass on key sets for chosen layers of a decoder model.

    Args:
        model: a transformers decoder or vision-language model (Qwen2 / Qwen2.5-VL family).
        layers: decoder layer indices to observe (negative from the end); None = all.
        chunk_bytes: memory budget for one chunk of selected-query scores (float32).
        kernel_lse: without gradients, take the row log-sum-exp from the SDPA kernel (CPU or
            CUDA) and score only the keys of the sets (fast); False always scores whole rows.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, kernel_lse: bool = True):
        self.model = model
        self.modules = resolve_layers(decoder_attention_modules(model), layers)
        self.layers = [m.layer_idx for m in self.modules]
        self.chunk_bytes = int(chunk_bytes)
        self.kernel_lse = bool(kernel_lse)

    @contextmanager
    def capture(self, query_mask: torch.Tensor, image_mask: torch.Tensor | None = None,
                system_mask: torch.Tensor | None = None,
                key_masks: Mapping[str, torch.Tensor] | None = None) -> Iterator[Capture]:
        """Observe one forward pass; ``image_mask``/``system_mask`` become key sets "image"/"system".

        All masks are bool ``[B, L]``; ``key_masks`` adds further named key sets.
        """
        sets: dict[str, torch.Tensor] = {}
        named = [("image", "image_mask", image_mask), ("system", "system_mask", system_mask)]
        named += [(name, f"key_masks[{name!r}]", mask) for name, mask in (key_masks or {}).items()]
        for name, label, mask in named:
            if mask is not None:
                sets[name] = _bool_mask(label, mask, query_mask.shape)
        if "total" in sets:
            raise ValueError("'total' is reserved for the mass on all keys")
        if not sets:
            raise ValueError("give at least one key set (image_mask, system_mask or key_masks)")
        query_mask = _bool_mask("query_mask", query_mask, query_mask.shape)
        index, valid = compact(query_mask)
        cap = Capture(self.layers, query_mask, sets, index, valid, self.chunk_bytes, self.kernel_lse)
        with patched_attention(self.modules, LENS_ATTR, [cap] * len(self.modules)):
            yield cap


def _bool_mask(name: str, mask: torch.Tensor, shape) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"{name} must be a [batch, seq_len] tensor, got {type(mask).__name__} "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)} like query_mask")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be boolean (or 0/1)")
        mask = mask.bool()
    return mask
