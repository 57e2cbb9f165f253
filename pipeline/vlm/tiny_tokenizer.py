"""The byte-level BPE tokenizers of the tiny models, trained offline on an embedded corpus."""

from __future__ import annotations

import json
import random

# The Qwen2.5-VL special tokens, in the stock order (ids follow the trained vocabulary).
QWEN_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

_CORPUS = """\
You are a helpful assistant.
Look at the image and answer the question. Think step by step.
<think> Let me look back at the image. The triangle ABC has a right angle at C. </think>
<answer> 40 </answer>
The angle at B is marked 40 degrees, so the angle at A is 180 - 90 - 40 = 50 degrees.
Check the image again: the bar for March is taller than the bar for April.
The circle has radius 3, so its area is 9 pi and its circumference is 6 pi.
Wait, I should double-check this step. The length of the side is 5, not 4.
In the figure, the line segment AB is parallel to CD, and angle 1 equals angle 2.
The table shows the number of students in each class: 12, 15, 18 and 21.
Therefore the answer is option B. The final answer is 7.
A rectangle has a width of 6 cm and a height of 4 cm; the perimeter is 20 cm.
The graph of y = 2x + 1 crosses the y-axis at 1 and has slope 2.
There are three red balls, two blue balls and one green ball in the picture.
The probability of drawing a red ball is 3/6 = 1/2.
Solve for x: 3x + 5 = 20, so 3x = 15 and x = 5.
The volume of the cube with edge 2 is 8 cubic units.
Looking at the chart again, the highest value is in the second column.
Let me verify: 12 times 4 equals 48, and 48 divided by 6 equals 8.
The shaded region is a quarter of the square, so its area is 25 / 4.
Hmm, that does not match the picture. Let me reconsider the diagram.
Question: What is the value of x in the figure? Choices: A. 30 B. 45 C. 60 D. 90
system user assistant
"""


def train_bpe(vocab_size: int, seed: int = 0, special_tokens: tuple[str, ...] = (),
              extra_lines: tuple[str, ...] = ()):
    """A byte-level BPE ``tokenizers.Tokenizer`` (Qwen's pre-tokenizer regex) trained on the
    embedded corpus plus seeded arithmetic sentences and ``extra_lines``, leaving room for
    ``special_tokens`` (added as specials when given)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(QWEN_VL_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=list(special_tokens))
    bpe.train_from_iterator(_corpus_lines(seed) + list(extra_lines), trainer)
    return bpe


def train_tokenizer(vocab_size: int = 4096, seed: int = 0, extra_lines: tuple[str, ...] = ()):
    """A byte-level BPE ``Qwen2Tokenizer`` (:func:`train_bpe`, with ``extra_lines`` in its corpus)
    with the Qwen-VL special tokens."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    bpe = train_bpe(vocab_size, seed, extra_lines=extra_lines)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges, unk_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               extra_special_tokens=list(QWEN_VL_SPECIAL_TOKENS),
                               model_max_length=32768)
    tokenizer.image_token = "<|image_pad|>"
    return tokenizer


def _corpus_lines(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = _CORPUS.splitlines() * 200  # weight real text so its words merge first
    words = sorted({w.strip(".,:;?") for line in lines for w in line.split()})
    # Seeded pseudo-words give the BPE enough distinct pairs for a few thousand merges.
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ar", "en")]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(4000)]
    for _ in range(4000):
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        lines.append(f"Step {rng.randint(1, 9)}: {a} + {b} = {a + b}, so x = {a * b}.")
        lines.append(" ".join(rng.choice(words) for _ in range(12)))
    return lines


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
