"""The files a training run leaves in its run directory: the adapter, the event history, the run lock."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from finetune.config import Settings
from finetune.errors import TrainingError
from finetune.fsutil import atomic_dir
from finetune.layout import ADAPTER_CONFIG_FILE, ADAPTER_FILE, TRAIN_LOCK_FILE
from finetune.train import checkpoints
from finetune.train.lora import lora_parameters


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    initial_val_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    stopped_early: bool
    resumed_from: int | None
    skipped_batches: int
    history: list[dict[str, Any]] = field(default_factory=list)
    ranks: int = 1  # data-parallel processes that trained it

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "adapter_dir": str(self.adapter_dir)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        return cls(**{**data, "adapter_dir": Path(data["adapter_dir"])})


def write_adapter(out_dir: Path, weights: dict[str, mx.array], settings: Settings, info: dict[str, Any]) -> Path:
    """An mlx-lm adapter directory (adapters.safetensors + adapter_config.json), replaced atomically."""
    config = {
        "fine_tune_type": settings.lora.fine_tune_type,
        "num_layers": settings.lora.num_layers,
        "lora_parameters": lora_parameters(settings),
        **info,
    }
    with atomic_dir(out_dir) as tmp:
        checkpoints.save_arrays(tmp / ADAPTER_FILE, weights, {"format": "mlx"})
        checkpoints.write_json(tmp / ADAPTER_CONFIG_FILE, config)
    return out_dir


def rewrite_events(path: Path, up_to_step: int) -> None:
    """Keep only events up to the resumed step: later ones belong to an attempt that was lost."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if event.get("step", 0) <= up_to_step and event.get("event") != "done":
            kept.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def read_history(path: Path) -> list[dict[str, Any]]:
    """One entry per reported or evaluated step: step, train_loss, val_loss, lr, tokens/s."""
    by_step: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event["event"] not in ("train", "eval"):
            continue
        entry = by_step.setdefault(
            event["step"],
            {
                "step": event["step"],
                "train_loss": None,
                "val_loss": None,
                "lr": None,
                "tokens_per_sec": None,
                "supervised_tokens_per_sec": None,
            },
        )
        for key in ("train_loss", "val_loss", "lr", "tokens_per_sec", "supervised_tokens_per_sec"):
            if event.get(key) is not None:
                entry[key] = event[key]
    return [by_step[k] for k in sorted(by_step)]


@contextmanager
def run_lock(run_dir: Path, wait_seconds: float = 10.0) -> Iterator[None]:
    """One trainer per run directory; the kernel drops the lock when its holder dies, even by SIGKILL.

    It waits a little first: an orphaned child of a killed worker needs up to a second to notice and exit.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    with open(run_dir / TRAIN_LOCK_FILE, "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    holder = f.read().strip() or "unknown"
                    raise TrainingError(f"{run_dir}: another training process ({holder}) is using it") from None
                time.sleep(0.2)
        f.truncate(0)
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield
