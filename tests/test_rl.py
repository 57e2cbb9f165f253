"""GRPO + VARS on the tiny Qwen2.5-VL: reward parts, the correctness gate, and logged = recomputed.

The reward recomputation here is independent of the trainer's path: attention comes from an
eager-attention copy of the policy with ``output_attentions=True`` (full maps), spans from raw
token ids, and the SPEC formula is written out below.

A random-weight policy never writes a correct ``<answer>``, which would make every gated
``r_visual`` zero; the GRPO run therefore uses a stand-in correctness rule (parity of the
completion ids) so that the gate passes some rollouts. The real ``answers_match`` gate is
tested on its own with a hand-written correct and wrong completion.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import datasets
import pytest
import torch

from pipeline.vlm import build_inputs, load_model_and_processor
from pipeline.vlm.spans import SpecialTokens
from trainer import rl
from trainer.configs import VARSConfig, parse_config
from trainer.data import load_table, rl_dataset

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "rl_tiny.yaml")
MAX_PIXELS = 12544  # as configs/rl_tiny.yaml
EPS = 1e-6
FORMAT = re.compile(r"\s*<think>.+?</think>\s*<answer>.+?</answer>\s*", re.DOTALL)


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    model, processor = load_model_and_processor(tiny_model_dir, attn_implementation="eager")
    return model.eval(), processor


def independent_r_visual(model, processor, prompt, images, completion_ids) -> float:
    """SPEC VARS r_visual (ungated) of one rollout from full eager attention maps."""
    batch = build_inputs(processor, [prompt], [images], add_generation_prompt=True, max_pixels=MAX_PIXELS)
    prompt_len = batch["input_ids"].shape[1]
    ids = torch.cat([batch["input_ids"], torch.tensor([completion_ids])], dim=1)
    inputs = dict(batch, input_ids=ids, attention_mask=torch.ones_like(ids))
    inputs["mm_token_type_ids"] = torch.cat(
        [batch["mm_token_type_ids"], torch.zeros(1, len(completion_ids), dtype=torch.long)], dim=1)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True, use_cache=False).attentions
    maps = torch.stack([a[0] for a in attentions]).double()  # [layers, heads, T, T]
    tokens = ids[0].tolist()
    image = torch.tensor([t == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") for t in tokens])
    system_ids = processor.tokenizer.encode("You are a helpful assistant.", add_special_tokens=False)
    start = next(i for i in range(len(tokens)) if tokens[i:i + len(system_ids)] == system_ids)
    system = torch.zeros(len(tokens), dtype=torch.bool)
    system[start:start + len(system_ids)] = True
    on_image = maps[:, :, :, image].sum(-1).sum(1)  # heads summed: [layers, T]
    on_system = maps[:, :, :, system].sum(-1).sum(1)
    ratio = on_image / (on_system + EPS)
    return float(ratio[:, prompt_len:].mean())


def test_format_reward():
    reward = rl.FormatReward()
    texts = ["<think>look</think><answer>3</answer>", "<think>a</think>\n <answer>b</answer>\n",
             "<answer>3</answer>", "<think>a</think><answer>3</answer> extra", "", "<think></think><answer>3</answer>"]
    assert reward(prompts=[None] * 6, completions=[assistant(t) for t in texts]) == [1, 1, 0, 0, 0, 0]


def test_accuracy_reward_reads_the_answer_tag():
    reward = rl.AccuracyReward()
    completions = [assistant("<think>red fill</think><answer>red</answer>"),
                   assistant("<think>..</think><answer>blue</answer>"),
                   assistant("red"),  # no answer tag: nothing to grade
                   assistant("<think>..</think><answer>(B)</answer>"),
                   assistant("<think>..</think><answer>0.5</answer>")]
    scores = reward(prompts=[None] * 5, completions=completions, answer=["red", "red", "red", "2", "1/2"],
                    answer_type=["text", "text", "text", "choice", "number"],
                    choices=[None, None, None, ["1", "2"], None])
    assert scores == [1.0, 0.0, 0.0, 1.0, 1.0]


def test_visual_reward_is_gated_and_equals_full_attention_maps(tiny_model_and_processor, eager):
    model, processor = tiny_model_and_processor
    row = rl_dataset(load_table("toy", max_samples=1))[0]
    right, wrong = "<think>fill</think><answer>{}</answer>".format(row["answer"]), "<think>x</think><answer>none</answer>"
    ids = [processor.tokenizer.encode(t + "<|im_end|>", add_special_tokens=False) for t in (right, wrong)]
    reward = rl.VisualReward(processor, max_pixels=MAX_PIXELS).bind(model)
    scores = reward(prompts=[row["prompt"]] * 2, completions=[assistant(right), assistant(wrong)],
                    completion_ids=ids, images=[row["images"]] * 2, answer=[row["answer"]] * 2,
                    answer_type=[row["answer_type"]] * 2, choices=[None, None])
    expected = independent_r_visual(eager[0], processor, row["prompt"], row["images"], ids[0])
    assert scores[0] == pytest.approx(expected, rel=1e-4)
    assert scores[0] > 0 and scores[1] == 0.0


class ParityCorrectness:
    """Stand-in for answers_match: a rollout is 'correct' when the sum of its token ids is even."""

    __name__ = "r_acc"

    def __call__(self, prompts, completions, completion_ids=None, **_):
        return [float(sum(ids) % 2 == 0) for ids in completion_ids]


class Recorder:
    """Wraps a reward function; keeps its inputs, outputs and (for r_visual) the policy weights."""

    def __init__(self, inner, snapshot=None):
        self.inner, self.snapshot, self.calls = inner, snapshot, []
        self.__name__ = inner.__name__

    def __call__(self, **kwargs):
        out = self.inner(**kwargs)
        weights = self.snapshot() if self.snapshot else None
        self.calls.append({**{k: kwargs[k] for k in ("prompts", "completions", "completion_ids", "images")},
                           "out": out, "weights": weights})
        return out


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    config = parse_config(VARSConfig, ["--config", TINY, "--output_dir", str(tmp_path_factory.mktemp("rl"))])
    recorders = []

    def factory(cfg, processor):
        parity = ParityCorrectness()
        visual = rl.VisualReward(processor, layers=cfg.visual_layers, eps=cfg.visual_eps,
                                 batch_size=cfg.visual_batch_size, max_pixels=cfg.max_pixels, accuracy=parity)

        def snapshot():
            return {k: v.detach().clone() for k, v in visual._model_source().state_dict().items()}

        recorders.extend([Recorder(parity), Recorder(visual, snapshot), Recorder(rl.FormatReward())])
        return recorders

    trainer = rl.train(config, reward_factory=factory)
    return trainer, recorders, recorders[1].calls[0]["weights"]


def test_grpo_runs_and_updates_the_policy(grpo_run):
    trainer, recorders, initial = grpo_run
    assert trainer.state.global_step == 3
    assert len(recorders[0].calls) == 3 and all(len(c["completions"]) == 4 for c in recorders[0].calls)
    final = trainer.model.state_dict()
    assert any(not torch.equal(initial[k], final[k]) for k in initial)  # some advantage was non-zero
    special = SpecialTokens.from_tokenizer(trainer.processing_class)
    banned = {*special.vision_ids, special.im_start}
    assert not any(banned & set(ids) for call in recorders[1].calls for ids in call["completion_ids"])


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_logged_reward_parts_equal_independent_recomputation(grpo_run, eager):
    trainer, recorders, _ = grpo_run
    model, processor = eager
    logs = [e for e in trainer.state.log_history if "rewards/r_acc/mean" in e]
    assert len(logs) == 3
    policy = copy.deepcopy(model)
    for step, (acc, vis, fmt) in enumerate(zip(*(r.calls for r in recorders))):
        policy.load_state_dict(vis["weights"])
        texts = [c[0]["content"] for c in fmt["completions"]]
        r_format = [float(FORMAT.fullmatch(t) is not None) for t in texts]
        correct = [sum(ids) % 2 == 0 for ids in vis["completion_ids"]]
        ungated = [independent_r_visual(policy, processor, p, im, ids)
                   for p, im, ids in zip(vis["prompts"], vis["images"], vis["completion_ids"])]
        r_visual = [u if ok else 0.0 for u, ok in zip(ungated, correct)]
        assert vis["out"] == pytest.approx(r_visual, rel=1e-4)
        assert logs[step]["rewards/r_acc/mean"] == pytest.approx(mean([float(c) for c in correct]), abs=1e-6)
        assert logs[step]["rewards/r_visual/mean"] == pytest.approx(mean(r_visual), rel=1e-4, abs=1e-7)
        assert logs[step]["rewards/r_format/mean"] == pytest.approx(mean(r_format), abs=1e-6)
        assert logs[step]["r_visual_ungated"] == pytest.approx(mean(ungated), rel=1e-4)
        weighted = [a + 0.3 * v + 0.1 * f for a, v, f in zip(map(float, correct), r_visual, r_format)]
        assert logs[step]["reward"] == pytest.approx(mean(weighted), rel=1e-4, abs=1e-7)


def test_paper_config_parses_to_paper_settings(tmp_path):
    paper = parse_config(VARSConfig, ["--config", str(ROOT / "configs" / "rl.yaml"), "--dataset", "toy",
                                      "--output_dir", str(tmp_path), "--bf16", "false", "--use_cpu", "true"])
    assert paper.reward_weights == [1.0, 0.3, 0.1]
    assert (paper.num_generations, paper.beta, paper.learning_rate, paper.num_train_epochs) == (8, 0.0, 1e-6, 4)
    # 8 GPUs: 16 x 16 x 8 completions = 256 prompts x 8 rollouts per generation batch
    assert paper.per_device_train_batch_size * paper.gradient_accumulation_steps * 8 // paper.num_generations == 256
    with pytest.raises(ValueError, match="reward_weights needs 3 values"):
        parse_config(VARSConfig, ["--config", TINY, "--output_dir", str(tmp_path), "--reward_weights", "1.0", "0.3"])


def test_rl_rows_need_a_gold_answer():
    from trainer.data import DataError, toy_table

    row = dict(toy_table(1)[0], answer="")
    with pytest.raises(DataError, match="missing gold answer") as error:
        rl_dataset(datasets.Dataset.from_list([row]))
    assert error.value.field == "answer" and error.value.row_id == row["id"]
