"""Exact resume: a run SIGKILLed at random points (one during a checkpoint write) and resumed,
with its newest checkpoint corrupted once, ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from finetune.config import load_settings
from finetune.errors import TrainingChildError
from finetune.layout import ADAPTER_FILE
from finetune.layout import TRAIN_EVENTS_FILE as METRICS_FILE
from finetune.train import checkpoints
from finetune.train.child import run_training_child

ITERS = 12
# Dropout and gradient accumulation make the run depend on the RNG and on the micro-batch cursor.
OVERRIDES = [
    f"training.iters={ITERS}",
    "training.batch_size=4",
    "training.grad_accumulation_steps=2",
    "training.warmup_steps=3",
    "training.steps_per_report=1",
    "training.steps_per_eval=4",
    "training.steps_per_checkpoint=2",
    "training.keep_checkpoints=2",
    "training.final_adapter=last",
    "lora.dropout=0.1",
    "lora.rank=4",
]


class KillAt(Exception):
    pass


@pytest.fixture(scope="module")
def data_path(medium_tokenized: Path) -> Path:
    return medium_tokenized


def train_run(model: Path, data: Path, run_dir: Path, kill_after_step: int | None = None, packing: str = "auto"):
    """Train in a child; when ``kill_after_step`` is reached, raising in the event callback SIGKILLs its group."""

    def on_event(event: dict) -> None:
        if kill_after_step is not None and event["event"] == "train" and event["step"] >= kill_after_step:
            raise KillAt(event["step"])

    return run_training_child(
        load_settings(None, [*OVERRIDES, f"training.packing={packing}"]),
        str(model),
        data,
        run_dir,
        lambda _: None,
        on_event=on_event,
        progress_interval=0,
    )


def step_losses(run_dir: Path) -> dict[int, float]:
    events = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return {e["step"]: e["train_loss"] for e in events if e["event"] == "train"}


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


# auto (the default) decides on buckets here, and decides the same again on every resume; true packs.
@pytest.mark.parametrize("packing", ["auto", "true"])
def test_killed_and_resumed_run_is_bit_identical(tiny_model_dir, data_path, tmp_path, monkeypatch, packing):
    train_child = partial(train_run, packing=packing)
    reference = train_child(tiny_model_dir, data_path, tmp_path / "reference")
    assert reference.steps == ITERS and reference.resumed_from is None
    done = [json.loads(x) for x in (tmp_path / "reference" / METRICS_FILE).read_text().splitlines()][-1]
    assert done["batching"]["batching"].startswith({"auto": "bucketed", "true": "packed"}[packing])

    run = tmp_path / "interrupted"
    first, second = sorted(random.Random().sample(range(2, ITERS - 2), 2))
    print(f"killing after steps {first} and {second}, then during the next checkpoint write")
    with pytest.raises(KillAt):
        train_child(tiny_model_dir, data_path, run, kill_after_step=first)
    with pytest.raises(KillAt):
        train_child(tiny_model_dir, data_path, run, kill_after_step=second)

    # Resume until it dies inside the next checkpoint write: the previous checkpoint must stay loadable.
    before = checkpoints.latest_valid(run / "checkpoints")
    assert (
        before is not None and before.step >= (second - 1) // 2 * 2
    )  # the step-`second` event precedes its checkpoint
    monkeypatch.setenv(checkpoints.FAILPOINT_ENV, f"checkpoint-optimizer:{before.step + 2}")
    with pytest.raises(TrainingChildError, match="SIGKILL"):
        train_child(tiny_model_dir, data_path, run)
    assert any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir()), "the kill left a partial write"
    assert checkpoints.latest_valid(run / "checkpoints").step == before.step
    monkeypatch.delenv(checkpoints.FAILPOINT_ENV)

    # Flip one bit of the newest checkpoint's adapter: resume must skip it and use the one before (or start over).
    *older, newest = checkpoints.committed(run / "checkpoints")
    blob = bytearray((newest / "adapters.safetensors").read_bytes())
    blob[-3] ^= 0x01
    (newest / "adapters.safetensors").write_bytes(bytes(blob))
    expected_start = checkpoints.verify(older[-1]).step if older else None

    result = train_child(tiny_model_dir, data_path, run)
    assert result.resumed_from == expected_start
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())

    assert step_losses(run) == step_losses(tmp_path / "reference")
    assert sorted(step_losses(run)) == list(range(1, ITERS + 1))
    deterministic = ("step", "train_loss", "val_loss", "lr")
    assert [{k: h[k] for k in deterministic} for h in result.history] == [
        {k: h[k] for k in deterministic} for h in reference.history
    ]
    ours, theirs = tensors(run / "adapter" / ADAPTER_FILE), tensors(tmp_path / "reference" / "adapter" / ADAPTER_FILE)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name
    final = f"step-{ITERS:07d}"
    assert (
        tensors(run / "checkpoints" / final / "optimizer.safetensors").keys()
        == tensors(tmp_path / "reference" / "checkpoints" / final / "optimizer.safetensors").keys()
    )
    for name, value in tensors(run / "checkpoints" / final / "optimizer.safetensors").items():
        assert np.array_equal(
            value, tensors(tmp_path / "reference" / "checkpoints" / final / "optimizer.safetensors")[name]
        )
