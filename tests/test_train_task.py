"""The Prefect train task against a real API: a killed child is retried and resumes; user errors are not retried."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from finetune.config import load_settings
from finetune.errors import TrainingError
from finetune.train.outputs import TrainResult

pytestmark = pytest.mark.slow

OVERRIDES = [
    "training.iters=12",
    "training.batch_size=4",
    "training.steps_per_checkpoint=4",
    "training.steps_per_eval=6",
    "training.retries=1",
    "training.retry_delay_seconds=0",
    "lora.rank=4",
]


@pytest.fixture(scope="module")
def data_path(small_tokenized) -> Path:
    return small_tokenized


def run_flow(settings, model: Path, data: Path, run_dir: Path):
    """The flow's final state and its one task run."""
    from prefect import flow, get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.train import train_with_retries

    @flow(name="train-only")
    def train_only():
        return train_with_retries(settings, str(model), str(data), str(run_dir), fresh=True)

    state = train_only(return_state=True)
    with get_client(sync_client=True) as client:
        [task_run] = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return state, task_run


def kill_child_after_checkpoint(run_dir: Path, timeout: float) -> tuple[threading.Thread, list[int]]:
    """SIGKILL the run's training child once its step-4 checkpoint exists; returns the thread and the pids killed."""
    killed: list[int] = []

    def kill() -> None:
        deadline = time.monotonic() + timeout
        while not (run_dir / "checkpoints" / "step-0000004").is_dir():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        out = subprocess.run(["pgrep", "-f", str(run_dir / "train-request.json")], capture_output=True, text=True)
        for pid in map(int, out.stdout.split()):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread, killed


def test_killed_child_is_retried_and_resumes(prefect_api, tiny_model_dir, data_path, tmp_path):
    run_dir = tmp_path / "runs" / "retry-run"
    killer, killed = kill_child_after_checkpoint(run_dir, timeout=120)
    state, task_run = run_flow(load_settings(None, OVERRIDES), tiny_model_dir, data_path, run_dir)
    killer.join()
    assert killed
    assert state.is_completed(), state
    result = state.result()
    assert isinstance(result, TrainResult)
    assert result.steps == 12 and result.resumed_from >= 4  # `fresh` applied to the first attempt only
    assert task_run.run_count == 2
    assert (result.adapter_dir / "adapters.safetensors").is_file()


def test_user_error_fails_without_retry(prefect_api, tiny_model_dir, data_path, tmp_path):
    settings = load_settings(None, [*OVERRIDES, "training.batch_size=64", "training.retries=3"])
    state, task_run = run_flow(settings, tiny_model_dir, data_path, tmp_path / "runs" / "bad-run")
    assert state.is_failed()
    with pytest.raises(TrainingError, match="fewer than training.batch_size=64"):
        state.result()
    assert task_run.run_count == 1


def test_pipeline_survives_a_killed_training_child(prefect_api, tmp_path):
    """Issue 4: the child dies mid-run, the train task retries and resumes, the flow publishes one bundle."""
    from finetune.config import EvaluationConfig, StorageConfig, TrainingConfig
    from finetune.publishing import list_runs
    from finetune.store import open_store
    from flows.finetune import finetune_pipeline

    work = tmp_path / "work"
    run_dir = work / "runs" / "killed-run"
    killer, killed = kill_child_after_checkpoint(run_dir, timeout=300)
    storage = StorageConfig(uri=str(tmp_path / "store"))
    finetune_pipeline(
        training=TrainingConfig(
            iters=12, batch_size=4, steps_per_checkpoint=4, steps_per_eval=6, retries=1, retry_delay_seconds=0
        ),
        evaluation=EvaluationConfig(max_examples=4),
        storage=storage,
        work_dir=str(work),
        run_id="killed-run",
    )
    killer.join(5)
    assert killed, "the training child was never killed"
    [run] = list_runs(open_store(storage))
    assert run.run_id == "killed-run" and run.published
    events = (run_dir / "metrics.jsonl").read_text()
    assert '"event": "resume"' in events
