"""Checkpoint mirroring: upload with the state file last, prune, pull the newest valid copy; resume on a clean machine."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from conftest import write_tokenized
from moto import mock_aws
from s3faults import raw_client

from finetune.config import StorageConfig, load_settings
from finetune.errors import TrainingChildError
from finetune.layout import checkpoints_key
from finetune.store import open_store
from finetune.train import checkpoints, mirror
from finetune.train.child import run_training_child

BUCKET = "finetune-ckpt-test"
PREFIX = checkpoints_key("run-1")


def s3_settings_overrides() -> list[str]:
    return [f"storage.uri=s3://{BUCKET}/team", "storage.region=us-east-1"]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        yield open_store(StorageConfig(uri=f"file://{tmp_path}/store"))
    else:
        with mock_aws():
            raw_client().create_bucket(Bucket=BUCKET)
            yield open_store(StorageConfig(uri=f"s3://{BUCKET}/team", region="us-east-1"))


def write(root: Path, step: int) -> checkpoints.Checkpoint:
    arrays = {"adapters": {"w": mx.full((32, 4), float(step))}, "optimizer": {"step": mx.array(step, mx.uint64)}}
    return checkpoints.write_checkpoint(root, step, arrays, {"loop": {"step": step}})


def test_mirror_prune_and_pull_round_trip(store, tmp_path):
    local = tmp_path / "machine-a"
    for step in (2, 4, 6):
        mirror.mirror(store, PREFIX, write(local, step))
    assert sorted(mirror.remote_steps(store, PREFIX)) == ["step-0000002", "step-0000004", "step-0000006"]
    mirror.prune_remote(store, PREFIX, keep={"step-0000004", "step-0000006"})
    assert sorted(mirror.remote_steps(store, PREFIX)) == ["step-0000004", "step-0000006"]

    pulled = mirror.pull_latest(store, PREFIX, tmp_path / "machine-b")
    assert pulled is not None and pulled.step == 6
    assert float(checkpoints.load_arrays(pulled, "adapters")["w"][0, 0]) == 6.0


def test_pull_skips_a_corrupt_or_uncommitted_remote_checkpoint(store, tmp_path, caplog):
    local = tmp_path / "machine-a"
    mirror.mirror(store, PREFIX, write(local, 2))
    newest = write(local, 4)
    mirror.mirror(store, PREFIX, newest)
    # Corrupt the remote copy of step 4; and step 6 was cut off before its state file.
    bad = bytearray(newest.file("adapters.safetensors").read_bytes())
    bad[-1] ^= 0x01
    (tmp_path / "bad").write_bytes(bytes(bad))
    store.put_file(f"{PREFIX}/step-0000004/adapters.safetensors", tmp_path / "bad")
    store.put_file(f"{PREFIX}/step-0000006/adapters.safetensors", newest.file("adapters.safetensors"))

    pulled = mirror.pull_latest(store, PREFIX, tmp_path / "machine-b")
    assert pulled is not None and pulled.step == 2
    assert "skipping remote checkpoint" in caplog.text and "sha256 mismatch" in caplog.text
    assert not (tmp_path / "machine-b" / "step-0000004").exists()


def test_crashed_run_resumes_on_another_machine_from_the_store(tiny_model_dir, tmp_path):
    """Machine A dies in the write of checkpoint 8; machine B has no local files and resumes from the mirror."""
    from mlx_lm import load

    from finetune.data import load_splits
    from finetune.data.templating import encode_chat

    overrides = [
        "training.iters=10",
        "training.batch_size=4",
        "training.steps_per_checkpoint=2",
        "training.steps_per_eval=5",
        "training.keep_checkpoints=2",
        "lora.rank=4",
        "training.mirror_checkpoints=true",
        *s3_settings_overrides(),
    ]
    settings = load_settings(None, overrides)
    _, tokenizer = load(str(tiny_model_dir))
    splits = load_splits(settings.dataset)
    data = {
        "train": [encode_chat(tokenizer, r["messages"], settings.template) for r in splits.train[:16]],
        "valid": [encode_chat(tokenizer, r["messages"], settings.template) for r in splits.valid[:4]],
    }
    data_path = write_tokenized(tmp_path / "data.safetensors", data)

    with mock_aws():
        raw_client().create_bucket(Bucket=BUCKET)
        logs_a: list[str] = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(checkpoints.FAILPOINT_ENV, "checkpoint-optimizer:8")
            with pytest.raises(TrainingChildError, match="SIGKILL"):
                run_training_child(settings, str(tiny_model_dir), data_path, tmp_path / "a" / "run-1", logs_a.append)
        assert any("checkpoint step-0000006 mirrored" in line for line in logs_a)
        store = open_store(settings.storage)
        assert "step-0000006" in mirror.remote_steps(store, PREFIX)

        logs_b: list[str] = []
        result = run_training_child(settings, str(tiny_model_dir), data_path, tmp_path / "b" / "run-1", logs_b.append)
        assert result.resumed_from == 6 and result.steps == 10
        assert any("fetched step 6" in line for line in logs_b)
        # The end of a successful run is mirrored, and the remote copy follows local retention.
        remote = mirror.remote_steps(store, PREFIX)
        assert "step-0000010" in remote
        assert set(remote) == {p.name for p in checkpoints.committed(tmp_path / "b" / "run-1" / "checkpoints")}
