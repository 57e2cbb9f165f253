"""The attention lens: exact attention mass on key sets, without materialising attention maps.

Modules: :mod:`~pipeline.lens.modules` (which layers, the registered attention function),
:mod:`~pipeline.lens.augmented` (the layer output and the masses from one SDPA call),
:mod:`~pipeline.lens.capture` (the user API), :mod:`~pipeline.lens.objectives` (VAS, AGTO, VARS
as reductions of a capture), :mod:`~pipeline.lens.budget` (the attention budget) and
:mod:`~pipeline.lens.intervention` (key-column logit scaling).

AVAR's statistics (VAS, the AGTO loss terms, the VARS reward) all need, for some query tokens
``q`` and each layer and head, the post-softmax attention mass on the image tokens ``I`` and on
the system tokens ``S``. ``output_attentions=True`` would give them, but only on the eager path,
which builds a ``[B, H, L, L]`` tensor per layer (quadratic memory, several times slower), and a
flash-attention model returns no weights at all (a defect of the reference code). The lens
instead:

* installs, for the duration of a ``with`` block, one attention function through transformers'
  ``AttentionInterface`` (name :data:`IMPLEMENTATION`, masks built by ``sdpa_mask``);
* in the selected layers, appends to the value vectors one column per key set (its indicator)
  and one of ones (``total``), zero-pads queries and keys to the same width, and makes one
  ``F.scaled_dot_product_attention`` call (through transformers' own SDPA forward): the first
  ``head_dim`` output columns are the layer output, the next ones each row's mass on each set
  (``sum_k P[q, k] 1_K(k)``). The scores are those of the model (zeros add nothing, the softmax
  scale is the real head size's), so the output is an SDPA model's and the masses are exact; the
  cost is that of a forward with a few more value columns, for every query row and key set at once;
* is differentiable through SDPA's own backward (AGTO trains through it); layers under
  activation checkpointing compute their masses with an autograd function that runs the same
  call again in backward, so the recomputation after the capture block sees what it expects.

Usage::

    lens = AttentionLens(model, layers=None)          # all decoder layers
    with lens.capture(query_mask, image_mask=image_mask, system_mask=system_mask) as cap:
        model(**inputs)
    cap.image   # [n_layers, B, H, Qmax] mass on image keys, per selected query (compact)
    cap.dense("image")  # [n_layers, B, H, L], zero outside the query mask
    cap.restricted(other_mask).image  # the same forward seen from a subset of the queries

Masks are boolean ``[B, L]`` over the sequence given to the model (left or right padding both
fine; selected queries must be real tokens). Inside the block the decoder runs SDPA whatever
implementation the model was loaded with (eager, flash-attention); the vision tower is left
alone. With attention dropout (none of the supported families uses any) the masses are those of
the dropped-out probabilities.

The same attention function also applies the inference-time key-column logit scaling of
:mod:`pipeline.lens.intervention` (a ``KeyColumnScale`` set on a module), so the lens measures an
intervened model exactly.
"""


from pipeline.lens.capture import AttentionLens, Capture
from pipeline.lens.modules import IMPLEMENTATION, decoder_attention_modules, resolve_layers

__all__ = ["IMPLEMENTATION", "AttentionLens", "Capture", "decoder_attention_modules", "resolve_layers"]
