"""Exact attention mass of selected query rows on key sets, in chunks of rows.

:class:`KeySetMass` scores whole rows (the differentiable path, with a hand-written backward);
:func:`masses_from_lse` scores only the keys of the sets, given the row log-sum-exp of a kernel
(no gradients). Both work on ``[B, H, L, d]`` query/key tensors of one layer and never build an
``L x L`` matrix: memory is linear in the sequence length (the model's own 4D mask aside).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rows:
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


def chunk_probs(q_scaled, k, spec: Rows, rows: slice, keys: torch.Tensor):
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


class KeySetMass(torch.autograd.Function):
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
    def forward(ctx, query, key, key_sets, spec: Rows, scale: float, chunk_rows: int):
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
            probs, has_key, _ = chunk_probs(q_sel[:, :, :, rows], k_c, spec, rows, keys)
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
            probs, _, factor = chunk_probs(q_chunk, k_c, spec, rows, keys)
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


@dataclass
class KeyLayout:
    """The keys in any set, left-aligned per sample: what :func:`masses_from_lse` scores (built
    once per forward pass, see :class:`pipeline.lens.capture.SharedLayout`)."""

    keys: torch.Tensor  # [B, K] key positions (padding slots 0)
    sets: torch.Tensor  # [B, K, n] float32 membership of each slot in each set (0 at padding slots)

    @classmethod
    def of(cls, key_sets: torch.Tensor) -> KeyLayout:
        keys, valid = compact(key_sets.any(dim=-1))
        sets = key_sets.gather(1, keys[:, :, None].expand(-1, -1, key_sets.shape[-1])) & valid[..., None]
        return cls(keys, sets.float())


def masses_from_lse(query, key, lse, layout: KeyLayout, spec: Rows, scale: float, chunk_rows: int):
    """No-grad masses from the kernel's row log-sum-exp: only the keys of the sets are scored,
    ``mass(q, A) = sum_{k in A} exp(s_qk - lse_q)``, so the cost is ``|Q| x |I u S|``."""
    batch, heads, _, head_dim = query.shape
    kv_heads, n_query = key.shape[1], spec.index.shape[1]
    keys = layout.keys
    k_sel = key.gather(2, keys[:, None, :, None].expand(batch, kv_heads, keys.shape[1], head_dim))
    q_sel = query.gather(2, spec.index[:, None, :, None].expand(batch, heads, n_query, head_dim))
    q_sel = q_sel.view(batch, kv_heads, heads // kv_heads, n_query, head_dim)
    lse_sel = lse.gather(2, spec.index[:, None, :].expand(batch, heads, n_query)).view(q_sel.shape[:-1])
    finite = torch.isfinite(lse_sel)
    lse_sel = torch.where(finite, lse_sel, torch.zeros_like(lse_sel))
    sets = layout.sets[:, None, None]
    masses = []
    for start in range(0, n_query, chunk_rows):
        rows = slice(start, start + chunk_rows)
        q_chunk = q_sel[:, :, :, rows]
        b, hkv, g, c, d = q_chunk.shape
        scores = float32_scores(q_chunk.reshape(b, hkv, g * c, d), k_sel).view(b, hkv, g, c, -1)
        probs = scores.mul_(scale).sub_(lse_sel[:, :, :, rows, None]).exp_()
        probs.masked_fill_(~spec.allowed(rows, keys)[:, None, None], 0.0)
        masses.append(torch.matmul(probs, sets))
    mass = torch.cat(masses, dim=3) * finite[..., None]
    total = (finite & spec.valid[:, None, None, :]).to(mass.dtype)[..., None]  # a softmax row sums to 1
    return torch.cat([mass, total], dim=-1).reshape(batch, heads, n_query, -1)


_HALF_MATMUL_TO_FLOAT32 = True  # cleared when this torch has no bmm(..., out_dtype=) on CUDA


def float32_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ k^T`` ``[B, H, c, K]`` in float32, unscaled, as the attention kernels compute it.

    Half-precision CUDA inputs go through the tensor cores with float32 accumulation and output
    (``bmm(..., out_dtype=float32)``): products of half values are exact in float32, so this is
    the float32 product of the same numbers without float32 arithmetic on the CUDA cores (checked
    on an H200 against the float32 softmax of the same q/k: BENCHMARKS.md). Elsewhere the inputs
    are upcast to float32.
    """
    global _HALF_MATMUL_TO_FLOAT32
    if _HALF_MATMUL_TO_FLOAT32 and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype:
        b, h, c, d = q.shape
        try:
            return torch.bmm(q.reshape(b * h, c, d), k.reshape(b * h, -1, d).transpose(1, 2),
                             out_dtype=torch.float32).view(b, h, c, -1)
        except (RuntimeError, TypeError):  # older torch: no out_dtype overload of bmm
            _HALF_MATMUL_TO_FLOAT32 = False
    return torch.matmul(q.float(), k.float().transpose(-1, -2))


def compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of True entries, left-aligned: ``([B, K] long, [B, K] valid)``; padding slots 0."""
    counts = mask.sum(dim=1)
    width = max(1, int(counts.max())) if counts.numel() else 1
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid

