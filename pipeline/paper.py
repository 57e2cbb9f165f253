"""Numbers and conventions fixed by the paper (arXiv 2603.03825; see SPEC.md), in one place."""

EPS = 1e-6
"""eps of the VAS ratio ``sum_I A / (sum_S A + eps)`` and inside the AGTO logarithms."""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
"""The system turn whose tokens are the span ``S`` (Qwen2.5-VL's default system prompt)."""
