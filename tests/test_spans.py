"""Spans on real chat-template token ids, checked against an independent construction.

The reference labels come from tokenising the template's pieces separately (header, content,
delimiters), labelling each piece, and concatenating; the test first asserts that this
concatenation equals the processor's ids, so the labels are a valid ground truth.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.vlm import build_inputs
from pipeline.vlm.spans import (
    ROLE_ASSISTANT,
    ROLE_NONE,
    ROLE_OTHER,
    ROLE_SYSTEM,
    ROLE_USER,
    SpecialTokens,
    compute_spans,
)
from tests.support.images import make_image

SPAN_NAMES = ("system", "image", "user", "response")
N_RANDOM = 36
SYSTEM_PROMPT = "You are a helpful assistant."


def _reference(tokenizer, conversation, pads_per_image, system_default=True):
    """(ids, labels) from the pieces of the Qwen-VL template, tokenised one by one."""
    pieces: list[tuple[str, str | None]] = []
    messages = list(conversation)
    if system_default and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, *messages]
    images = iter(pads_per_image)
    label_of = {"system": "system", "user": "user", "assistant": "response"}
    for message in messages:
        role = message["role"]
        pieces += [("<|im_start|>", None), (role, None), ("\n", None)]
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part["type"] == "image":
                pieces += [("<|vision_start|>", None), ("<|image_pad|>" * next(images), "image"),
                           ("<|vision_end|>", None)]
            elif pieces[-1][1] == label_of[role]:  # adjacent text parts tokenise as one text
                pieces[-1] = (pieces[-1][0] + part["text"], label_of[role])
            else:
                pieces.append((part["text"], label_of[role]))
        pieces += [("<|im_end|>", "response" if role == "assistant" else None), ("\n", None)]
    ids, labels = [], []
    for text, label in pieces:
        piece_ids = tokenizer.encode(text, add_special_tokens=False)
        ids += piece_ids
        labels += [label] * len(piece_ids)
    return ids, labels


def _check_against_reference(processor, conversation, images, padding_side="right"):
    batch = build_inputs(processor, [conversation], [images], padding_side=padding_side)
    merge = processor.image_processor.merge_size
    pads = ([int(g.prod()) // merge**2 for g in batch["image_grid_thw"]]
            if "image_grid_thw" in batch else [])
    ids, labels = _reference(processor.tokenizer, conversation, pads)
    assert batch["input_ids"][0].tolist() == ids, "independent construction must match template"
    spans = compute_spans(batch["input_ids"], batch["attention_mask"], processor)
    for name in SPAN_NAMES:
        expected = torch.tensor([label == name for label in labels])
        got = getattr(spans, name)[0]
        assert torch.equal(got, expected), f"span {name}: {got.nonzero().flatten().tolist()} " \
                                           f"!= {expected.nonzero().flatten().tolist()}"
    return batch, spans


def _qa(question, answer, n_images=1):
    user = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_single_image_sample_exact_positions_and_text(tiny_processor):
    conversation = _qa("What is the angle at B?", "<think>Look back at B.</think><answer>40</answer>")
    batch, spans = _check_against_reference(tiny_processor, conversation, [make_image(0)])
    tok, ids = tiny_processor.tokenizer, batch["input_ids"][0]
    assert tok.decode(ids[spans.system[0]]) == SYSTEM_PROMPT
    assert tok.decode(ids[spans.user[0]]) == "What is the angle at B?"
    assert tok.decode(ids[spans.response[0]]) == \
        "<think>Look back at B.</think><answer>40</answer><|im_end|>"
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and not spans.system[0, 0]
    assert torch.equal(spans.last_response, spans.response)


def test_several_images_count_matches_grid(tiny_processor):
    images = [make_image(1, (64, 48)), make_image(2, (120, 90)), make_image(3, (30, 200))]
    conversation = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"},
        {"type": "text", "text": " and"}, {"type": "image"}, {"type": "text", "text": " now."}]},
        {"role": "assistant", "content": "They differ."}]
    batch, spans = _check_against_reference(tiny_processor, conversation, images)
    merge = tiny_processor.image_processor.merge_size
    expected = int((batch["image_grid_thw"].prod(dim=1) // merge**2).sum())
    assert int(spans.image.sum()) == expected == int(spans.counts()["image"][0])
    assert tiny_processor.tokenizer.decode(batch["input_ids"][0][spans.user[0]]) == "Compare and now."


def test_explicit_system_prompt_and_multi_turn(tiny_processor):
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "First?"}]},
        {"role": "assistant", "content": "One."},
        {"role": "user", "content": [{"type": "text", "text": "Second?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two."}]},
    ]
    batch, spans = _check_against_reference(tiny_processor, conversation,
                                            [make_image(4), make_image(5)])
    tok, ids = tiny_processor.tokenizer, batch["input_ids"][0]
    assert tok.decode(ids[spans.system[0]]) == "Answer briefly."
    assert tok.decode(ids[spans.user[0]]) == "First?Second?"
    assert tok.decode(ids[spans.response[0]]) == "One.<|im_end|>Two.<|im_end|>"
    assert tok.decode(ids[spans.last_response[0]]) == "Two.<|im_end|>"
    turns = spans.turn[0][spans.response[0]].unique().tolist()
    assert turns == [2, 4]
    assert set(spans.role[0][spans.user[0]].tolist()) == {ROLE_USER}
    assert set(spans.role[0][spans.system[0]].tolist()) == {ROLE_SYSTEM}


def test_response_equals_trl_assistant_mask(tiny_processor):
    conversation = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."},
                    {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "\n\nYes"}]
    out = tiny_processor.tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    spans = compute_spans(torch.tensor(out["input_ids"]), None, tiny_processor)
    assert spans.response[0].tolist() == [bool(m) for m in out["assistant_masks"]]


def test_response_equals_assistant_mask_of_processor_chat_template_with_images(tiny_processor):
    """The path TRL's vision collator takes (images inside messages, right padding)."""
    messages = [
        [{"role": "user", "content": [{"type": "image", "image": make_image(0)},
                                      {"type": "text", "text": "What is x?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "<think>a</think>"}]}],
        [{"role": "user", "content": [{"type": "image", "image": make_image(1, (100, 80))},
                                      {"type": "text", "text": "A longer question here?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "B"}]}],
    ]
    out = tiny_processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt",
        return_assistant_tokens_mask=True,
        processor_kwargs={"padding": True, "padding_side": "right", "add_special_tokens": False})
    spans = compute_spans(out["input_ids"], out["attention_mask"], tiny_processor)
    assert (out["attention_mask"] == 0).any()
    assert torch.equal(spans.response, out["assistant_masks"].bool())
    merge = tiny_processor.image_processor.merge_size
    assert spans.image.sum(dim=1).tolist() == (out["image_grid_thw"].prod(dim=1) // merge**2).tolist()


def test_generation_prompt_adds_no_response(tiny_processor):
    conversation = _qa("Q?", "A.") + [{"role": "user", "content": "Again?"}]
    batch = build_inputs(tiny_processor, [conversation], [[make_image(0)]],
                         add_generation_prompt=True)
    spans = compute_spans(batch["input_ids"], batch["attention_mask"], tiny_processor)
    tok, ids = tiny_processor.tokenizer, batch["input_ids"][0]
    assert tok.decode(ids[spans.response[0]]) == "A.<|im_end|>"
    assert tok.decode(ids[spans.last_response[0]]) == "A.<|im_end|>"
    assert spans.role[0, -1] == ROLE_ASSISTANT and not spans.response[0, -3:].any()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_padding_gives_same_spans_as_unbatched(tiny_processor, padding_side):
    conversations = [_qa("Short?", "Yes."),
                     _qa("A much longer question about the picture?",
                         "<think>Check the image again.</think><answer>7</answer>", n_images=2),
                     [{"role": "user", "content": "No image here."},
                      {"role": "assistant", "content": "Fine."}]]
    images = [[make_image(0, (40, 40))], [make_image(1, (90, 60)), make_image(2)], []]
    batch = build_inputs(tiny_processor, conversations, images, padding_side=padding_side)
    spans = compute_spans(batch["input_ids"], batch["attention_mask"], tiny_processor)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    for i, (conversation, sample_images) in enumerate(zip(conversations, images)):
        single = build_inputs(tiny_processor, [conversation], [sample_images])
        alone = compute_spans(single["input_ids"], single["attention_mask"], tiny_processor)
        real = batch["attention_mask"][i].bool()
        assert torch.equal(batch["input_ids"][i][real], single["input_ids"][0])
        for name in (*SPAN_NAMES, "last_response"):
            mask = getattr(spans, name)[i]
            assert not mask[~real].any(), f"{name} covers padding"
            assert torch.equal(mask[real], getattr(alone, name)[0]), f"sample {i} span {name}"
        assert (spans.turn[i][~real] == -1).all() and (spans.role[i][~real] == ROLE_NONE).all()


def test_spans_are_disjoint_and_none_mask_means_all_real(tiny_processor):
    batch = build_inputs(tiny_processor, [_qa("Q?", "A.", n_images=2)],
                         [[make_image(0), make_image(1)]])
    with_mask = compute_spans(batch["input_ids"], batch["attention_mask"], tiny_processor)
    no_mask = compute_spans(batch["input_ids"][0], None, tiny_processor)  # 1-D input too
    total = sum(getattr(with_mask, n).long() for n in SPAN_NAMES)
    assert int(total.max()) == 1
    for name in SPAN_NAMES:
        assert torch.equal(getattr(with_mask, name), getattr(no_mask, name))


def test_sequence_without_system_turn_has_empty_system_span(tiny_processor):
    tok = tiny_processor.tokenizer
    ids, labels = _reference(tok, _qa("Q?", "A."), [3], system_default=False)
    spans = compute_spans(torch.tensor([ids]), None, tiny_processor)
    assert not spans.system.any()
    for name in SPAN_NAMES:
        assert spans.__dict__[name][0].tolist() == [label == name for label in labels]
    empty = [{"role": "system", "content": ""}, *_qa("Q?", "A.")]
    batch = build_inputs(tiny_processor, [empty], [[make_image(0)]])
    assert not compute_spans(batch["input_ids"], None, tiny_processor).system.any()


def test_truncated_response_runs_to_the_end(tiny_processor):
    batch = build_inputs(tiny_processor, [_qa("Q?", "A long answer that gets cut.")],
                         [[make_image(0)]])
    cut = batch["input_ids"][:, :-4]  # drops "<|im_end|>\n" and two content tokens
    spans = compute_spans(cut, None, tiny_processor)
    assert spans.response[0, -1] and spans.response[0].sum() > 0


def _random_conversation(rng):
    words = ["the", "angle", "x", "=", "40", "degrees.", "Check", "image", "again:", "<think>",
             "</think>", "<answer>", "B</answer>", "\n", "\n\n", "  ", "tab\t", "Wait,", "3/4"]

    def text():
        return "".join(rng.choice(words) + rng.choice(["", " ", " ", "\n"])
                       for _ in range(rng.randint(1, 12))).lstrip("\n ")

    conversation = []
    if rng.random() < 0.4:
        conversation.append({"role": "system", "content": text()})
    n_images = 0
    for _ in range(rng.randint(1, 3)):
        parts = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.35:
                parts.append({"type": "image"})
                n_images += 1
            else:
                parts.append({"type": "text", "text": text()})
        content = parts if rng.random() < 0.8 or n_images else text()
        conversation += [{"role": "user", "content": content},
                         {"role": "assistant", "content": text()}]
    return conversation, n_images


def test_random_conversations_match_reference_in_padded_batches(tiny_processor):
    import random
    rng = random.Random(1234)
    samples = [_random_conversation(rng) for _ in range(N_RANDOM)]
    for start in range(0, len(samples), 6):
        chunk = samples[start:start + 6]
        conversations = [c for c, _ in chunk]
        images = [[make_image(rng.randint(0, 99), (rng.randint(20, 120), rng.randint(20, 120)))
                   for _ in range(n)] for _, n in chunk]
        side = rng.choice(["left", "right"])
        batch = build_inputs(tiny_processor, conversations, images, padding_side=side)
        spans = compute_spans(batch["input_ids"], batch["attention_mask"], tiny_processor)
        merge = tiny_processor.image_processor.merge_size
        grids = iter((batch["image_grid_thw"].prod(dim=1) // merge**2).tolist()
                     if "image_grid_thw" in batch else [])
        for row, (conversation, n_images) in enumerate(chunk):
            pads = [next(grids) for _ in range(n_images)]
            ids, labels = _reference(tiny_processor.tokenizer, conversation, pads)
            real = batch["attention_mask"][row].bool()
            assert batch["input_ids"][row][real].tolist() == ids, f"sample {start + row}"
            for name in SPAN_NAMES:
                expected = [label == name for label in labels]
                assert getattr(spans, name)[row][real].tolist() == expected, \
                    f"sample {start + row}: span {name}"


# Synthetic ids: multi-token role names, a merged "\n\n" header token, unknown roles.
S, E, IMG, VS, VE, NL, NL2, PAD = 100, 101, 102, 103, 104, 10, 11, 0
SPECIAL = SpecialTokens(im_start=S, im_end=E, image_pad=IMG, vision_start=VS, vision_end=VE,
                        video_pad=105, pad=PAD,
                        role_headers=(("system", (20,)), ("user", (21, 22)),
                                      ("assistant", (23, 24, 25))),
                        newline_ids=frozenset({NL, NL2}))


def test_synthetic_headers_unknown_roles_and_merged_newlines():
    ids = [S, 20, NL, 50, 51, E, NL,             # system: content 50 51
           S, 21, 22, NL2, VS, IMG, IMG, VE, 52, E, NL,  # user (2-token name, "\n\n" header)
           S, 30, NL, 53, E, NL,                 # tool turn: unknown role
           S, 21, NL, 54, E, NL,                 # "u" + "\n": not a user header -> other
           S, 23, 24, 25, NL, 55, 56, E, NL,     # assistant (3-token name)
           PAD, PAD]
    mask = [1] * (len(ids) - 2) + [0, 0]
    spans = compute_spans(torch.tensor([ids]), torch.tensor([mask]), SPECIAL)
    ids_t = torch.tensor(ids)
    assert ids_t[spans.system[0]].tolist() == [50, 51]
    assert ids_t[spans.user[0]].tolist() == [52]
    assert ids_t[spans.image[0]].tolist() == [IMG, IMG]
    assert ids_t[spans.response[0]].tolist() == [55, 56, E]
    assert spans.role[0, 21].item() == ROLE_OTHER and spans.role[0, 27].item() == ROLE_OTHER
    assert spans.turn[0].tolist()[-3:] == [4, -1, -1]


def test_input_validation_errors():
    with pytest.raises(ValueError, match="input_ids must be"):
        compute_spans(torch.zeros(1, 2, 3, dtype=torch.long), None, SPECIAL)
    with pytest.raises(ValueError, match="integer token ids"):
        compute_spans(torch.zeros(1, 4), None, SPECIAL)
    with pytest.raises(ValueError, match="attention_mask shape"):
        compute_spans(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5), SPECIAL)


def test_special_tokens_from_tokenizer(tiny_processor):
    special = SpecialTokens.from_tokenizer(tiny_processor)
    tok = tiny_processor.tokenizer
    assert special is SpecialTokens.from_tokenizer(tok)  # cached per tokenizer
    assert special.image_pad == tok.convert_tokens_to_ids("<|image_pad|>")
    assert special.im_start == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.encode("\n", add_special_tokens=False)[0] in special.newline_ids
    assert dict(special.role_headers)["user"] == tuple(tok.encode("user", add_special_tokens=False))


def test_special_tokens_refuses_non_chat_tokenizer():
    class Plain:
        pad_token_id = 0

        def get_vocab(self):
            return {"a": 0, "\n": 1}

        def encode(self, text, add_special_tokens=False):
            return [1]

    with pytest.raises(ValueError, match="<\\|im_start\\|>"):
        SpecialTokens.from_tokenizer(Plain())
