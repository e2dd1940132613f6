"""Batched vs one-at-a-time greedy generation over N evaluation prompts.

    .venv/bin/python benchmarks/bench_generate.py [--prompts 200] [--max-tokens 32] [--batch-size 32]
        [--model PATH] [--adapter DIR]

Default model: the tiny demo Llama (built into a temporary cache). Prompts: the bundled
demo questions, rendered with the same chat template as training. Prints both wall
times, the ratio, and whether the two ways produced the same answers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from finetune.config import DatasetConfig, TemplateConfig
from finetune.data import load_splits
from finetune.evaluation.generate import generate_answers, generate_one, load_for_eval, split_prompt_reference
from finetune.model.tiny import ensure_tiny_model


def demo_conversations(n: int) -> list[list[dict]]:
    splits = load_splits(DatasetConfig())
    rows = [row for name in ("test", "valid", "train") for row in splits.rows(name)]
    if n > len(rows):
        raise SystemExit(f"--prompts {n}: the demo data has {len(rows)} questions")
    return [split_prompt_reference(row)[0] for row in rows[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", help="model path or HF id (default: the tiny demo model)")
    parser.add_argument("--adapter", type=Path, help="adapter directory to apply on the model")
    args = parser.parse_args()

    model_path = args.model or str(ensure_tiny_model(Path(tempfile.gettempdir()) / "finetune-bench-models"))
    model, tokenizer = load_for_eval(model_path, args.adapter)
    template = TemplateConfig()
    conversations = demo_conversations(args.prompts)
    # Warm-up outside the timings: first calls pay for kernel compilation and allocation.
    generate_answers(model, tokenizer, conversations[:4], template, args.max_tokens, args.batch_size)

    start = time.perf_counter()
    batched = generate_answers(model, tokenizer, conversations, template, args.max_tokens, args.batch_size)
    t_batched = time.perf_counter() - start

    start = time.perf_counter()
    sequential = [generate_one(model, tokenizer, c, template, args.max_tokens) for c in conversations]
    t_sequential = time.perf_counter() - start

    same = sum(a == b for a, b in zip(batched, sequential))
    print(f"model: {model_path}  adapter: {args.adapter}  prompts: {len(conversations)}  max_tokens: {args.max_tokens}")
    print(
        f"batched (batch size {args.batch_size}): {t_batched:8.2f} s  ({len(conversations) / t_batched:6.1f} prompts/s)"
    )
    print(f"one at a time:            {t_sequential:8.2f} s  ({len(conversations) / t_sequential:6.1f} prompts/s)")
    print(f"speed-up: {t_sequential / t_batched:.1f}x   identical answers: {same}/{len(conversations)}")


if __name__ == "__main__":
    main()
