"""The attention lens: exact attention mass on key sets, without materialising attention maps.

Modules: :mod:`~pipeline.lens.modules` (which layers, the registered attention function),
:mod:`~pipeline.lens.kernels` (SDPA kernels with row log-sum-exp), :mod:`~pipeline.lens.mass`
(the chunked mass computation and its backward), :mod:`~pipeline.lens.capture` (the user API),
:mod:`~pipeline.lens.objectives` (VAS, AGTO, VARS as reductions of a capture) and
:mod:`~pipeline.lens.intervention` (key-column logit scaling).


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
:mod:`pipeline.lens.intervention` (a ``KeyColumnScale`` set on a module), so the lens measures an
intervened model exactly.
"""


from pipeline.lens.capture import DEFAULT_CHUNK_BYTES, AttentionLens, Capture
from pipeline.lens.modules import IMPLEMENTATION, decoder_attention_modules, resolve_layers

__all__ = ["DEFAULT_CHUNK_BYTES", "IMPLEMENTATION", "AttentionLens", "Capture",
           "decoder_attention_modules", "resolve_layers"]
