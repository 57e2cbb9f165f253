"""Which attention modules the lens observes, and how it takes them over for a ``with`` block.

:func:`patched_attention` registers one attention function with transformers'
``AttentionInterface`` (name :data:`IMPLEMENTATION`, masks from ``sdpa_mask``) and routes the
chosen decoder layers through it; on exit the previous implementation is restored. The function
computes, for a capturing layer, the layer output and every row's masses on the capture's key sets
in one SDPA call (:mod:`pipeline.lens.augmented`); it applies the key-column scaling of
:mod:`pipeline.lens.intervention` when one is installed; anything else runs transformers' own SDPA
forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pipeline.lens.augmented import CheckpointedMass, augmented_attention, query_rows

IMPLEMENTATION = "avar_sdpa"
"""Name under which the lens/intervention attention function is registered in transformers."""

LENS_ATTR = "_avar_lens_capture"  # module attribute holding the active Capture
SCALE_ATTR = "_avar_key_column_scale"  # module attribute holding the active KeyColumnScale


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
    :class:`pipeline.lens.intervention.KeyColumnScale`: ``attention(...)``, ``rows``, ``key_factor``)."""
    return patched_attention(modules, SCALE_ATTR, [patch] * len(modules))


def _register() -> None:
    if AttentionInterface._global_mapping.get(IMPLEMENTATION) is not _attention_forward:
        AttentionInterface.register(IMPLEMENTATION, _attention_forward)
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def checkpointing_layers(model: nn.Module, modules: Sequence[nn.Module]) -> dict[int, nn.Module]:
    """``layer_idx -> the module that checkpoints it`` (transformers' ``GradientCheckpointingLayer``
    holding the attention module), for the modules that have one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    wanted = {id(m): m.layer_idx for m in modules}
    found = {}
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            for child in layer.modules():
                if id(child) in wanted:
                    found[wanted[id(child)]] = layer
    return found


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered attention function: SDPA output (+ key scaling) and, if capturing, masses."""
    patch = getattr(module, SCALE_ATTR, None)
    capture = getattr(module, LENS_ATTR, None)  # a pipeline.lens.capture.Capture
    if capture is None:
        if patch is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        return patch.attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    sets = capture.indicators(query.shape[2], key.shape[2], query.device, value.dtype)
    kwargs = {**kwargs, "dropout": dropout}
    index, valid = capture.rows(query.device)
    if capture.checkpointed(module):  # recomputed in backward: keep SDPA's saved tensors as they are
        def attend(keys):
            out, _ = sdpa_attention_forward(module, query, keys, value, attention_mask, scaling=scale, **kwargs)
            return out, CheckpointedMass.apply(query, keys, value, sets, module, attention_mask, scale, kwargs,
                                               index, valid)
    else:
        def attend(keys):
            out, masses = augmented_attention(module, query, keys, value, sets, attention_mask, scale, **kwargs)
            return out, query_rows(masses, index, valid)
    out, rows = attend(key) if patch is None else patch.rows_of(query, key, attend, index)
    capture.observe(module, rows)
    return out, None
