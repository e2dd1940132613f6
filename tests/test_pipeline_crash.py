"""A worker that dies mid-training: re-running the flow with the same run id resumes and publishes once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FINETUNE = str(Path(sys.executable).parent / "finetune")


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        committed = sorted((run_dir / "checkpoints").glob("step-*/state.json"))
        if committed:
            return committed[0].parent
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint in {run_dir} after {timeout} s")


def test_rerun_after_the_whole_flow_process_was_killed(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    work, store = tmp_path / "work", tmp_path / "store"
    args = [
        FINETUNE,
        "run",
        "--run-id",
        "crashed-run",
        "--set",
        f"work_dir={work}",
        "--set",
        f"storage.uri={store}",
        "--set",
        "training.iters=60",
        "--set",
        "training.steps_per_checkpoint=10",
        "--set",
        "training.steps_per_eval=30",
        "--set",
        "evaluation.primary_metric=val_loss",
    ]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    run_dir = work / "runs" / "crashed-run"

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        checkpoint = wait_for_checkpoint(run_dir, first)
        os.killpg(first.pid, signal.SIGKILL)  # the worker dies: no cleanup, no retry, no final state
        first.wait()
    assert not (store / "runs" / "crashed-run" / "manifest.json").exists()

    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    result = json.loads((run_dir / "train-result.json").read_text())
    assert result["resumed_from"] is not None and result["resumed_from"] >= int(checkpoint.name.removeprefix("step-"))
    assert f"resuming from step {result['resumed_from']}" in output
    assert result["steps"] == 60
    manifests = list((store / "runs").glob("*/manifest.json"))
    assert [m.parent.name for m in manifests] == ["crashed-run"]
