"""The layer output and every query row's attention mass on every key set, from one SDPA call.

The mass of row ``q`` on key set ``K`` is ``sum_k P[q, k] 1_K(k)``: the attention output for a
value column that is the indicator of ``K``. So the value vectors get one extra column per key
set (:func:`augmented_attention`), ``q`` and ``k`` are zero-padded to the same width (the fused
kernels want equal head sizes; zeros change no score, and the softmax scale stays that of the real
head size), and one ``F.scaled_dot_product_attention`` call -- through transformers' own
``sdpa_attention_forward``, so GQA, masks and causality are handled as in an SDPA model -- returns
the layer output in the first ``head_dim`` columns and the masses in the next ones. Its backward
is SDPA's own: gradients of anything built from the masses are exact.

In half precision the indicator columns go through the kernel's low-precision ``P @ V``: masses
are rounded like any attention output (BENCHMARKS.md gives the error).

A layer under activation checkpointing is recomputed during backward, often after the capture
block has exited and the model's own attention is back; the recomputation must then save what
the first forward saved. Such layers compute their output with the plain SDPA forward and their
masses with :class:`CheckpointedMass`, which keeps its inputs outside autograd's saved tensors and
runs the same augmented SDPA again in its backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

COLUMN_MULTIPLE = 8  # the fastest padded width of 1/8/16/32 on CPU (bench/lens_padding.py, BENCHMARKS.md)


def padded_width(head_dim: int, n_sets: int) -> int:
    return -(-(head_dim + n_sets) // COLUMN_MULTIPLE) * COLUMN_MULTIPLE


def augmented_attention(module, query, key, value, sets, attention_mask, scaling: float, **kwargs):
    """``(output [B, L, H, d], masses [B, H, L, n])`` of one SDPA call on augmented values.

    ``sets`` is ``[B, kv_len, n]`` (0/1, any float dtype): the key sets' indicators over the keys
    this layer sees. ``scaling`` is the real head size's softmax scale.
    """
    head_dim, n_sets = query.shape[-1], sets.shape[-1]
    width = padded_width(head_dim, n_sets)
    pad = width - head_dim
    indicators = sets.to(value.dtype)[:, None].expand(-1, value.shape[1], -1, -1)
    value = F.pad(torch.cat([value, indicators], dim=-1), (0, width - head_dim - n_sets))
    out, _ = sdpa_attention_forward(module, F.pad(query, (0, pad)), F.pad(key, (0, pad)), value,
                                    attention_mask, scaling=scaling, **kwargs)
    return out[..., :head_dim], out[..., head_dim:head_dim + n_sets].transpose(1, 2)


def query_rows(masses: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, H, Q, n]`` float32 (or float64) masses of the rows ``index`` ``[B, Q]`` of ``masses`` ``[B, H, L, n]``,
    0 where not ``valid`` (padding slots may point at fully masked rows, whose masses are NaN)."""
    rows = masses.gather(2, index[:, None, :, None].expand(-1, masses.shape[1], -1, masses.shape[-1]))
    return torch.where(valid[:, None, :, None], rows.to(torch.promote_types(rows.dtype, torch.float32)), 0.0)


class CheckpointedMass(torch.autograd.Function):
    """The captured rows' masses ``[B, H, Q, n]`` for a checkpointed layer (see the module
    docstring): the augmented SDPA without gradient in forward, again with gradient in backward.
    Inputs are kept as ``ctx`` attributes, not saved tensors, and the rows are picked inside, so
    activation checkpointing sees no tensor of the lens."""

    @staticmethod
    def forward(ctx, query, key, value, sets, module, attention_mask, scaling, kwargs, index, valid):
        with torch.no_grad():
            _, masses = augmented_attention(module, query, key, value, sets, attention_mask, scaling, **kwargs)
        ctx.stash = (query.detach(), key.detach(), value.detach(), sets, module, attention_mask, scaling, kwargs,
                     index, valid)
        return query_rows(masses, index, valid)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        query, key, value, sets, module, attention_mask, scaling, kwargs, index, valid = ctx.stash
        query, key = query.requires_grad_(), key.requires_grad_()
        with torch.enable_grad():
            _, masses = augmented_attention(module, query, key, value, sets, attention_mask, scaling, **kwargs)
            rows = query_rows(masses, index, valid)
            grad_query, grad_key = torch.autograd.grad(rows, (query, key), grad_rows)
        return grad_query, grad_key, None, None, None, None, None, None, None, None
