"""The attention lens: exact attention mass on key sets, without materialising attention maps.

AVAR's statistics (VAS, the AGTO loss terms, the VARS reward) all need, for some query tokens
``q`` and each layer and head, the post-softmax attention mass on the image tokens ``I`` and on
the system tokens ``S``. ``output_attentions=True`` would give them, but only on the eager path,
which builds a ``[B, H, L, L]`` tensor per layer (quadratic memory, several times slower), and a
flash-attention model returns no weights at all (a defect of the reference code). The lens
instead:

* installs, for the duration of a ``with`` block, one attention function through transformers'
  ``AttentionInterface`` (name :data:`IMPLEMENTATION`, masks built by ``sdpa_mask``). The layer
  output is computed by transformers' own ``sdpa_attention_forward``, so the model's outputs
  are exactly those of an SDPA model; on exit the previous implementation is restored;
* for the selected layers, gathers the selected query rows (post-RoPE ``q``) and computes, in
  query chunks, ``s = q.k * scale + mask``, the row log-sum-exp and
  ``mass(q, K) = sum_{k in K} exp(s_k - lse)`` for each key set ``K`` -- exactly the eager
  softmax restricted to those rows. Work and memory are ``O(|Q| * L)`` per layer, never
  ``O(L^2)``, and keys after the last selected query are skipped (the mask is causal);
* is differentiable (AGTO trains through it) with a hand-written backward that recomputes each
  chunk's scores instead of storing ``|Q| x L`` probabilities per layer, and that works with
  activation checkpointing whether backward runs inside or after the capture block.

Usage::

    lens = AttentionLens(model, layers=None)          # all decoder layers
    with lens.capture(query_mask, image_mask=image_mask, system_mask=system_mask) as cap:
        model(**inputs)
    cap.image   # [n_layers, B, H, Qmax] mass on image keys, per selected query (compact)
    cap.dense("image")  # [n_layers, B, H, L], zero outside the query mask

Masks are boolean ``[B, L]`` over the sequence given to the model (left or right padding both
fine; selected queries must be real tokens). Attention dropout, if the model has any, is not
reflected in the masses (they are the pre-dropout probabilities).

The same attention function also applies the inference-time key-column logit scaling of
:mod:`pipeline.intervention` (a :class:`KeyColumnScale` set on a module), so the lens measures
an intervened model exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "avar_sdpa"
"""Name under which the lens/intervention attention function is registered in transformers."""

_LENS_ATTR = "_avar_lens_capture"
_SCALE_ATTR = "_avar_key_column_scale"
DEFAULT_CHUNK_BYTES = 64 * 2**20


def decoder_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The language model's self-attention modules, ordered by ``layer_idx``.

    Recognised by what the lens needs (``layer_idx``, ``k_proj``, ``num_key_value_groups``), so
    vision-tower attention (no ``layer_idx``) is left alone. Works for Qwen2/Qwen2.5-VL style
    models; raises when nothing matches.
    """
    found = [m for m in model.modules()
             if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "k_proj")
             and hasattr(m, "num_key_value_groups") and hasattr(m, "config")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no decoder attention modules with layer_idx/k_proj; "
                         "the lens supports HF decoder models using the AttentionInterface")
    found.sort(key=lambda m: m.layer_idx)
    if len({m.layer_idx for m in found}) != len(found):
        raise ValueError("several attention modules share a layer_idx; cannot address layers uniquely")
    return found


def resolve_layers(modules: Sequence[nn.Module], layers: Sequence[int] | None) -> list[nn.Module]:
    """Modules for ``layers`` (layer indices; negative counts from the end; None = all)."""
    if layers is None:
        return list(modules)
    n = len(modules)
    chosen = []
    for layer in layers:
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} out of range for a model with {n} decoder layers")
        chosen.append(modules[layer % n])
    if len({m.layer_idx for m in chosen}) != len(chosen):
        raise ValueError(f"duplicate layers in {list(layers)}")
    return sorted(chosen, key=lambda m: m.layer_idx)


@contextmanager
def patched_attention(modules: Sequence[nn.Module], attr: str, values: Sequence[object]) -> Iterator[None]:
    """Route ``modules`` through :data:`IMPLEMENTATION` with ``module.<attr> = value``; undo on exit.

    Switches ``config._attn_implementation`` of every config object the modules use (the
    decoder's masks are built from the same config), restoring the previous names and attributes
    even when the body raises. Nested use (lens inside an intervention) composes.
    """
    _register()
    configs = {id(m.config): m.config for m in modules}
    previous = {key: cfg._attn_implementation_internal for key, cfg in configs.items()}
    for module in modules:
        if getattr(module, attr, None) is not None:
            raise RuntimeError(f"layer {module.layer_idx} already has an active {attr}; nesting the same "
                               "kind of patch twice is not supported")
    try:
        for cfg in configs.values():
            cfg._attn_implementation_internal = IMPLEMENTATION
        for module, value in zip(modules, values, strict=True):
            setattr(module, attr, value)
        yield
    finally:
        for module in modules:
            if hasattr(module, attr):
                delattr(module, attr)
        for key, cfg in configs.items():
            cfg._attn_implementation_internal = previous[key]


def scaling_keys(modules: Sequence[nn.Module], patch: KeyColumnScale):
    """Context manager: apply ``patch`` (key-column logit scaling) on ``modules``."""
    return patched_attention(modules, _SCALE_ATTR, [patch] * len(modules))


def _register() -> None:
    if AttentionInterface._global_mapping.get(IMPLEMENTATION) is not _attention_forward:
        AttentionInterface.register(IMPLEMENTATION, _attention_forward)
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@dataclass
class KeyColumnScale:
    """Multiply pre-softmax logits of key column ``j`` by ``factor[b, j]`` on rows at or after
    ``row_start[b]`` (absolute positions; keys beyond ``factor``'s length keep factor 1).

    Scaling logit column ``j`` equals scaling key vector ``k_j``, so the layer output is SDPA on
    scaled keys (the KV cache keeps the unscaled keys). Query positions are ``kv_len - q_len + i``,
    which holds for prefill and for decoding with a dynamic cache (``generate``'s default).
    """

    factor: torch.Tensor  # [B, L0] float
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


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered attention function: SDPA output (+ key scaling) and, if capturing, masses."""
    scale_patch: KeyColumnScale | None = getattr(module, _SCALE_ATTR, None)
    capture: Capture | None = getattr(module, _LENS_ATTR, None)
    if scale_patch is None:
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask,
                                              dropout=dropout, scaling=scaling, **kwargs)
    else:
        out, weights = _scaled_key_attention(module, query, key, value, attention_mask, scale_patch,
                                             dropout=dropout, scaling=scaling, **kwargs)
    if capture is not None:
        capture._observe(module, query, key, attention_mask,
                         scaling if scaling is not None else query.shape[-1] ** -0.5, scale_patch)
    return out, weights


def _scaled_key_attention(module, query, key, value, attention_mask, patch: KeyColumnScale, **kwargs):
    q_len, kv_len = query.shape[2], key.shape[2]
    positions = torch.arange(kv_len - q_len, kv_len, device=query.device).expand(query.shape[0], -1)
    rows = patch.rows(positions)  # [B, q_len]
    factor = patch.key_factor(kv_len, key.device, key.dtype)
    scaled, _ = sdpa_attention_forward(module, query, key * factor[:, None, :, None], value,
                                       attention_mask, **kwargs)
    if bool(rows.all()):
        return scaled, None
    plain, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return torch.where(rows[:, :, None, None], scaled, plain), None  # output is [B, q, H, d]


def _scores(q, k, bias, logit_factor, scale: float):
    """Logits of a query chunk: q [B,Hkv,G,c,d], k [B,Hkv,Lk,d] -> [B,Hkv,G,c,Lk] (+ mask)."""
    b, hkv, g, c, d = q.shape
    scores = torch.matmul(q.reshape(b, hkv, g * c, d), k.transpose(-1, -2)).view(b, hkv, g, c, -1) * scale
    if logit_factor is not None:
        scores = scores * logit_factor[:, None, None]
    return scores + bias[:, None, None]


class _KeySetMass(torch.autograd.Function):
    """Masses ``[B, H, Q, n]`` of the selected query rows on ``n`` key sets, chunked over queries.

    Hand-written forward and backward (rather than autograd over the chunk code) for two reasons:
    autograd would keep the ``|Q| x L`` probabilities of every layer until backward, and the
    tensors it needs are kept as ``ctx`` attributes instead of ``save_for_backward`` so they stay
    invisible to activation checkpointing: a checkpointed layer recomputed during backward, after
    the capture block has exited, then saves the same tensors as in the original forward. Backward
    recomputes each chunk's probabilities ``p`` from the saved row log-sum-exp and uses
    ``d mass_A / d s_k = p_k (1[k in A] - mass_A)``.
    """

    @staticmethod
    def forward(ctx, query, key, index, has_key, bias, key_sets, logit_factor, scale, chunk_rows):
        batch, heads, _, head_dim = query.shape
        kv_heads, n_query = key.shape[1], index.shape[1]
        groups = heads // kv_heads
        q_sel = query.gather(2, index[:, None, :, None].expand(batch, heads, n_query, head_dim))
        compute = torch.promote_types(query.dtype, torch.float32)  # float32, or float64 for gradcheck
        q_sel = q_sel.to(compute).view(batch, kv_heads, groups, n_query, head_dim)
        k32 = key.to(compute)
        masses, lses = [], []
        for start in range(0, n_query, chunk_rows):
            rows = slice(start, start + chunk_rows)
            scores = _scores(q_sel[:, :, :, rows], k32, bias[:, rows],
                             None if logit_factor is None else logit_factor[:, rows], scale)
            lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            probs = torch.exp(scores - lse)
            masses.append(torch.matmul(probs, key_sets[:, None, None]))
            lses.append(lse)
        mass = torch.cat(masses, dim=3)  # [B, Hkv, G, Q, n]
        ctx.stash = (q_sel, key.detach(), index, has_key, bias, key_sets, logit_factor, torch.cat(lses, dim=3),
                     mass, scale, chunk_rows, query.shape, query.dtype)
        return (mass * has_key[:, None, None, :, None]).reshape(batch, heads, n_query, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mass):
        (q_sel, key, index, has_key, bias, key_sets, logit_factor, lse, mass, scale, chunk_rows,
         query_shape, query_dtype) = ctx.stash  # kept (not deleted) so retain_graph=True works
        batch, kv_heads, groups, n_query, head_dim = q_sel.shape
        k32 = key.to(q_sel.dtype)
        grad = grad_mass.to(q_sel.dtype).reshape(mass.shape) * has_key[:, None, None, :, None]
        grad_q = torch.zeros_like(q_sel)
        grad_k = torch.zeros_like(k32)
        for start in range(0, n_query, chunk_rows):
            rows = slice(start, start + chunk_rows)
            factor = None if logit_factor is None else logit_factor[:, rows]
            q_chunk = q_sel[:, :, :, rows]
            probs = torch.exp(_scores(q_chunk, k32, bias[:, rows], factor, scale) - lse[:, :, :, rows])
            g = grad[:, :, :, rows]
            per_key = torch.matmul(g, key_sets[:, None, None].transpose(-1, -2))  # [B,Hkv,G,c,Lk]
            centred = per_key - (g * mass[:, :, :, rows]).sum(-1, keepdim=True)
            d_logits = probs * centred * scale
            if factor is not None:
                d_logits = d_logits * factor[:, None, None]
            c = q_chunk.shape[3]
            flat = d_logits.reshape(batch, kv_heads, groups * c, -1)
            grad_q[:, :, :, rows] = torch.matmul(flat, k32).view(batch, kv_heads, groups, c, head_dim)
            grad_k += torch.matmul(flat.transpose(-1, -2), q_chunk.reshape(batch, kv_heads, groups * c, head_dim))
        heads = kv_heads * groups
        grad_query = torch.zeros(query_shape, dtype=q_sel.dtype, device=q_sel.device)
        grad_query.scatter_add_(2, index[:, None, :, None].expand(batch, heads, n_query, head_dim),
                                grad_q.reshape(batch, heads, n_query, head_dim))
        return grad_query.to(query_dtype), grad_k.to(key.dtype), *([None] * 7)


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
    _by_layer: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def set_names(self) -> list[str]:
        return [*self.key_masks, "total"]

    @property
    def masses(self) -> torch.Tensor:
        missing = [layer for layer in self.layers if layer not in self._by_layer]
        if missing:
            raise RuntimeError(f"no attention was observed for layers {missing}: run exactly one forward "
                               "pass of the model inside the capture block")
        return torch.stack([self._by_layer[layer] for layer in self.layers])

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
        index = self.query_index[None, :, None, :].expand_as(compact)
        return out.scatter_add(-1, index, compact * self.query_valid[None, :, None, :])

    def key_counts(self, name: str) -> torch.Tensor:
        """``[B]`` number of keys in set ``name`` (e.g. ``|I|``)."""
        return self.key_masks[name].sum(dim=1)

    def _observe(self, module, query, key, attention_mask, scale: float, patch: KeyColumnScale | None):
        layer = module.layer_idx
        recomputing = torch._C._current_graph_task_id() != -1  # activation checkpointing, in backward
        if layer in self._by_layer and not recomputing:
            raise RuntimeError(f"layer {layer} ran twice inside one capture; capture one forward pass")
        # recomputation must save the same tensors as the original forward, so it computes again;
        # the first result (the one the loss was built from) is kept
        masses = self._compute(module, query, key, attention_mask, scale, patch)
        self._by_layer.setdefault(layer, masses)

    def _compute(self, module, query, key, attention_mask, scale, patch):
        batch, heads, q_len, head_dim = query.shape
        kv_len = key.shape[2]
        if self.query_mask.shape != (batch, q_len):
            raise ValueError(f"query_mask has shape {tuple(self.query_mask.shape)} but layer "
                             f"{module.layer_idx} sees {batch} sequences of {q_len} tokens")
        device = query.device
        index = self.query_index.to(device)
        valid = self.query_valid.to(device)
        positions = index + (kv_len - q_len)  # absolute key-space position of each query
        is_causal = getattr(module, "is_causal", True)
        # keys after the last selected query are masked under causal attention: skip them
        k_end = int(positions.max()) + 1 if is_causal and (attention_mask is not None or q_len > 1) else kv_len
        k_end = max(1, min(kv_len, k_end))
        allowed = self._allowed_rows(attention_mask, index, positions, q_len, kv_len, k_end, is_causal)
        allowed &= valid[:, :, None]
        # a row without any allowed key (padding slot) would give a NaN softmax gradient even when
        # masked out afterwards: let it see every key and zero its masses at the end instead
        has_key = allowed.any(dim=-1)
        bias = torch.zeros(allowed.shape, device=device, dtype=torch.float32)
        bias.masked_fill_(~allowed & has_key[:, :, None], float("-inf"))
        key_sets = torch.stack([m.to(device)[:, :k_end] for m in self.key_masks.values()]
                               + [torch.ones(batch, k_end, dtype=torch.bool, device=device)], dim=-1)
        key_sets = key_sets.to(torch.float32)
        logit_factor = None
        if patch is not None:
            rows = patch.rows(positions).to(torch.float32)[:, :, None]  # [B, Q, 1]
            col = patch.key_factor(k_end, device, torch.float32)[:, None, :]  # [B, 1, Lk]
            logit_factor = 1.0 + rows * (col - 1.0)

        chunk_rows = max(1, self.chunk_bytes // max(1, 8 * batch * heads * k_end))
        return _KeySetMass.apply(query, key[:, :, :k_end], index, has_key, bias, key_sets, logit_factor,
                                 scale, chunk_rows)

    @staticmethod
    def _allowed_rows(attention_mask, index, positions, q_len, kv_len, k_end, is_causal) -> torch.Tensor:
        """Bool ``[B, Q, k_end]``: which keys each selected query may attend to (the model's mask)."""
        batch, n_query = index.shape
        device = index.device
        if attention_mask is None:
            keys = torch.arange(k_end, device=device)
            if q_len > 1 and is_causal:  # SDPA's is_causal: upper-left aligned
                return keys[None, None, :] <= index[:, :, None]
            return torch.ones(batch, n_query, k_end, dtype=torch.bool, device=device)
        if attention_mask.dim() != 4:
            raise ValueError(f"expected a 4D attention mask, got shape {tuple(attention_mask.shape)}")
        mask = attention_mask[:, 0, :, :k_end]  # shared by heads
        mask = mask.expand(batch, q_len, k_end)
        rows = mask.gather(1, index[:, :, None].expand(batch, n_query, k_end))
        if rows.dtype == torch.bool:
            return rows
        return rows > torch.finfo(rows.dtype).min / 2  # additive float mask: very negative = masked


class AttentionLens:
    """Exact per-query attention mass on key sets for chosen layers of a decoder model.

    Args:
        model: a transformers decoder or vision-language model (Qwen2 / Qwen2.5-VL family).
        layers: decoder layer indices to observe (negative from the end); None = all.
        chunk_bytes: memory budget for one chunk of selected-query scores (float32).
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.model = model
        self.modules = resolve_layers(decoder_attention_modules(model), layers)
        self.layers = [m.layer_idx for m in self.modules]
        self.chunk_bytes = int(chunk_bytes)

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
        query_mask = _bool_mask("query_mask", query_mask, query_mask.shape)
        counts = query_mask.sum(dim=1)
        width = max(1, int(counts.max())) if counts.numel() else 1
        # stable sort puts selected positions first, in sequence order
        order = torch.sort((~query_mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
        valid = torch.arange(width, device=query_mask.device)[None, :] < counts[:, None]
        cap = Capture(self.layers, query_mask, sets, torch.where(valid, order, 0), valid, self.chunk_bytes)
        with patched_attention(self.modules, _LENS_ATTR, [cap] * len(self.modules)):
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
