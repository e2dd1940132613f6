"""The trainer: learning on the demo data, mlx-lm compatible output, guards, weighting, fingerprints, progress."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import write_tokenized
from mlx.utils import tree_flatten

from finetune.config import load_settings
from finetune.data import load_splits
from finetune.data.templating import Encoded, encode_chat
from finetune.errors import FingerprintMismatch, TrainingError
from finetune.layout import ADAPTER_CONFIG_FILE as ADAPTER_CONFIG
from finetune.layout import ADAPTER_FILE
from finetune.layout import TRAIN_EVENTS_FILE as METRICS_FILE
from finetune.train import batching
from finetune.train.child import run_training_child
from finetune.train.trainer import Trainer, train

SHORT = [
    "training.iters=4",
    "training.batch_size=4",
    "training.steps_per_eval=2",
    "training.steps_per_checkpoint=2",
    "training.steps_per_report=1",
    "training.warmup_steps=1",
    "lora.rank=4",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from mlx_lm import load

    return load(str(tiny_model_dir))[1]


@pytest.fixture(scope="module")
def demo_data(tokenizer) -> dict[str, list[Encoded]]:
    settings = load_settings()
    splits = load_splits(settings.dataset)
    return {
        split: [encode_chat(tokenizer, r["messages"], settings.template) for r in getattr(splits, split)]
        for split in ("train", "valid")
    }


@pytest.fixture
def small_data(demo_data) -> dict[str, list[Encoded]]:
    return {"train": demo_data["train"][:16], "valid": demo_data["valid"][:8]}


def unused_token(data: dict[str, list[Encoded]]) -> int:
    used = {t for rows in data.values() for r in rows for t in r.input_ids}
    return min(set(range(3, 512)) - used)


def reference_loss(model, rows: list[Encoded]) -> float:
    """Token-weighted next-token loss over supervised positions, one row at a time, no batching code."""
    total, count = 0.0, 0
    for row in rows:
        ids = mx.array(row.input_ids)[None]
        ce = nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:])[0]
        mask = mx.array(row.loss_mask[1:], mx.float32)
        total += (ce * mask).sum().item()
        count += int(sum(row.loss_mask[1:]))
    return total / count


def test_default_config_learns_the_demo_and_writes_an_mlx_lm_adapter(tiny_model_dir, demo_data, tmp_path):
    """The shipped defaults, in a child process as the pipeline runs them."""
    from mlx_lm import load

    settings = load_settings()
    data_path = write_tokenized(tmp_path / "data.safetensors", demo_data)
    logs: list[str] = []
    result = run_training_child(settings, str(tiny_model_dir), data_path, tmp_path / "run", logs.append)
    assert result.steps == settings.training.iters
    assert result.final_val_loss < result.initial_val_loss - 1.0, (result.initial_val_loss, result.final_val_loss)
    assert any("OpenBLAS" in line or "bundled BLAS" in line for line in logs)

    model, _ = load(str(tiny_model_dir), adapter_path=str(result.adapter_dir))
    assert reference_loss(model, demo_data["valid"]) == pytest.approx(result.best_val_loss, rel=1e-4)
    base, _ = load(str(tiny_model_dir))
    assert reference_loss(base, demo_data["valid"]) == pytest.approx(result.initial_val_loss, rel=1e-4)
    config = json.loads((result.adapter_dir / ADAPTER_CONFIG).read_text())
    assert config["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0}
    assert config["step"] == result.best_step

    history = result.history
    assert history[0]["step"] == 0 and history[0]["val_loss"] == result.initial_val_loss
    reported = [h for h in history if h["train_loss"] is not None]
    assert reported and all(h["tokens_per_sec"] > h["supervised_tokens_per_sec"] > 0 for h in reported)
    events = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    progress = [e for e in events if e["event"] == "train"]
    assert {"padded_fraction", "peak_memory_gb", "eta_seconds", "lr"} <= set(progress[-1])
    assert progress[-1]["eta_seconds"] == 0 and progress[-1]["peak_memory_gb"] > 0


def test_batch_without_targets_and_nan_batch_are_skipped(tiny_model_dir, small_data, tmp_path):
    settings = load_settings(None, SHORT)
    trainer = Trainer(settings, str(tiny_model_dir), small_data, tmp_path)
    trainer.restore()
    trainer._compile()
    before = {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}

    rows = small_data["train"][:4]
    empty = batching.collate([Encoded(r.input_ids, [0] * len(r.input_ids)) for r in rows], trainer.widths)
    out = trainer.train_step([empty])
    assert out == {"loss_sum": 0.0, "n_targets": 0, "skipped": ["no supervised tokens"], "updated": False}

    good = batching.collate(rows, trainer.widths)
    poisoned = batching.collate(rows, trainer.widths)
    poison_id = unused_token(small_data)
    poisoned.inputs[0, 3] = poison_id
    embed = trainer.model.model.embed_tokens
    embed.weight = mx.where(mx.arange(embed.weight.shape[0])[:, None] == poison_id, mx.nan, embed.weight)
    out = trainer.train_step([poisoned])
    assert out["skipped"] == ["non-finite loss"] and not out["updated"]
    after = {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    assert all(np.array_equal(before[k], after[k]) for k in before)

    # In an accumulated step the bad micro-batch is dropped and the good one still applied.
    out = trainer.train_step([poisoned, good])
    assert out["skipped"] == ["non-finite loss"] and out["updated"] and out["n_targets"] == good.n_targets
    assert all(np.isfinite(np.array(v)).all() for _, v in tree_flatten(trainer.model.trainable_parameters()))


def test_nan_rows_in_training_are_skipped_and_logged_adapter_stays_finite(tiny_model_dir, small_data, tmp_path):
    """A base model with one non-finite embedding row: every batch holding that token is skipped, not applied."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = mx.load(str(model_dir / "model.safetensors"))
    poison_id = unused_token(small_data)
    emb = np.array(weights["model.embed_tokens.weight"])
    emb[poison_id] = np.inf
    weights["model.embed_tokens.weight"] = mx.array(emb)
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights)
    train_rows = list(small_data["train"])
    train_rows[0] = Encoded(
        train_rows[0].input_ids[:2] + [poison_id] + train_rows[0].input_ids[3:], train_rows[0].loss_mask
    )
    train_rows.append(Encoded([1, 2], [0, 0]))  # no target: dropped by the data check
    data = {"train": train_rows, "valid": small_data["valid"]}

    events: list[dict] = []
    result = train(load_settings(None, SHORT), str(model_dir), data, tmp_path / "run", on_progress=events.append)
    skips = [e for e in events if e["event"] == "skip"]
    # 16 rows, batches of 4: the poisoned row is in one batch of each epoch, 4 batches per epoch.
    assert result.skipped_batches == len(skips) == 1
    assert "non-finite loss" in skips[0]["message"]
    assert any(e["event"] == "warning" and "dropped 1 of 17 rows" in e["message"] for e in events)
    weights = mx.load(str(result.adapter_dir / ADAPTER_FILE))
    assert weights and all(np.isfinite(np.array(v)).all() for v in weights.values())
    assert math.isfinite(result.final_val_loss)


def test_accumulation_weights_micro_batches_by_target_tokens(tiny_model_dir, small_data, tmp_path):
    """Two micro-batches accumulated give the gradient of one batch holding both, though their target counts differ."""
    trainer = Trainer(load_settings(None, SHORT), str(tiny_model_dir), small_data, tmp_path)
    trainer.restore()
    trainer._compile()
    rows = sorted(small_data["train"], key=lambda r: len(r.input_ids))[:4]
    short, long = rows[:1], rows[1:]
    assert batching.n_targets(short[0]) != sum(batching.n_targets(r) for r in long)
    width = [batching.collate(rows, trainer.widths).width]
    split = trainer.accumulate([batching.collate(short, width), batching.collate(long, width)])
    joint = trainer.accumulate([batching.collate(rows, width)])
    assert split[2] == joint[2] == sum(batching.n_targets(r) for r in rows)
    assert split[1] == pytest.approx(joint[1], rel=1e-5)
    split_grads, joint_grads = dict(tree_flatten(split[0])), dict(tree_flatten(joint[0]))
    assert split_grads.keys() == joint_grads.keys()
    for key in split_grads:
        np.testing.assert_allclose(np.array(split_grads[key]), np.array(joint_grads[key]), rtol=1e-3, atol=1e-6)


def test_fingerprint_mismatch_refuses_to_resume_and_fresh_starts_over(tiny_model_dir, small_data, tmp_path):
    run = tmp_path / "run"
    first = train(load_settings(None, SHORT), str(tiny_model_dir), small_data, run)
    assert first.steps == 4

    again = train(load_settings(None, SHORT), str(tiny_model_dir), small_data, run)
    assert again.resumed_from == 4 and again.steps == 4

    # Operational fields do not count as a different run.
    operational = ["training.steps_per_report=3", "training.retries=5", "training.use_openblas=off"]
    operational += ["storage.read_timeout=3", "training.keep_checkpoints=4", "evaluation.max_examples=2"]
    same = train(
        load_settings(None, [*SHORT, *operational]),
        str(tiny_model_dir),
        small_data,
        run,
    )
    assert same.resumed_from == 4

    with pytest.raises(FingerprintMismatch, match="config"):
        train(load_settings(None, [*SHORT, "training.learning_rate=0.01"]), str(tiny_model_dir), small_data, run)
    other_data = {"train": small_data["train"][1:], "valid": small_data["valid"]}
    with pytest.raises(FingerprintMismatch, match="data"):
        train(load_settings(None, SHORT), str(tiny_model_dir), other_data, run)

    fresh = train(
        load_settings(None, [*SHORT, "training.learning_rate=0.01"]), str(tiny_model_dir), small_data, run, fresh=True
    )
    assert fresh.resumed_from is None and fresh.steps == 4


def test_epochs_early_stopping_and_final_adapter_choice(tiny_model_dir, small_data, tmp_path):
    # 16 rows / batch 4 = 4 batches per epoch; 1.5 epochs = 6 steps.
    settings = load_settings(None, [*SHORT, "training.epochs=1.5"])
    result = train(settings, str(tiny_model_dir), small_data, tmp_path / "epochs")
    assert result.steps == 6

    # A learning rate this large makes validation loss worse after the first evaluation: patience 1 stops.
    settings = load_settings(
        None,
        [
            *SHORT,
            "training.iters=40",
            "training.learning_rate=3.0",
            "training.grad_clip=null",
            "training.warmup_steps=0",
            "training.early_stopping_patience=1",
        ],
    )
    result = train(settings, str(tiny_model_dir), small_data, tmp_path / "early")
    assert result.stopped_early and result.steps < 40
    config = json.loads((result.adapter_dir / ADAPTER_CONFIG).read_text())
    assert config["step"] == result.best_step and config["val_loss"] == result.best_val_loss


def test_bad_inputs_are_clear_errors(tiny_model_dir, small_data, tmp_path):
    with pytest.raises(TrainingError, match="fewer than training.batch_size=64"):
        train(load_settings(None, [*SHORT, "training.batch_size=64"]), str(tiny_model_dir), small_data, tmp_path / "a")
    with pytest.raises(TrainingError, match="'train' and 'valid'"):
        train(load_settings(None, SHORT), str(tiny_model_dir), {"train": small_data["train"]}, tmp_path / "b")
    with pytest.raises(TrainingError, match="lora.num_layers=9"):
        train(load_settings(None, [*SHORT, "lora.num_layers=9"]), str(tiny_model_dir), small_data, tmp_path / "c")


def test_one_trainer_per_run_directory(tiny_model_dir, small_data, tmp_path):
    from finetune.train.outputs import run_lock

    with run_lock(tmp_path):
        with pytest.raises(TrainingError, match=f"another training process \\(pid {os.getpid()}\\)"):
            with run_lock(tmp_path, wait_seconds=0.3):
                pass

    # A holder that goes away within the grace period (an orphan noticing its parent died) is waited for.
    held = threading.Event()

    def hold_briefly() -> None:
        with run_lock(tmp_path):
            held.set()
            time.sleep(1.0)

    holder = threading.Thread(target=hold_briefly)
    holder.start()
    held.wait()
    assert train(load_settings(None, SHORT), str(tiny_model_dir), small_data, tmp_path).steps == 4
    holder.join()
