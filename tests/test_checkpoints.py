"""Checkpoint directories: atomic commit, verification, skipping broken ones, pruning."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from finetune.train import checkpoints
from finetune.train.checkpoints import CheckpointError


def write(root: Path, step: int, value: float = 1.0) -> checkpoints.Checkpoint:
    arrays = {"adapters": {"w": mx.full((64, 8), value)}, "optimizer": {"step": mx.array(step, mx.uint64)}}
    return checkpoints.write_checkpoint(root, step, arrays, {"loop": {"step": step}})


def test_round_trip_and_state_lists_hashes(tmp_path):
    ckpt = write(tmp_path, 5, 2.5)
    assert ckpt.path.name == "step-0000005"
    verified = checkpoints.verify(ckpt.path)
    assert verified.step == 5 and verified.state["loop"] == {"step": 5}
    assert set(verified.state["files"]) == {"adapters.safetensors", "optimizer.safetensors"}
    assert np.array_equal(
        np.array(checkpoints.load_arrays(verified, "adapters")["w"]), np.full((64, 8), 2.5, np.float32)
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize(
    "damage",
    ["flip_bit", "truncate", "drop_state", "drop_file", "garble_state"],
)
def test_damaged_newest_is_skipped_with_a_warning(tmp_path, caplog, damage):
    write(tmp_path, 2, 1.0)
    newest = write(tmp_path, 4, 2.0).path
    target = newest / "adapters.safetensors"
    if damage == "flip_bit":
        blob = bytearray(target.read_bytes())
        blob[-1] ^= 0x10
        target.write_bytes(bytes(blob))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "drop_state":
        (newest / checkpoints.STATE_FILE).unlink()
    elif damage == "drop_file":
        target.unlink()
    else:
        (newest / checkpoints.STATE_FILE).write_text("{not json")
    with pytest.raises(CheckpointError):
        checkpoints.verify(newest)
    with caplog.at_level(logging.WARNING):
        found = checkpoints.latest_valid(tmp_path)
    assert found is not None and found.step == 2
    assert "skipping checkpoint" in caplog.text and "step-0000004" in caplog.text


def test_no_valid_checkpoint_is_none_not_an_error(tmp_path):
    assert checkpoints.latest_valid(tmp_path / "missing") is None
    broken = write(tmp_path, 1).path
    (broken / checkpoints.STATE_FILE).unlink()
    assert checkpoints.latest_valid(tmp_path) is None


def _write_then_die(root: str, failpoint: str) -> None:
    os.environ[checkpoints.FAILPOINT_ENV] = failpoint
    write(Path(root), 6, 3.0)


@pytest.mark.parametrize("failpoint", ["checkpoint-adapters:6", "checkpoint-optimizer:6", "checkpoint-rename:6"])
def test_kill_during_write_leaves_previous_checkpoint(tmp_path, failpoint):
    write(tmp_path, 4, 2.0)
    proc = multiprocessing.get_context("spawn").Process(target=_write_then_die, args=(str(tmp_path), failpoint))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    assert not (tmp_path / "step-0000006").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert checkpoints.latest_valid(tmp_path).step == 4
    checkpoints.remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000004"]


def test_rewriting_a_step_replaces_it(tmp_path):
    write(tmp_path, 3, 1.0)
    write(tmp_path, 3, 7.0)
    ckpt = checkpoints.latest_valid(tmp_path)
    assert float(checkpoints.load_arrays(ckpt, "adapters")["w"][0, 0]) == 7.0


def test_prune_keeps_last_n_and_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        write(tmp_path, step)
    checkpoints.prune(tmp_path, keep_last=2, keep_step=2)
    assert [p.name for p in checkpoints.committed(tmp_path)] == ["step-0000002", "step-0000004", "step-0000005"]
    checkpoints.prune(tmp_path, keep_last=1, keep_step=None)
    assert [p.name for p in checkpoints.committed(tmp_path)] == ["step-0000005"]


def test_steps_sort_numerically_beyond_seven_digits(tmp_path):
    write(tmp_path, 9_999_999)
    write(tmp_path, 10_000_000)
    assert checkpoints.latest_valid(tmp_path).step == 10_000_000
