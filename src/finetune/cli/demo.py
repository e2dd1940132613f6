"""``finetune demo``: the bundled capitals data through the whole flow, on a real chat model or the tiny one.

Each demo model has its own settings, sized for a 2-core Linux machine (MLX on CPU): SmolLM2-135M-Instruct
learns the dataset's answer style in a few dozen LoRA steps; the tiny random model only shows the loss fall.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

DEFAULT_DEMO_MODEL = "builtin:smollm2-135m-instruct"

DEMO_SETTINGS: dict[str, list[str]] = {
    # Float32 copy on CPU (model.dtype auto); 8 adapted blocks, rank 8; the prompts (with SmolLM2's default
    # system prompt) are ~45 tokens, so 128 leaves room for every row.
    "builtin:smollm2-135m-instruct": [
        "lora.num_layers=8",
        "lora.rank=8",
        "training.iters=24",
        "training.batch_size=4",
        "training.learning_rate=2e-4",
        "training.warmup_steps=2",
        "training.steps_per_eval=24",
        "training.steps_per_report=4",
        "training.steps_per_checkpoint=12",
        "template.max_seq_length=128",
        # training.packing stays auto, which picks length buckets here, as the demo was tuned and measured:
        # ~47-token rows fill 64-token packs one at a time (estimated compute: packed 1.15x buckets).
        "evaluation.max_tokens=24",
        "evaluation.primary_metric=exact_match",
    ],
    # The tiny model never answers a capital right, so its gate is validation loss.
    "builtin:tiny-llama": ["evaluation.primary_metric=val_loss"],
}


def demo_overrides(model: str, work_dir: Path, store: str) -> list[str]:
    """The demo's settings for ``model`` (any model reference; unknown ones get the SmolLM2 settings)."""
    preset = DEMO_SETTINGS.get(model, DEMO_SETTINGS[DEFAULT_DEMO_MODEL])
    return [f"work_dir={work_dir}", f"storage.uri={store}", f"model.path={model}", *preset]


def _score(metrics: Mapping[str, Any], name: str, n: int) -> str:
    value = metrics.get(name)
    return "—" if value is None else f"{round(value * n)}/{n}"


def print_examples(result: Mapping[str, Any], out: Console, limit: int = 12) -> None:
    """Side by side: the reference, the base's and the adapter's answers; then exact match and correct fact."""
    examples = result.get("examples")
    if not examples:
        out.print("(no new answers: nothing changed since the last demo run; --force trains again)", highlight=False)
        return
    questions, references = examples["questions"], examples["references"]
    base, adapter = examples["answers"]["base"], examples["answers"]["candidate"]
    table = Table(title=f"held-out questions (first {min(limit, len(questions))} of {len(questions)})")
    for column in ("question", "reference", "base", "adapter"):
        table.add_column(column, overflow="fold")
    for row in list(zip(questions, references, base, adapter))[:limit]:
        table.add_row(*row)
    out.print(table)
    n = len(questions)
    metrics = result["metrics"]
    for label, key in (("exact match", "exact_match"), ("correct city", "correct_fact")):
        out.print(
            f"{label + ':':14} base {_score(metrics['base'], key, n)} -> adapter {_score(metrics['candidate'], key, n)}",
            highlight=False,
        )
