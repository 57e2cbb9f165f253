"""The exactness half of ``bench/gpu.py``: the lens against eager attention on the device.

``tiny_exactness``: the family's tiny test model (a left-padded batch of 3 chats, one with two
images), lens masses against eager ``output_attentions=True`` in float32 and bfloat16, plus the
parameter gradients of an AGTO-like loss through the lens against autograd through eager maps.

``shape_exactness``: the real-shaped random-weight model on one long sample, split so that each
number says one thing:

- ``float32 lens vs float32 eager``: the lens' error (one SDPA call on augmented values);
- ``bfloat16 lens vs float32 eager``: what a bfloat16 VAS run differs from a float32 one by;
- ``bfloat16 lens vs same q/k``: the lens against the exact float32 softmax of the very
  query/key tensors its bfloat16 layer saw (the lens' own error in bfloat16);
- ``bfloat16 eager vs float32 eager``: the bfloat16 forward's drift alone, no lens involved.

(Underscore name: ``make bench`` runs every ``bench/[a-z]*.py``; this is a part of one.)
"""

from __future__ import annotations

import copy

import torch

SETS = ("image", "system")


def to_device(inputs, device, dtype=None):
    return {k: (v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device))
            for k, v in inputs.items()}


def spans_to(spans, device):
    return {name: getattr(spans, name).to(device) for name in ("system", "image", "user", "response")}


def rel_err(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def _errors(prefix: str, got: dict, ref: dict) -> dict:
    out = {}
    for key, expected in ref.items():
        out[f"{prefix} {key} rel_err"] = rel_err(got[key], expected)
        out[f"{prefix} {key} abs_err"] = float((got[key] - expected).abs().max())
    return out


def tiny_exactness(device, tiny_name: str) -> dict:
    from pipeline.lens import AttentionLens
    from pipeline.vlm import load_model_and_processor, resolve_model_name
    from tests.support.lens import SAMPLES, chat_batch

    path = resolve_model_name(tiny_name)
    model, processor = load_model_and_processor(path, dtype=torch.float32, attn_implementation="sdpa")
    eager, _ = load_model_and_processor(path, dtype=torch.float32, attn_implementation="eager")
    model, eager = model.to(device).eval(), eager.to(device).eval()
    out: dict = {}

    def case(name, samples, dtype):
        cpu_inputs, cpu_spans = chat_batch(processor, "left", samples=samples)
        inputs, spans = to_device(cpu_inputs, device), spans_to(cpu_spans, device)
        query, image, system = spans["response"], spans["image"], spans["system"]
        attn = torch.stack(list(eager(**inputs, output_attentions=True).attentions))
        refs = {"image": (attn * image[None, :, None, None, :]).sum(-1) * query[None, :, None, :],
                "system": (attn * system[None, :, None, None, :]).sum(-1) * query[None, :, None, :]}
        # a copy: casting the model to bfloat16 and back would round its float32 weights, and every
        # later comparison against eager (the gradients) would measure that rounding
        lensed = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        with AttentionLens(lensed).capture(query, image, system) as cap:
            lensed(**to_device(cpu_inputs, device, dtype))
        out[name] = {"padded": bool((inputs["attention_mask"] == 0).any()),
                     **{f"{key}_rel_err": rel_err(cap.dense(key), ref) for key, ref in refs.items()},
                     **{f"{key}_abs_err": float((cap.dense(key) - ref).abs().max()) for key, ref in refs.items()}}

    with torch.no_grad():
        case("float32 padded", SAMPLES, torch.float32)
        case("bfloat16 padded", SAMPLES, torch.bfloat16)
        case("bfloat16 one sample", SAMPLES[2:], torch.bfloat16)

    cpu_inputs, cpu_spans = chat_batch(processor, "left")
    inputs, spans = to_device(cpu_inputs, device), spans_to(cpu_spans, device)
    query, image, system = spans["response"], spans["image"], spans["system"]

    def eager_maps():
        attn = torch.stack(list(eager(**inputs, output_attentions=True).attentions))
        return ((attn * image[None, :, None, None, :]).sum(-1) * query[None, :, None, :],
                (attn * system[None, :, None, None, :]).sum(-1) * query[None, :, None, :])

    def loss(img, sys_):
        valid = query[None, :, None, :].expand_as(img)
        return -(img[valid] + 1e-6).log().mean() + (sys_[valid] + 1e-6).log().mean()

    eager.zero_grad()
    loss(*eager_maps()).backward()
    model.zero_grad()
    with AttentionLens(model).capture(query, image, system) as cap:
        model(**inputs)
    loss(cap.dense("image"), cap.dense("system")).backward()
    expected = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    out["gradient_params"] = len(got)
    nonzero = lambda grads: {n for n, g in grads.items() if g.abs().sum() > 0}  # a zero gradient is none
    out["gradient_same_params"] = nonzero(got) == nonzero(expected)
    out["gradient_rel_err_max_per_param"] = max(rel_err(got[n], expected[n]) for n in expected if expected[n].abs().max() > 0)
    diff = torch.cat([(got[n] - expected[n]).flatten() for n in expected])
    out["gradient_rel_err_global_l2"] = float(diff.norm() / torch.cat([g.flatten() for g in expected.values()]).norm())
    return out


def _eager_masses(model, inputs, spans, queries) -> dict:
    """``{"U image": [layers, heads, |U|], ...}`` from ``output_attentions=True``, in float32."""
    model.set_attn_implementation("eager")
    refs: dict = {}
    for attn in model(**inputs, output_attentions=True, logits_to_keep=1).attentions:
        for q_name, query in queries.items():
            rows = attn[0][:, query[0]].float()  # [heads, |Q|, L]
            for key in SETS:
                refs.setdefault(f"{q_name} {key}", []).append((rows * spans[key][0]).sum(-1))
    model.set_attn_implementation("sdpa")
    return {k: torch.stack(v) for k, v in refs.items()}


def _lens_masses(model, inputs, spans, queries, same_qk: bool = False) -> tuple[dict, dict]:
    """Lens masses per query set, and (``same_qk``) the exact float32 softmax of the query/key
    tensors each layer handed the kernel: the reference free of forward drift."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from pipeline.lens import AttentionLens
    from pipeline.lens import modules as attention

    lens, got, ref = AttentionLens(model), {}, {}
    real = attention.augmented_attention
    for q_name, query in queries.items():
        rows_q = query[0].nonzero().squeeze(-1)
        layers_ref: list = []

        def spy(module, q, k, v, sets, mask, scale, rows_q=rows_q, layers_ref=layers_ref, **kwargs):
            keys = repeat_kv(k, module.num_key_value_groups)[0].float()  # [heads, L, d]
            scores = (q[0][:, rows_q].float() @ keys.transpose(-1, -2)) * scale  # [heads, |Q|, L]
            if mask is None:  # batch of one, no padding: causal
                allowed = torch.arange(keys.shape[1], device=q.device)[None, :] <= rows_q[:, None]
            else:
                allowed = mask[0, 0][rows_q]
                allowed = allowed if allowed.dtype == torch.bool else allowed > torch.finfo(allowed.dtype).min / 2
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            layers_ref.append(torch.stack([(probs * spans[key][0]).sum(-1) for key in SETS]))
            return real(module, q, k, v, sets, mask, scale, **kwargs)

        if same_qk:
            attention.augmented_attention = spy
        try:
            with lens.capture(query, spans["image"], spans["system"]) as cap:
                model(**inputs, logits_to_keep=1)
        finally:
            attention.augmented_attention = real
        for i, key in enumerate(SETS):
            got[f"{q_name} {key}"] = cap.dense(key)[:, 0, :, rows_q].float()  # [layers, heads, |Q|]
            if same_qk:
                ref[f"{q_name} {key}"] = torch.stack([layer[i] for layer in layers_ref])
    return got, ref


def shape_exactness(model, inputs, spans) -> dict:
    """The four comparisons of the module docstring; ``model`` is float32 on entry and is left
    in bfloat16."""
    queries = {"U": spans["user"], "R": spans["response"]}
    out = {"length": int(inputs["input_ids"].shape[1]),
           **{f"n_{name}": int(mask.sum()) for name, mask in spans.items()}}
    with torch.no_grad():
        eager32 = _eager_masses(model, inputs, spans, queries)
        lens32, _ = _lens_masses(model, inputs, spans, queries)
        out.update(_errors("float32 lens vs float32 eager:", lens32, eager32))
        del lens32
        model.to(torch.bfloat16)
        lens16, same_qk = _lens_masses(model, inputs, spans, queries, same_qk=True)
        out.update(_errors("bfloat16 lens vs float32 eager:", lens16, eager32))
        out.update(_errors("bfloat16 lens vs same q/k:", lens16, same_qk))
        del lens16, same_qk
        eager16 = _eager_masses(model, inputs, spans, queries)
        out.update(_errors("bfloat16 eager vs float32 eager:", eager16, eager32))
    return out
