"""A stand-in for ``vllm run-batch`` (tests/test_batch_offline.py): reads an OpenAI batch JSONL and
writes one output line per request, so the offline path's process handling (a flow killed while
the engine runs, an engine that fails) is tested in seconds instead of a model load per start.

It answers by the prompt's ``## Task:`` heading in the formats the stages parse; its environment:
``FAKE_ENGINE_SECONDS`` (run this long), ``FAKE_ENGINE_STARTS`` (a file each start appends a line
to), ``FAKE_ENGINE_FAIL`` (exit 1 without output). The real engine is tested by make test-vllm.
"""

import argparse
import json
import os
import sys
import time

ANSWERS = {"describe": "Global scan: a figure with labelled parts.",
           "reason": "<think>Read the values. Wait, check them again: they hold.</think><answer>1</answer>",
           "anchor": "<think>Look back at the image: the values are as labelled.</think>\n<answer>1</answer>"}


def answer(body: dict) -> str:
    text = json.dumps(body["messages"])
    return next((a for stage, a in ANSWERS.items() if f"## Task: {stage}" in text), "A figure.")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-i", required=True)
    parser.add_argument("-o", required=True)
    parser.add_argument("--model")
    parser.add_argument("--served-model-name")
    args, _ = parser.parse_known_args()
    if os.environ.get("FAKE_ENGINE_STARTS"):
        with open(os.environ["FAKE_ENGINE_STARTS"], "a") as fh:
            fh.write(f"{os.getpid()} {args.i}\n")
    with open(args.i) as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    seconds = float(os.environ.get("FAKE_ENGINE_SECONDS", "0"))
    for n in range(1, len(lines) + 1):
        time.sleep(seconds / max(1, len(lines)))
        print(f"Running batch: {100 * n // len(lines)}% Completed | {n}/{len(lines)} [00:01<00:00]", flush=True)
    if os.environ.get("FAKE_ENGINE_FAIL"):
        print("RuntimeError: engine core died", flush=True)
        return 1
    with open(args.o, "w") as out:
        for n, line in enumerate(lines):
            text = answer(line["body"])
            body = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0,
                    "model": args.served_model_name, "choices": [{"index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split()),
                              "total_tokens": 10 + len(text.split())}}
            out.write(json.dumps({"id": f"vllm-{n}", "custom_id": line["custom_id"], "error": None,
                                  "response": {"status_code": 200, "request_id": f"r{n}", "body": body}}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
