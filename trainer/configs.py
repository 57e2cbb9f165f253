"""Typed configuration of the AVAR trainers: TRL's configs plus the AGTO / VARS fields.

Each dataclass extends the TRL config its trainer consumes, so every TRL / ``transformers``
training argument (precision, DeepSpeed, FSDP, checkpointing, logging) stays available and
``--help`` lists the AVAR fields beside them. YAML files in ``configs/`` fill them through
:func:`parse_config` (TRL's parser: ``--config file.yaml`` then ``--key value`` overrides).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TypeVar

from trl import GRPOConfig, SFTConfig, TrlParser

from pipeline.paper import DEFAULT_SYSTEM_PROMPT

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelDataFields:
    """Model, data and adapter fields shared by SFT and RL."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model to train: a local folder or a Hub id of a Qwen2.5-VL-style checkpoint "
                  "(with its processor). Required."},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Training data: a local folder (saved with `save_to_disk` or holding parquet/json "
                  "files) or a Hub dataset id, in the published AVAR layout (id, images, problem, answer, "
                  "response, messages, ...). Required."},
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration (subset) name of a Hub dataset, if it has several."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset` to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Split of `dataset` used for evaluation during training; none when unset."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training rows (smoke runs, ablations)."}
    )
    max_pixels: int = field(
        default=262144,
        metadata={"help": "Image budget in pixels per image (the processor resizes larger images down). "
                  "Keep it fixed within an experiment so that attention statistics stay comparable."},
    )
    min_pixels: int | None = field(
        default=None, metadata={"help": "Lower pixel bound per image; the processor's default when unset."}
    )
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT,
        metadata={"help": "System turn written explicitly into every row that has none (AGTO's L_sup and "
                  "r_visual divide by its attention; every model family gets it the same way)."},
    )
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype when loading the model: auto, bfloat16, float16 or float32."},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel of the language model (sdpa, eager, flash_attention_2, ...); the "
                  "loader's default when unset. The attention lens works with any of them."},
    )
    freeze_vision_tower: bool = field(
        default=False,
        metadata={"help": "Keep the vision encoder frozen (the merger/projector and the LLM still train)."},
    )
    use_peft: bool = field(
        default=False, metadata={"help": "Train LoRA adapters (peft) instead of the full weights."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (alpha / r scales updates)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Module names that receive LoRA adapters (language-model projections by default)."},
    )


@dataclass
class AGTOConfig(SFTConfig, ModelDataFields):
    """SFT with the attention-guided objective ``L = L_LM + alpha * L_enh + beta * L_sup``.

    ``alpha = beta = 0`` is plain SFT and does not run the attention lens at all.
    """

    alpha: float = field(
        default=0.15,
        metadata={"help": "Weight of L_enh = -mean_l,h log(mean attention of user queries on image keys + eps)."},
    )
    beta: float = field(
        default=0.15,
        metadata={"help": "Weight of L_sup = +mean_l,h log(mean attention of user queries on system keys + eps)."},
    )
    agto_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Language-model layer indices the AGTO terms average over (negative counts from the "
                  "end); all layers when unset."},
    )
    eps: float = field(default=1e-6, metadata={"help": "Epsilon inside the AGTO logarithms."})
    sup_floor: float | None = field(default=None, metadata={
        "help": "Guard (ours; null = the paper): floor on the mean system attention inside L_sup, "
                "e.g. 0.01; below it L_sup stops pushing, so no head's system mass is driven to ~0."})
    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "LM loss on the assistant (response) tokens only, via the chat template's "
                  "generation markers (its {%% generation %%} blocks)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.sup_floor is not None and not 0 < self.sup_floor < 1:
            raise ValueError(f"sup_floor must be in (0, 1) or null, got {self.sup_floor}")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")

    @property
    def agto_enabled(self) -> bool:
        return self.alpha > 0 or self.beta > 0


@dataclass
class VARSConfig(GRPOConfig, ModelDataFields):
    """GRPO with the visual-anchored reward ``r = r_acc + 0.3 * r_visual + 0.1 * r_format``."""

    reward_weights: list[float] | None = field(
        default_factory=lambda: [1.0, 0.3, 0.1],
        metadata={"help": "Weights of the reward functions, in order: r_acc, r_visual, r_format "
                  "(paper: 1.0, lambda_v = 0.3, lambda_f = 0.1)."},
    )
    visual_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Language-model layers r_visual averages over (negative counts from the end); all "
                  "layers when unset."},
    )
    visual_eps: float = field(default=1e-6, metadata={"help": "Epsilon in the r_visual ratio's denominator."})
    visual_form: str = field(default="ratio", metadata={
        "help": "r_visual form: 'ratio' (the paper: image mass / system mass, unbounded) or "
                "'image_share' (guard, ours: the share of the response's attention on the image, in [0, 1])."})
    visual_batch_size: int = field(
        default=4,
        metadata={"help": "Rollouts per teacher-forced forward pass when measuring r_visual (memory bound)."},
    )
    remove_unused_columns: bool | None = field(
        default=False,
        metadata={"help": "Keep dataset columns (answer, answer_type, choices, images) for the reward functions."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.reward_weights is not None and len(self.reward_weights) != 3:
            raise ValueError(
                f"reward_weights needs 3 values (r_acc, r_visual, r_format), got {self.reward_weights}"
            )
        if self.visual_form not in ("ratio", "image_share"):
            raise ValueError(f"visual_form must be 'ratio' or 'image_share', got {self.visual_form!r}")
        if self.visual_eps <= 0:
            raise ValueError(f"visual_eps must be > 0, got {self.visual_eps}")


ConfigT = TypeVar("ConfigT", AGTOConfig, VARSConfig)


def parse_config(config_cls: type[ConfigT], argv: list[str] | None = None) -> ConfigT:
    """Parse ``--config file.yaml`` plus ``--key value`` overrides into ``config_cls``.

    Required fields are checked here, before any model or data is loaded.
    """
    parser = TrlParser(dataclass_types=[config_cls])
    (config,) = parser.parse_args_and_config(args=sys.argv[1:] if argv is None else argv)
    missing = [name for name in ("model_name_or_path", "dataset") if getattr(config, name) in (None, "")]
    if missing:
        raise SystemExit(f"{config_cls.__name__}: missing required field(s) {missing} "
                         "(set them in the YAML config or as --name value)")
    return config
