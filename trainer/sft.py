"""AGTO supervised fine-tuning: ``python -m trainer.sft --config configs/sft.yaml [--key value]``.

``L = L_LM + alpha * L_enh + beta * L_sup`` (SPEC "AGTO"). The LM loss is TRL's, on the
response tokens only (the chat template's generation markers); the AGTO terms come from the
attention lens (:mod:`pipeline.attention`) observing the SAME forward pass, with the user tokens
as queries and the image / system tokens as key sets (:mod:`pipeline.spans`), reduced by
:func:`pipeline.objectives.agto_terms`. ``alpha = beta = 0`` is plain SFT: no lens runs.

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

from pipeline.attention import AttentionLens
from pipeline.objectives import agto_applies, agto_terms, vas_ratio
from pipeline.spans import SpecialTokens, compute_spans
from trainer.configs import AGTOConfig, parse_config
from trainer.data import load_table, sft_dataset, strip_nulls
from trainer.models import load_for_training

logger = logging.getLogger("trainer.sft")


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
        mode = "train" if self.model.training else "eval"
        # TRL's LM loss is a share of the whole accumulated batch when num_items_in_batch is given;
        # the AGTO terms are per-micro-batch means, so they are spread over the accumulation steps
        # the same way TRL spreads its auxiliary loss.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        lm_scale = steps / (self.accelerator.num_processes if self.args.average_tokens_across_devices
                            and num_items_in_batch is not None else 1)
        if self._lens is None:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = result[0] if return_outputs else result
            self._metrics[mode]["lm_loss"].append(loss.detach().item() * lm_scale)
            return result

        spans = compute_spans(inputs["input_ids"], inputs.get("attention_mask"), self._special_tokens)
        has_image = spans.image.any(dim=1)
        if not bool(has_image.any()):  # AGTO is skipped for samples without images
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = result[0] if return_outputs else result
            self._metrics[mode]["lm_loss"].append(loss.detach().item() * lm_scale)
            return result
        with self._lens.capture(spans.user, image_mask=spans.image, system_mask=spans.system) as capture:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        lm_loss, outputs = (result[0], result[1]) if return_outputs else (result, None)
        l_enh, l_sup = agto_terms(capture, eps=config.eps, reduction="mean")
        loss = lm_loss + (config.alpha * l_enh + config.beta * l_sup) / steps

        applies = agto_applies(capture)
        with torch.no_grad():
            vas = vas_ratio(capture, eps=config.eps)[applies]
        self._metrics[mode]["lm_loss"].append(lm_loss.detach().item() * lm_scale)
        self._metrics[mode]["l_enh"].append(l_enh.detach().item())
        self._metrics[mode]["l_sup"].append(l_sup.detach().item())
        self._metrics[mode]["agto_samples"].append(float(applies.sum()))
        if vas.numel():
            self._metrics[mode]["vas"].append(vas.mean().item())
        return (loss, outputs) if return_outputs else loss


def build_trainer(config: AGTOConfig, callbacks: list | None = None) -> AGTOTrainer:
    """Model, processor, data and trainer from a validated config (no training yet)."""
    model, processor, peft_config = load_for_training(config)
    table = load_table(config.dataset, split=config.dataset_split, config=config.dataset_config,
                       max_samples=config.max_train_samples)
    train = sft_dataset(table)
    evaluation = None
    if config.eval_split:
        evaluation = sft_dataset(load_table(config.dataset, split=config.eval_split, config=config.dataset_config))
    collator = AVARVisionCollator(processor=processor, max_length=config.max_length,
                                  pad_to_multiple_of=config.pad_to_multiple_of,
                                  assistant_only_loss=config.assistant_only_loss)
    return AGTOTrainer(model=model, args=config, data_collator=collator, train_dataset=train,
                       eval_dataset=evaluation, processing_class=processor, peft_config=peft_config,
                       callbacks=callbacks)


def train(config: AGTOConfig, callbacks: list | None = None) -> AGTOTrainer:
    trainer = build_trainer(config, callbacks)
    resume = config.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(config.output_dir)
    return trainer


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
