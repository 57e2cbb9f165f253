"""How exact the lens is, in float32 and in bfloat16, on a model with the real head size (CPU).

The lens reads the masses off extra value columns of one SDPA call, so in bfloat16 they pass
through the kernel's low-precision ``P @ V``. This measures, on ``bench/vas.py``'s head-size-128
model and one chat sample (``--length`` tokens, queries U and R):

- float32 lens vs float32 eager ``output_attentions=True`` (the lens' error in float32);
- bfloat16 lens vs the exact float32 softmax of the very query/key tensors its bfloat16 layers
  saw (the lens' own error in bfloat16, free of the bfloat16 forward's drift);
- bfloat16 eager vs float32 eager (that drift alone, no lens);

for the masses (largest error over layers, heads and rows, relative to the largest mass) and for
the per-sample VAS built from them (the paper's mean of per-head ratios, relative error).

    python -m bench.lens_precision [--length 2048]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench import _gpu_exactness as exact
from bench.vas import build_model, make_inputs
from pipeline.paper import EPS


def vas(masses: dict, queries) -> dict:
    """Per query set, the paper's VAS from ``{"U image": [layers, heads, |Q|], ...}``."""
    return {q: float((masses[f"{q} image"].double() / (masses[f"{q} system"].double() + EPS)).mean()) for q in queries}


def measure(length: int) -> dict:
    from pipeline.vlm import load_model_and_processor

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = load_model_and_processor(build_model(Path(tmp), 128), dtype=torch.float32)
    model.eval()
    inputs, spans = make_inputs(processor, length)
    spans = exact.spans_to(spans, "cpu")
    queries = {"U": spans["user"], "R": spans["response"]}
    out = {"length": length, **{f"n_{k}": int(v.sum()) for k, v in spans.items()}}
    with torch.no_grad():
        eager32 = exact._eager_masses(model, inputs, spans, queries)
        lens32, _ = exact._lens_masses(model, inputs, spans, queries)
        model.to(torch.bfloat16)
        lens16, same_qk = exact._lens_masses(model, inputs, spans, queries, same_qk=True)
        eager16 = exact._eager_masses(model, inputs, spans, queries)
    for name, got, ref in (("float32 lens vs float32 eager", lens32, eager32),
                           ("bfloat16 lens vs same q/k float32", lens16, same_qk),
                           ("bfloat16 eager vs float32 eager", eager16, eager32)):
        row = {key: exact.rel_err(got[key], ref[key]) for key in ref}
        got_vas, ref_vas = vas(got, queries), vas(ref, queries)
        row.update({f"VAS {q}": abs(got_vas[q] - ref_vas[q]) / abs(ref_vas[q]) for q in queries})
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    args = parser.parse_args()
    result = measure(args.length)
    print(json.dumps(result, indent=2))
    keys = [k for k in result["float32 lens vs float32 eager"]]
    print(f"\nLens exactness, head size 128, {args.length} tokens, CPU (relative error: masses = largest error "
          f"over layers, heads and rows / largest mass; VAS = per-sample relative error)\n")
    print("| comparison | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name in ("float32 lens vs float32 eager", "bfloat16 lens vs same q/k float32", "bfloat16 eager vs float32 eager"):
        print(f"| {name} | " + " | ".join(f"{result[name][k]:.1e}" for k in keys) + " |")


if __name__ == "__main__":
    main()
