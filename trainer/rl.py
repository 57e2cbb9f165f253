"""VARS reinforcement learning: ``python -m trainer.rl --config configs/rl.yaml [--key value]``.

TRL's GRPOTrainer (group-normalized advantages, clipped ratio, optional KL via ``beta``; rollouts
with transformers ``generate`` or vLLM through ``use_vllm``) with three reward functions, so each
part is logged on its own (``rewards/r_acc/mean``, ``rewards/r_visual/mean``,
``rewards/r_format/mean``) and combined by ``reward_weights`` (1.0 / 0.3 / 0.1, SPEC "VARS"):

- ``r_acc``: the rollout's ``<answer>`` matches the gold answer (:func:`pipeline.verify.answers_match`);
- ``r_visual``: the policy's own attention from its response tokens to the image, relative to the
  system prompt (:func:`pipeline.lens.objectives.visual_reward`), measured by the lens on a
  teacher-forced forward of prompt + completion under ``no_grad``; 0 when the answer is wrong;
- ``r_format``: 1 when the whole completion is ``<think>...</think><answer>...</answer>``
  (:func:`pipeline.response_format.split_response`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from trl import GRPOTrainer

from pipeline.lens import AttentionLens
from pipeline.lens.budget import BUDGET_NAMES, attention_budget, budget_key_masks
from pipeline.lens.objectives import visual_reward
from pipeline.response_format import extract_answer, format_ok
from pipeline.verify import answers_match
from pipeline.vlm import adapter_for, build_inputs
from pipeline.vlm.spans import SpecialTokens, compute_spans
from trainer.configs import VARSConfig, parse_config
from trainer.data import load_table, rl_dataset, strip_nulls
from trainer.models import fit_and_save, load_for_training

logger = logging.getLogger("trainer.rl")
REWARD_NAMES = ("r_acc", "r_visual", "r_format")


def completion_text(completion: Any) -> str:
    """The text of one rollout: a string, or the assistant turns of a conversational completion."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(block.get("text") or "" for block in content if block.get("type") == "text")
    return "".join(parts)


def _column(values: Sequence | None, n: int) -> list:
    return list(values) if values is not None else [None] * n


class AccuracyReward:
    """``r_acc``: 1.0 when the rollout's last ``<answer>`` means the gold answer, else 0.0."""

    __name__ = "r_acc"

    def __call__(self, prompts: list, completions: list, answer: list[str], answer_type: list | None = None,
                 choices: list | None = None, **_: Any) -> list[float]:
        n = len(completions)
        types, options = _column(answer_type, n), _column(choices, n)
        rewards = []
        for completion, gold, kind, choice_list in zip(completions, answer, types, options, strict=True):
            predicted = extract_answer(completion_text(completion))
            ok = predicted is not None and answers_match(predicted, gold, kind or "text", choice_list or None)
            rewards.append(1.0 if ok else 0.0)
        return rewards


class FormatReward:
    """``r_format``: 1.0 when the whole completion is ``<think>...</think>\\s*<answer>...</answer>``."""

    __name__ = "r_format"

    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        return [1.0 if format_ok(completion_text(c)) else 0.0 for c in completions]


class VisualReward:
    """``r_visual``: correctness-gated attention of the policy's response tokens on the image.

    Needs the policy: :meth:`bind` it to the trainer's model after the trainer is built. The
    forward is prompt (left-padded, as generated) + completion ids (right-padded), so the lens sees
    exactly the tokens the policy produced.
    """

    __name__ = "r_visual"

    def __init__(self, processor: Any, layers: Sequence[int] | None = None, eps: float = 1e-6,
                 batch_size: int = 4, max_pixels: int | None = None,
                 accuracy: Callable[..., list[float]] | None = None, form: str = "ratio"):
        self.processor = processor
        self.form = form  # "ratio" (paper) or "image_share" (bounded guard)
        self.layers = list(layers) if layers is not None else None
        self.eps, self.batch_size, self.max_pixels = eps, max(1, int(batch_size)), max_pixels
        self.accuracy = accuracy or AccuracyReward()
        self.special = SpecialTokens.from_tokenizer(processor)
        self._model_source: Callable[[], torch.nn.Module] | None = None
        self._lens: AttentionLens | None = None

    def bind(self, model_source: torch.nn.Module | Callable[[], torch.nn.Module]) -> VisualReward:
        """Use this model (or a callable returning the current one) for the measurement."""
        self._model_source = model_source if callable(model_source) and not isinstance(
            model_source, torch.nn.Module) else (lambda: model_source)
        self._lens = None
        return self

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 images: list | None = None, log_metric: Callable | None = None, **kwargs: Any) -> list[float]:
        if self._model_source is None:
            raise RuntimeError("VisualReward is not bound to a model; call .bind(model) first")
        correct = [r > 0 for r in self.accuracy(prompts=prompts, completions=completions,
                                                completion_ids=completion_ids, images=images, **kwargs)]
        images = _column(images, len(prompts))
        gated, raw, shares = [], [], []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            r_gated, r_raw, r_shares = self.measure(prompts[start:stop], completion_ids[start:stop],
                                                    images[start:stop], correct[start:stop])
            gated += r_gated
            raw += r_raw
            shares += r_shares
        if log_metric is not None:  # the ungated value shows whether attention itself moves
            log_metric("r_visual_ungated", sum(raw) / len(raw))
            for k, name in enumerate(BUDGET_NAMES):  # where the response's attention goes
                values = [row[k] for row in shares if row[k] == row[k]]
                if values:
                    log_metric(f"budget/{name}", sum(values) / len(values))
        return gated

    @torch.no_grad()
    def measure(self, prompts: list, completion_ids: list[list[int]], images: list,
                correct: list[bool]) -> tuple[list[float], list[float], list[list[float]]]:
        """``(gated, ungated, budget shares)`` of a chunk of rollouts (shares in
        :data:`~pipeline.lens.budget.BUDGET_NAMES` order)."""
        model = self._model_source()
        if self._lens is None or self._lens.model is not model:
            self._lens = AttentionLens(model, layers=self.layers)
        conversations = [strip_nulls(p) for p in prompts]
        image_lists = [[im for im in (imgs or [])] for imgs in images]
        batch = build_inputs(self.processor, conversations, image_lists, add_generation_prompt=True,
                             padding_side="left", max_pixels=self.max_pixels)
        pad = self.special.pad if self.special.pad is not None else self.special.im_end
        width = max(1, max(len(ids) for ids in completion_ids))
        completion = torch.full((len(completion_ids), width), pad, dtype=torch.long)
        completion_mask = torch.zeros_like(completion)
        for i, ids in enumerate(completion_ids):
            completion[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            completion_mask[i, :len(ids)] = 1
        inputs = dict(batch)
        inputs["input_ids"] = torch.cat([batch["input_ids"], completion], dim=1)
        inputs["attention_mask"] = torch.cat([batch["attention_mask"], completion_mask], dim=1)
        for key in ("mm_token_type_ids", "token_type_ids"):  # Qwen3-VL's / Gemma 3's image marks
            if key in inputs:
                inputs[key] = torch.cat([batch[key], torch.zeros_like(completion)], dim=1)
        device = next(model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        spans = compute_spans(inputs["input_ids"], inputs["attention_mask"], self.special).to(device)
        was_training = model.training
        model.eval()
        try:
            with self._lens.capture(spans.response, key_masks=budget_key_masks(spans)) as cap:
                model(**inputs, use_cache=False)
        finally:
            model.train(was_training)
        gate = torch.tensor(correct, device=device)
        gated = visual_reward(cap, eps=self.eps, correct=gate, form=self.form)
        raw = visual_reward(cap, eps=self.eps, form=self.form)
        budget = attention_budget(cap).overall
        return gated.float().cpu().tolist(), raw.float().cpu().tolist(), budget.float().cpu().tolist()


def make_rewards(config: VARSConfig, processor: Any) -> list[Callable]:
    """The three reward functions in ``reward_weights`` order (r_acc, r_visual, r_format)."""
    accuracy = AccuracyReward()
    visual = VisualReward(processor, layers=config.visual_layers, eps=config.visual_eps,
                          batch_size=config.visual_batch_size, max_pixels=config.max_pixels, accuracy=accuracy,
                          form=config.visual_form)
    return [accuracy, visual, FormatReward()]


def _suppress_non_text_tokens(config: VARSConfig, processor: Any) -> None:
    """Rollouts must never contain image/video/turn-start tokens: they would break the image
    features and the span structure of the teacher-forced forward (transformers generation only;
    TRL already suppresses the image token)."""
    if config.use_vllm:
        return
    special = SpecialTokens.from_tokenizer(processor)
    banned = sorted({*special.vision_ids, special.im_start})
    kwargs = dict(config.generation_kwargs or {})
    kwargs["suppress_tokens"] = sorted({*kwargs.get("suppress_tokens", []), *banned})
    config.generation_kwargs = kwargs


RewardFactory = Callable[[VARSConfig, Any], list[Callable]]


def build_trainer(config: VARSConfig, reward_factory: RewardFactory = make_rewards,
                  callbacks: list | None = None) -> GRPOTrainer:
    """Model, data, rewards and GRPOTrainer from a validated config (no training yet).

    ``reward_factory(config, processor)`` returns the reward functions in ``reward_weights``
    order; any :class:`VisualReward` among them is bound to the policy.
    """
    model, processor, peft_config = load_for_training(config)
    table = load_table(config.dataset, split=config.dataset_split, config=config.dataset_config,
                       max_samples=config.max_train_samples)
    rewards = reward_factory(config, processor)
    if len(rewards) != len(config.reward_weights or REWARD_NAMES):
        raise ValueError(f"{len(rewards)} reward functions for reward_weights={config.reward_weights}")
    _suppress_non_text_tokens(config, processor)
    train = rl_dataset(table, system_prompt=config.system_prompt,
                       folded=adapter_for(model).chat_format.folded_system)
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=train,
                          processing_class=processor, peft_config=peft_config, callbacks=callbacks)
    for reward in rewards:
        inner = getattr(reward, "inner", reward)  # wrappers (e.g. recorders) expose what they wrap
        if isinstance(inner, VisualReward):
            inner.bind(lambda: trainer.accelerator.unwrap_model(trainer.model))
    return trainer


def train(config: VARSConfig, reward_factory: RewardFactory = make_rewards,
          callbacks: list | None = None) -> GRPOTrainer:
    return fit_and_save(build_trainer(config, reward_factory, callbacks), config.resume_from_checkpoint)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"))
    config = parse_config(VARSConfig, argv)
    trainer = train(config)
    if trainer.is_world_process_zero():
        logger.info("done: %d steps, model in %s", trainer.state.global_step, config.output_dir)


if __name__ == "__main__":
    main()
