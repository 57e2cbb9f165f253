"""AVAR trainers: thin consumers of the pipeline's spans, attention lens and SPEC formulas.

- ``python -m trainer.sft --config configs/sft.yaml``: AGTO SFT (TRL SFTTrainer + lens terms);
- ``python -m trainer.rl --config configs/rl.yaml``: GRPO with the VARS rewards (TRL GRPOTrainer);
- ``python -m trainer.eval --model M --data D``: accuracy and model-level VAS of a checkpoint.

``configs/*_tiny.yaml`` run on a CPU in seconds (tiny random model ``tiny``, drawn data ``toy``).
"""
