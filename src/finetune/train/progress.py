"""What a training run reports: counters between two progress events, and one log line per event."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from finetune.train.batching import Batch


class ProgressWindow:
    """Counters between two progress reports."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.targets = self.tokens = self.computed = self.steps = 0
        self.seconds = 0.0

    def add(self, batches: Sequence[Batch], out: dict[str, Any], seconds: float) -> None:
        self.loss_sum += out["loss_sum"]
        self.targets += out["n_targets"]
        self.tokens += sum(b.n_tokens for b in batches)
        self.computed += sum(b.n_computed for b in batches)
        self.steps += 1
        self.seconds += seconds

    def report(self) -> dict[str, Any]:
        return {
            "train_loss": self.loss_sum / self.targets if self.targets else None,
            "seconds": self.seconds,
            "tokens": self.tokens,
            "supervised_tokens": self.targets,
            "tokens_per_sec": self.tokens / self.seconds,
            "supervised_tokens_per_sec": self.targets / self.seconds,
            "padded_fraction": 1 - self.tokens / self.computed,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }


def format_event(e: dict[str, Any]) -> str | None:
    kind = e["event"]
    if kind == "train":
        loss = f"{e['train_loss']:.4f}" if e.get("train_loss") is not None else "n/a"
        return (
            f"step {e['step']}/{e['total_steps']}  loss {loss}  lr {e['lr']:.2e}  "
            f"{e['tokens_per_sec']:.0f} tok/s ({e['supervised_tokens_per_sec']:.0f} supervised)  "
            f"padding {100 * e['padded_fraction']:.0f}%  peak {e['peak_memory_gb']:.2f} GB  ETA {e['eta_seconds']:.0f} s"
        )
    if kind == "eval":
        return f"step {e['step']}: validation loss {e['val_loss']:.4f}" + (
            f" (best {e['best_val_loss']:.4f} at step {e['best_step']})" if e.get("best_step") is not None else ""
        )
    if kind == "start":
        origin = f"resuming from step {e['resumed_from']}" if e["resumed_from"] else "starting from step 0"
        return (
            f"training {e['total_steps']} steps on {e['train_rows']} rows ({e['valid_rows']} validation), "
            f"{e['trainable_parameters']:,} trainable parameters, {origin}; "
            f"{e.get('batching', 'bucketed')} batches on {e.get('device', '?')}"
            + (f", LoRA products in {e['lora_dtype']}" if e.get("lora_dtype") else "")
            + (f", on {e['ranks']} ranks" if e.get("ranks", 1) > 1 else "")
        )
    if kind == "rank":
        return f"rank {e['rank']} of {e['world']} running on {e['host']} (pid {e['pid']})"
    if kind == "checkpoint":
        return f"checkpoint saved: {e['path']}"
    if kind == "resume":
        return f"resumed from checkpoint {e['checkpoint']}"
    if kind == "done":
        return f"training finished at step {e['step']}; adapter (step {e['adapter_step']}) in {e['adapter_dir']}"
    if kind == "note":
        return e["message"]
    if kind in ("skip", "warning"):
        return f"{kind}: {e['message']}"
    return None  # an error is raised to the caller, which shows it once
