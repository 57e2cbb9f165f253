"""The SDPA kernels that return the layer output and each row's log-sum-exp in one call.

Without gradients the lens takes the row normaliser from the kernel and scores only the keys of
its sets (``|Q| x |I u S|`` work instead of ``|Q| x L``): the CPU flash kernel, and on CUDA the
flash (half precision, no mask) or memory-efficient kernel -- the ones
``F.scaled_dot_product_attention`` itself dispatches to for these inputs, so the layer output is
what an SDPA model computes.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv


def kernel_lse_usable(module, query, key, dropout, kwargs) -> bool:
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


def sdpa_with_lse(module, query, key, value, attention_mask, scale: float):
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


def warn_kernel_fallback(err: Exception) -> None:
    global _FALLBACK_WARNED
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED = True
        import warnings

        warnings.warn(f"attention lens: the SDPA kernel with log-sum-exp failed ({err}); "
                      "scoring whole rows instead (exact, slower)", RuntimeWarning, stacklevel=3)

