"""A tiny random-weight Qwen3 text model that real vLLM (CPU build) can serve, built offline.

The reason and anchor teachers of the paper are text-only Qwen3 models; this is their shape in
miniature: ``Qwen3ForCausalLM`` (q/k norms, GQA), the project's byte-level BPE tokenizer plus
``<think>``/``</think>``, and a Qwen-style chat template honouring ``enable_thinking``. vLLM's
CPU attention needs a head size it has kernels for (64 works, 16 does not), hence 2 heads of 64.
Its weights are random: what it writes means nothing, the protocol around it is real.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock

from pipeline.vlm.tiny import train_tokenizer

TINY_LM_VERSION = "v2"
SERVED_NAME = "tiny-qwen3"
THINK_TOKENS = ("<think>", "</think>")

# No whitespace control: transformers and vLLM render with trim_blocks, which already drops
# the newline after a block tag; the newlines kept here follow text or expressions.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}{% else %}"
    "{% for part in message.content %}{% if part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def tiny_lm_path(cache_dir: str | Path | None = None) -> Path:
    """Build (once, atomically) and return the tiny model folder under ``$AVAR_CACHE``."""
    root = Path(cache_dir or os.environ.get("AVAR_CACHE") or Path.home() / ".cache" / "avar")
    final = root / "models" / f"tiny-qwen3-lm-{TINY_LM_VERSION}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "config.json").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            build_tiny_lm(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def build_tiny_lm(out_dir: Path, seed: int = 0) -> Path:
    import transformers

    tokenizer = train_tokenizer(vocab_size=2048, seed=seed)
    tokenizer.add_tokens(list(THINK_TOKENS))
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    config = transformers.Qwen3Config(
        vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=8192, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "avar_tiny_lm.json").write_text(json.dumps({"version": TINY_LM_VERSION, "seed": seed}))
    return out_dir
