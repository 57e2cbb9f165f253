"""What a run's teachers will cost at most, before anything is sent (``python -m flows.synth --check``).

Per teacher stage: requests = seeds x ``rollouts``; prompt tokens are estimated from the stage's
own rendered prompt on the first few seeds (text / 4 + image pixels / 784, as the batch limits
count them), with every earlier stage's text as long as that stage's ``max_tokens``; completion
tokens = ``max_tokens``. So it is an upper bound: every rollout used, every answer as long as
allowed. Costs are shown at the teacher's prices online and as this config runs them (``mode:
batch`` times ``batch_discount``).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from pipeline.synthesis.batch.lines import estimate_tokens
from pipeline.synthesis.teacher_stage import _Pending
from pipeline.synthesis.usage import cost_usd, token_cost_usd

SAMPLE_SEEDS = 8
PER_SEEDS_WHEN_UNKNOWN = 1000


def _placeholder(stage: str, tokens: int) -> str:
    """An earlier stage's text of ``tokens`` words, in the shape the next stages parse."""
    words = " ".join(["word"] * max(1, tokens))
    return words if stage == "describe" else f"<think>{words}</think>\n<answer>0</answer>"


def project_costs(config) -> tuple[int, bool, list[dict]]:
    """``(seeds counted, whether the count is the config's, rows)``; one row per teacher stage."""
    from pipeline.seeds import iter_seeds
    from pipeline.synthesis.stages import AnchorStage, DescribeStage, ReasonStage

    sample = [s for s in itertools.islice(iter_seeds(config.seeds), SAMPLE_SEEDS) if isinstance(s, dict)]
    known = config.seeds.n is not None
    n_seeds = config.seeds.n if known else PER_SEEDS_WHEN_UNKNOWN
    rows, earlier = [], {}
    for stage_cls in (DescribeStage, ReasonStage, AnchorStage):
        stage_config = getattr(config.stages, stage_cls.name)
        teacher = stage_config.teacher
        online = replace(stage_config, teacher=replace(teacher, mode="online", serve=None))
        with stage_cls(online, progress=False) as stage:
            max_tokens = int(stage.sampling.get("max_tokens") or 0)
            prompts = []
            for record in sample:
                record = {**record, "stages": {name: {"text": _placeholder(name, n)} for name, n in earlier.items()}}
                prepared = stage._prepare(record)
                if isinstance(prepared, list):
                    request = stage._request(_Pending(0, record, prepared), {**stage.sampling, "max_tokens": 0}, 0)
                    prompts.append(estimate_tokens(request, teacher.max_pixels))
        earlier[stage_cls.name] = max_tokens
        requests = n_seeds * stage_config.rollouts
        prompt = requests * (max(prompts) if prompts else 0)
        completion = requests * max_tokens
        rows.append({"stage": stage_cls.name, "backend": teacher.backend, "model": teacher.model,
                     "mode": teacher.mode, "requests": requests, "prompt_tokens": prompt,
                     "completion_tokens": completion,
                     "online_usd": token_cost_usd(prompt, completion, teacher.price_input_per_mtok,
                                                  teacher.price_output_per_mtok),
                     "usd": cost_usd(teacher, prompt, completion)})
    return n_seeds, known, rows


def projection_text(config) -> str:
    """The projection as the lines ``--check`` prints."""
    n_seeds, known, rows = project_costs(config)
    what = f"{n_seeds:,} seeds" if known else f"every {n_seeds:,} seeds (seeds.n is not set)"
    lines = [f"# projected teacher cost for {what}, at most (every rollout used, every answer at max_tokens;",
             "# prompt tokens estimated as text/4 + image pixels/784 on the first seeds)",
             "| stage | teacher | mode | requests | prompt tokens <= | completion tokens <= | online USD <= | USD <= |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['stage']} | {row['backend']} {row['model']} | {row['mode']} | {row['requests']:,} | "
                     f"{row['prompt_tokens']:,} | {row['completion_tokens']:,} | {row['online_usd']:.2f} | "
                     f"{row['usd']:.2f} |")
    total, total_online = sum(r["usd"] for r in rows), sum(r["online_usd"] for r in rows)
    lines.append(f"# total at most ${total:,.2f} as configured (${total_online:,.2f} if every stage ran online)")
    return "\n".join(lines)
