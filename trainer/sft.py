"""AGTO supervised fine-tuning: ``python -m trainer.sft --config configs/sft.yaml [--key value]``.

``L = L_LM + alpha * L_enh + beta * L_sup`` (SPEC "AGTO"). The LM loss is TRL's, on the
response tokens only (the chat template's generation markers); the AGTO terms come from the
attention lens (:mod:`pipeline.lens`) observing the SAME forward pass, with the user tokens
as queries and the image / system tokens as key sets (:mod:`pipeline.vlm.spans`), reduced by
:func:`pipeline.lens.objectives.agto_terms`. ``alpha = beta = 0`` is plain SFT: no lens runs.

Runs under ``accelerate launch`` (DDP, DeepSpeed, FSDP) like any TRL trainer; checkpoints and
``--resume_from_checkpoint`` are the Trainer's.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from pipeline.lens import AttentionLens
from pipeline.lens.budget import BUDGET_NAMES, attention_budget, budget_key_masks, ratio_of_means
from pipeline.lens.objectives import agto_applies, agto_terms, vas_ratio
from pipeline.vlm import adapter_for
from pipeline.vlm.spans import SpecialTokens, compute_spans
from trainer.configs import AGTOConfig, parse_config
from trainer.data import load_table, sft_dataset, strip_nulls
from trainer.models import fit_and_save, load_for_training

logger = logging.getLogger("trainer.sft")
BUDGET_PARTS = tuple(f"budget/{name}" for name in BUDGET_NAMES)  # user queries' attention shares
PARTS = ("lm_loss", "l_enh", "l_sup", "vas", "vas_ratio_of_means", *BUDGET_PARTS, "agto_samples")


class AVARVisionCollator(DataCollatorForVisionLanguageModeling):
    """TRL's vision collator, after removing the null keys Arrow adds to content blocks."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [{**example, "messages": strip_nulls(example["messages"])} for example in examples]
        return super().torch_call(examples)


class AGTOTrainer(SFTTrainer):
    """SFTTrainer whose loss adds the attention-guided terms measured in the same forward pass."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config: AGTOConfig = self.args
        self._special_tokens = SpecialTokens.from_tokenizer(self.processing_class)
        self._lens = AttentionLens(self.model, layers=config.agto_layers) if config.agto_enabled else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        config: AGTOConfig = self.args
        # When the LM loss is already a share of the whole accumulated batch (normalized by
        # num_items_in_batch), the Trainer does not divide by the accumulation steps, so the AGTO
        # terms (per-micro-batch means) are spread over them here, as TRL does for its aux loss.
        steps = self.current_gradient_accumulation_steps if self._loss_scaled_for_accumulation(num_items_in_batch) else 1
        lm_scale = steps / (self.accelerator.num_processes if config.average_tokens_across_devices
                            and num_items_in_batch is not None else 1)
        nan = float("nan")
        spans = None
        if self._lens is not None:
            spans = compute_spans(inputs["input_ids"], inputs.get("attention_mask"), self._special_tokens)
        if spans is None or not bool(spans.image.any()):  # plain SFT, or no image in this micro-batch
            lm_loss = super().compute_loss(model, inputs, False, num_items_in_batch)
            loss, parts = lm_loss, (lm_loss.detach() * lm_scale, *[nan] * (len(PARTS) - 2), 0.0)
        else:
            # the lens observes the very forward pass that produces the LM loss
            with self._lens.capture(spans.user, key_masks=budget_key_masks(spans)) as capture:
                lm_loss = super().compute_loss(model, inputs, False, num_items_in_batch)
            l_enh, l_sup = agto_terms(capture, eps=config.eps, reduction="mean", sup_floor=config.sup_floor)
            loss = lm_loss + (config.alpha * l_enh + config.beta * l_sup) / steps
            applies = agto_applies(capture)
            with torch.no_grad():
                vas = vas_ratio(capture, eps=config.eps)[applies]
                of_means = ratio_of_means(capture, eps=config.eps)[applies]
                budget = attention_budget(capture).overall[applies]  # [n, 5]
            mean = (lambda t: t.mean(0) if t.numel() else torch.full(t.shape[1:], nan))
            parts = (lm_loss.detach() * lm_scale, l_enh.detach(), l_sup.detach(),
                     vas.mean() if vas.numel() else nan, of_means.mean() if of_means.numel() else nan,
                     *mean(budget).tolist(), float(applies.sum()))
        self._log_parts(parts)
        if return_outputs:  # outside the capture: TRL's own path would run a second forward in it
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether ``Trainer.training_step`` leaves the loss undivided by the accumulation steps
        (the same rule as ``Trainer.training_step``)."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
            self.compute_loss_func is not None

    def _log_parts(self, parts: tuple) -> None:
        """Average the loss parts over processes (every rank calls this once per micro-batch, so the
        collective stays in step even when only some ranks had images)."""
        mode = "train" if self.model.training else "eval"
        values = torch.tensor([float(p) for p in parts], device=self.accelerator.device)
        gathered = self.accelerator.gather(values[None]).view(-1, len(PARTS))
        for name, column in zip(PARTS, gathered.T, strict=True):
            if name == "agto_samples":
                if self._lens is not None:
                    self._metrics[mode][name].append(float(column.sum()))
                continue
            finite = column[torch.isfinite(column)]
            if finite.numel():
                self._metrics[mode][name].append(float(finite.mean()))


def build_trainer(config: AGTOConfig, callbacks: list | None = None) -> AGTOTrainer:
    """Model, processor, data and trainer from a validated config (no training yet)."""
    model, processor, peft_config = load_for_training(config)
    table = load_table(config.dataset, split=config.dataset_split, config=config.dataset_config,
                       max_samples=config.max_train_samples)
    folded = adapter_for(model).chat_format.folded_system
    train = sft_dataset(table, system_prompt=config.system_prompt, folded=folded)
    evaluation = None
    if config.eval_split:
        evaluation = sft_dataset(load_table(config.dataset, split=config.eval_split, config=config.dataset_config),
                                 system_prompt=config.system_prompt, folded=folded)
    collator = AVARVisionCollator(processor=processor, max_length=config.max_length,
                                  pad_to_multiple_of=config.pad_to_multiple_of,
                                  assistant_only_loss=config.assistant_only_loss)
    return AGTOTrainer(model=model, args=config, data_collator=collator, train_dataset=train,
                       eval_dataset=evaluation, processing_class=processor, peft_config=peft_config,
                       callbacks=callbacks)


def train(config: AGTOConfig, callbacks: list | None = None) -> AGTOTrainer:
    return fit_and_save(build_trainer(config, callbacks), config.resume_from_checkpoint)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"))
    config = parse_config(AGTOConfig, argv)
    trainer = train(config)
    final = [entry for entry in trainer.state.log_history if "train_loss" in entry]
    if final and trainer.is_world_process_zero():
        loss = final[-1]["train_loss"]
        logger.info("done: %d steps, mean train loss %s, model in %s", trainer.state.global_step,
                    f"{loss:.4f}" if math.isfinite(loss) else loss, config.output_dir)


if __name__ == "__main__":
    main()
