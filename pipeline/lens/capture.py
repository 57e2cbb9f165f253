"""What the lens records of one forward pass (:class:`Capture`) and how to ask for it
(:class:`AttentionLens`); see :mod:`pipeline.lens` for the method."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from pipeline.lens.modules import (
    LENS_ATTR,
    checkpointing_layers,
    decoder_attention_modules,
    patched_attention,
    resolve_layers,
)


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
    _parents: dict[int, nn.Module] = field(default_factory=dict, repr=False)  # layer -> its checkpointing layer
    _by_layer: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _indicators: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

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

    def indicators(self, q_len: int, kv_len: int, device, dtype) -> torch.Tensor:
        """``[B, kv_len, n_sets]`` 0/1 columns of the key sets and of all keys (``total``), over the
        keys a layer sees; built once per forward pass and shared by its layers."""
        batch, length = self.query_mask.shape
        if length != q_len:
            raise ValueError(f"query_mask has shape {tuple(self.query_mask.shape)} but the model runs "
                             f"sequences of {q_len} tokens")
        cache_key = (str(device), kv_len, dtype)
        if cache_key not in self._indicators:
            sets = torch.stack([m.to(device) for m in self.key_masks.values()], dim=-1)  # [B, L, n]
            start = kv_len - q_len  # keys before the queries (a cache) belong to no set
            columns = torch.zeros(batch, kv_len, sets.shape[-1] + 1, dtype=dtype, device=device)
            columns[:, start:start + length, :-1] = sets[:, :kv_len - start].to(dtype)
            columns[..., -1] = 1
            self._indicators[cache_key] = columns
        return self._indicators[cache_key]

    def checkpointed(self, module: nn.Module) -> bool:
        """Whether ``module``'s layer runs under activation checkpointing (and will be recomputed
        in backward), as transformers' ``GradientCheckpointingLayer`` decides it."""
        parent = self._parents.get(module.layer_idx)
        return bool(parent is not None and parent.gradient_checkpointing and parent.training
                    and torch.is_grad_enabled())

    def rows(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query_index, query_valid)`` on ``device``."""
        return self.query_index.to(device), self.query_valid.to(device)

    def observe(self, module: nn.Module, rows: torch.Tensor) -> None:
        """Keep one layer's masses of the captured rows, ``[B, H, Qmax, n_sets]``."""
        layer = module.layer_idx
        recomputing = torch._C._current_graph_task_id() != -1  # activation checkpointing, in backward
        if layer in self._by_layer and not recomputing:
            raise RuntimeError(f"layer {layer} ran twice inside one capture; capture one forward pass")
        self._by_layer.setdefault(layer, rows)  # a recomputation keeps the first (the loss's) result


class AttentionLens:
    """Exact per-query attention mass on key sets for chosen layers of a decoder model.

    Args:
        model: a transformers vision-language (or decoder) model of a supported family.
        layers: decoder layer indices to observe (negative from the end); None = all.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None):
        self.model = model
        self.modules = resolve_layers(decoder_attention_modules(model), layers)
        self.layers = [m.layer_idx for m in self.modules]
        self._parents = checkpointing_layers(model, self.modules)

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
        cap = Capture(self.layers, query_mask, sets, index, valid, self._parents)
        with patched_attention(self.modules, LENS_ATTR, [cap] * len(self.modules)):
            yield cap


def compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of True entries, left-aligned: ``([B, K] long, [B, K] valid)``; padding slots 0."""
    counts = mask.sum(dim=1)
    width = max(1, int(counts.max())) if counts.numel() else 1
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


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
