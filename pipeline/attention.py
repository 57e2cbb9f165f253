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
* for the selected layers, gathers the selected query rows (post-RoPE ``q``) and, in chunks
  of rows, takes the softmax of ``s = q.k * scale + mask`` over the row's keys and sums it over
  each key set ``K`` -- exactly the eager softmax restricted to those rows, in float32 whatever
  the model dtype. Work and memory are ``O(|Q| * L)`` per layer, never ``O(L^2)`` (the model's
  own 4D padding mask aside), and keys after the last selected query are skipped (causal);
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
fine; selected queries must be real tokens). Inside the block the decoder runs SDPA whatever
implementation the model was loaded with (eager, flash-attention); the vision tower is left
alone. Attention dropout, if any, is not reflected (masses are pre-dropout probabilities).

Without gradients the layer output and the row log-sum-exp come from one call of the SDPA
kernel (the one ``F.scaled_dot_product_attention`` uses for these inputs: the flash kernel on CPU,
flash or memory-efficient on CUDA) and only the keys of the sets are scored:
``|Q| x (|I| + |S|)`` work instead of ``|Q| x L``.

The same attention function also applies the inference-time key-column logit scaling of
:mod:`pipeline.intervention` (a ``KeyColumnScale`` set on a module), so the lens measures an
intervened model exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
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


def scaling_keys(modules: Sequence[nn.Module], patch) -> AbstractContextManager:
    """Context manager: route ``modules`` through ``patch`` (see
    :class:`pipeline.intervention.KeyColumnScale`: ``attention(...)``, ``rows``, ``key_factor``)."""
    return patched_attention(modules, _SCALE_ATTR, [patch] * len(modules))


def _register() -> None:
    if AttentionInterface._global_mapping.get(IMPLEMENTATION) is not _attention_forward:
        AttentionInterface.register(IMPLEMENTATION, _attention_forward)
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered attention function: SDPA output (+ key scaling) and, if capturing, masses."""
    patch = getattr(module, _SCALE_ATTR, None)
    capture: Capture | None = getattr(module, _LENS_ATTR, None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if capture is not None and capture.kernel_lse and patch is None and _kernel_lse_usable(module, query, key, dropout, kwargs):
        try:
            out, lse = _sdpa_with_lse(module, query, key, value, attention_mask, scale)
        except RuntimeError as err:  # a CUDA kernel refusing this shape/dtype: score whole rows
            if query.device.type == "cpu":
                raise
            _warn_kernel_fallback(err)
        else:
            capture._observe(module, query, key, attention_mask, scale, None, lse)
            return out, None
    if patch is None:
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask,
                                              dropout=dropout, scaling=scaling, **kwargs)
    else:
        out, weights = patch.attention(module, query, key, value, attention_mask,
                                       dropout=dropout, scaling=scaling, **kwargs)
    if capture is not None:
        capture._observe(module, query, key, attention_mask, scale, patch, None)
    return out, weights


def _kernel_lse_usable(module, query, key, dropout, kwargs) -> bool:
    """Whether an SDPA kernel can give the layer output and the row log-sum-exp at once (no
    gradient needed, prefill, no dropout, nothing SDPA-specific in kwargs): the CPU flash kernel,
    or on CUDA the flash (half precision, no mask) or memory-efficient kernel."""
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    if query.device.type == "cpu":
        kernel = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    else:
        kernel = query.device.type == "cuda" and hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention")
    return (kernel and not needs_grad and not (dropout and module.training)
            and query.shape[2] == key.shape[2] and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None and query.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (query.device.type != "cpu" or query.dtype != torch.float16))


def _sdpa_with_lse(module, query, key, value, attention_mask, scale: float):
    """The layer output and the per-row log-sum-exp ``[B, H, >=L]`` from one kernel call.

    The kernels are those ``F.scaled_dot_product_attention`` itself dispatches to for these inputs
    (CPU: its flash kernel; CUDA: flash without a mask in half precision, memory-efficient
    otherwise), so the layer output is what an SDPA model computes.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:  # as SDPA converts a boolean mask
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=mask, scale=scale)
    elif mask is None and query.dtype != torch.float32 and query.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, is_causal, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, _aligned_bias(mask, query), True, 0.0, is_causal, scale=scale)[:2]
    return out.transpose(1, 2).contiguous(), lse


def _aligned_bias(mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """An additive mask as the memory-efficient kernel wants it: query dtype, broadcast over the
    heads, rows padded to a multiple of 16 keys in memory (what SDPA's front end does)."""
    if mask is None:
        return None
    batch, heads, length = query.shape[0], query.shape[1], mask.shape[-1]
    padded = -(-length // 16) * 16
    storage = torch.zeros((*mask.shape[:-1], padded), dtype=query.dtype, device=mask.device)
    storage[..., :length] = mask
    return storage[..., :length].expand(batch, heads, mask.shape[-2], length)


_FALLBACK_WARNED = False


def _warn_kernel_fallback(err: Exception) -> None:
    global _FALLBACK_WARNED
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED = True
        import warnings

        warnings.warn(f"attention lens: the SDPA kernel with log-sum-exp failed ({err}); "
                      "scoring whole rows instead (exact, slower)", RuntimeWarning, stacklevel=3)


@dataclass
class _Rows:
    """The selected query rows of one layer call and what each may attend to.

    Built per chunk of rows and never for all ``|Q| x L`` pairs at once, so memory stays linear
    in the sequence length (the model's own 4D mask aside).
    """

    attention_mask: torch.Tensor | None  # the model's 4D mask, or None (SDPA is_causal / full)
    index: torch.Tensor  # [B, Q] row positions in the query sequence
    valid: torch.Tensor  # [B, Q] real (non-padding-slot) rows
    upper_left_causal: bool
    scaled: torch.Tensor | None = None  # [B, Q] rows under key-column scaling
    key_factor: torch.Tensor | None = None  # [B, Lk] logit factor per key column

    def allowed(self, rows: slice, keys: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, c, K]``: may row ``rows`` attend to key positions ``keys`` ``[B, K]``."""
        index = self.index[:, rows]
        if self.attention_mask is None:
            if self.upper_left_causal:
                ok = keys[:, None, :] <= index[:, :, None]
            else:
                ok = torch.ones(index.shape + keys.shape[1:], dtype=torch.bool, device=index.device)
        else:
            mask = self.attention_mask[:, 0].expand(index.shape[0], -1, -1)  # heads share it
            batch = torch.arange(index.shape[0], device=index.device)[:, None, None]
            ok = mask[batch, index[:, :, None], keys[:, None, :]]
            if ok.dtype != torch.bool:  # additive float mask: very negative means masked
                ok = ok > torch.finfo(ok.dtype).min / 2
        return ok & self.valid[:, rows, None]

    def factor(self, rows: slice, keys: torch.Tensor) -> torch.Tensor | None:
        """Logit factors ``[B, c, K]`` under key-column scaling, or None."""
        if self.scaled is None:
            return None
        column = self.key_factor.gather(1, keys)[:, None, :]
        return 1.0 + self.scaled[:, rows, None].to(column.dtype) * (column - 1.0)


def _chunk_probs(q_scaled, k, spec: _Rows, rows: slice, keys: torch.Tensor):
    """Softmax over keys of one row chunk: q [B,Hkv,G,c,d] -> ([B,Hkv,G,c,K], has_key [B,c], factor)."""
    b, hkv, g, c, d = q_scaled.shape
    scores = torch.matmul(q_scaled.reshape(b, hkv, g * c, d), k.transpose(-1, -2)).view(b, hkv, g, c, -1)
    factor = spec.factor(rows, keys)
    if factor is not None:
        scores.mul_(factor[:, None, None])
    allowed = spec.allowed(rows, keys)
    has_key = allowed.any(dim=-1)
    # a row without any allowed key (padding slot) would make a NaN softmax: let it see every
    # key and zero its masses afterwards
    scores.masked_fill_((~allowed & has_key[:, :, None])[:, None, None], float("-inf"))
    return torch.softmax(scores, dim=-1), has_key, factor


class _KeySetMass(torch.autograd.Function):
    """Masses ``[B, H, Q, n]`` of the selected query rows on ``n`` key sets, chunked over rows.

    Hand-written forward and backward (rather than autograd over the chunk code) for two reasons:
    autograd would keep the ``|Q| x L`` probabilities of every layer until backward, and the
    tensors backward needs are kept as ``ctx`` attributes instead of ``save_for_backward`` so they
    stay invisible to activation checkpointing: a checkpointed layer recomputed during backward,
    after the capture block has exited, then saves the same tensors as in the original forward.
    Backward recomputes each chunk's probabilities ``p`` and uses
    ``d mass_A / d s_k = p_k (1[k in A] - mass_A)``.
    """

    @staticmethod
    def forward(ctx, query, key, key_sets, spec: _Rows, scale: float, chunk_rows: int):
        batch, heads, _, head_dim = query.shape
        kv_heads, n_query = key.shape[1], spec.index.shape[1]
        compute = torch.promote_types(query.dtype, torch.float32)  # float32, or float64 for gradcheck
        q_sel = query.gather(2, spec.index[:, None, :, None].expand(batch, heads, n_query, head_dim))
        q_sel = q_sel.to(compute).view(batch, kv_heads, heads // kv_heads, n_query, head_dim) * scale
        k_c = key.to(compute)
        keys = torch.arange(key.shape[2], device=key.device).expand(batch, -1)
        sets = key_sets.to(compute)[:, None, None]
        masses, has_keys = [], []
        for start in range(0, n_query, chunk_rows):
            rows = slice(start, start + chunk_rows)
            probs, has_key, _ = _chunk_probs(q_sel[:, :, :, rows], k_c, spec, rows, keys)
            masses.append(torch.matmul(probs, sets))
            has_keys.append(has_key)
        mass, has_key = torch.cat(masses, dim=3), torch.cat(has_keys, dim=1)  # [B,Hkv,G,Q,n], [B,Q]
        ctx.stash = (q_sel, key.detach(), key_sets, spec, mass, has_key, scale, chunk_rows, query.shape, query.dtype)
        return (mass * has_key[:, None, None, :, None]).reshape(batch, heads, n_query, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mass):
        q_sel, key, key_sets, spec, mass, has_key, scale, chunk_rows, query_shape, query_dtype = ctx.stash
        batch, kv_heads, groups, n_query, head_dim = q_sel.shape  # stash kept: retain_graph works
        k_c = key.to(q_sel.dtype)
        keys = torch.arange(key.shape[2], device=key.device).expand(batch, -1)
        sets_t = key_sets.to(q_sel.dtype)[:, None, None].transpose(-1, -2)
        grad = grad_mass.to(q_sel.dtype).reshape(mass.shape) * has_key[:, None, None, :, None]
        grad_q, grad_k = torch.zeros_like(q_sel), torch.zeros_like(k_c)
        for start in range(0, n_query, chunk_rows):
            rows = slice(start, start + chunk_rows)
            q_chunk = q_sel[:, :, :, rows]
            probs, _, factor = _chunk_probs(q_chunk, k_c, spec, rows, keys)
            g = grad[:, :, :, rows]
            centred = torch.matmul(g, sets_t) - (g * mass[:, :, :, rows]).sum(-1, keepdim=True)
            d_logits = probs * centred  # gradient w.r.t. the (scaled) scores
            if factor is not None:
                d_logits = d_logits * factor[:, None, None]
            c = q_chunk.shape[3]
            flat = d_logits.reshape(batch, kv_heads, groups * c, -1)
            grad_q[:, :, :, rows] = torch.matmul(flat, k_c).view(batch, kv_heads, groups, c, head_dim)
            grad_k += torch.matmul(flat.transpose(-1, -2), q_chunk.reshape(batch, kv_heads, groups * c, head_dim))
        heads = kv_heads * groups
        grad_query = torch.zeros(query_shape, dtype=q_sel.dtype, device=q_sel.device)
        grad_query.scatter_add_(2, spec.index[:, None, :, None].expand(batch, heads, n_query, head_dim),
                                grad_q.reshape(batch, heads, n_query, head_dim) * scale)
        return grad_query.to(query_dtype), grad_k.to(key.dtype), None, None, None, None


def _masses_from_lse(query, key, lse, key_sets, spec: _Rows, scale: float, chunk_rows: int):
    """No-grad masses from the kernel's row log-sum-exp: only the keys of the sets are scored,
    ``mass(q, A) = sum_{k in A} exp(s_qk - lse_q)``, so the cost is ``|Q| x |I u S|``."""
    batch, heads, _, head_dim = query.shape
    kv_heads, n_query = key.shape[1], spec.index.shape[1]
    keys, key_valid = _compact(key_sets.any(dim=-1))  # [B, K] positions of keys in any set
    k_sel = key.gather(2, keys[:, None, :, None].expand(batch, kv_heads, keys.shape[1], head_dim)).float()
    sets = (key_sets.gather(1, keys[:, :, None].expand(-1, -1, key_sets.shape[-1])) & key_valid[..., None]).float()
    q_sel = query.gather(2, spec.index[:, None, :, None].expand(batch, heads, n_query, head_dim)).float() * scale
    q_sel = q_sel.view(batch, kv_heads, heads // kv_heads, n_query, head_dim)
    lse_sel = lse.gather(2, spec.index[:, None, :].expand(batch, heads, n_query)).view(q_sel.shape[:-1])
    finite = torch.isfinite(lse_sel)
    lse_sel = torch.where(finite, lse_sel, torch.zeros_like(lse_sel))
    masses = []
    for start in range(0, n_query, chunk_rows):
        rows = slice(start, start + chunk_rows)
        q_chunk = q_sel[:, :, :, rows]
        b, hkv, g, c, d = q_chunk.shape
        scores = torch.matmul(q_chunk.reshape(b, hkv, g * c, d), k_sel.transpose(-1, -2)).view(b, hkv, g, c, -1)
        probs = torch.exp(scores - lse_sel[:, :, :, rows, None])
        probs.masked_fill_(~spec.allowed(rows, keys)[:, None, None], 0.0)
        masses.append(torch.matmul(probs, sets[:, None, None]))
    mass = torch.cat(masses, dim=3) * finite[..., None]
    total = (finite & spec.valid[:, None, None, :]).to(mass.dtype)[..., None]  # a softmax row sums to 1
    return torch.cat([mass, total], dim=-1).reshape(batch, heads, n_query, -1)


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of True entries, left-aligned: ``([B, K] long, [B, K] valid)``; padding slots 0."""
    counts = mask.sum(dim=1)
    width = max(1, int(counts.max())) if counts.numel() else 1
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


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
        device = query.device
        index, valid = self.query_index.to(device), self.query_valid.to(device)
        positions = index + (kv_len - q_len)  # key-space position of each query row
        causal = getattr(module, "is_causal", True)
        # keys after the last selected query are masked under causal attention: skip them
        k_end = kv_len
        if causal and (attention_mask is not None or q_len > 1):
            k_end = max(1, min(kv_len, int(positions.max()) + 1))
        spec = _Rows(attention_mask, index, valid, upper_left_causal=attention_mask is None and q_len > 1 and causal)
        if patch is not None:
            spec.scaled = patch.rows(positions)
            spec.key_factor = patch.key_factor(k_end, device, torch.float32)
        key_sets = torch.stack([m.to(device)[:, :k_end] for m in self.key_masks.values()], dim=-1)
        if lse is not None:
            width = max(1, int(key_sets.any(-1).sum(1).max()))
            chunk_rows = max(1, self.chunk_bytes // (8 * batch * heads * width))
            return _masses_from_lse(query, key, lse, key_sets, spec, scale, chunk_rows)
        with_total = torch.cat([key_sets, torch.ones_like(key_sets[..., :1])], dim=-1)
        chunk_rows = max(1, self.chunk_bytes // (8 * batch * heads * k_end))
        return _KeySetMass.apply(query, key[:, :, :k_end], with_total, spec, scale, chunk_rows)


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
        index, valid = _compact(query_mask)
        cap = Capture(self.layers, query_mask, sets, index, valid, self.chunk_bytes, self.kernel_lse)
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
