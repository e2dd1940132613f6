"""The training child process: OpenBLAS, errors, crashes, timeouts, cancellation, orphan handling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from finetune.config import load_settings
from finetune.errors import TrainingChildError, TrainingError
from finetune.train import blas
from finetune.train.child import run_training_child

# Long enough that the tests below always interrupt it mid-run.
LONG = [
    "training.iters=100000",
    "training.batch_size=4",
    "training.steps_per_report=1",
    "training.steps_per_eval=100000",
    "training.steps_per_checkpoint=5",
    "lora.rank=4",
]


@pytest.fixture(scope="module")
def data_path(small_tokenized) -> Path:
    return small_tokenized


def child_pids(run_dir: Path) -> list[int]:
    """Processes whose command line names this run's request file (ours alone: the path is unique)."""
    out = subprocess.run(["pgrep", "-f", str(run_dir / "train-request.json")], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def test_unreadable_data_file_is_a_training_error(tiny_model_dir, tmp_path):
    (tmp_path / "data.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TrainingError, match="data.safetensors"):
        run_training_child(
            load_settings(), str(tiny_model_dir), tmp_path / "data.safetensors", tmp_path, lambda _: None
        )


def test_log_says_which_blas(tiny_model_dir, data_path, tmp_path, monkeypatch):
    settings = load_settings(None, ["training.iters=1", "training.batch_size=4", "lora.rank=4"])
    logs: list[str] = []
    run_training_child(settings, str(tiny_model_dir), data_path, tmp_path / "a", logs.append)
    library = blas.openblas_library()
    if library:
        assert f"training on MLX's cpu backend with OpenBLAS preloaded (LD_PRELOAD={library})" in logs
    else:
        assert "training on MLX's cpu backend with its bundled BLAS (Debian OpenBLAS not found)" in logs
    logs.clear()
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    off = load_settings(None, ["training.iters=1", "training.batch_size=4", "lora.rank=4", "training.use_openblas=off"])
    run_training_child(off, str(tiny_model_dir), data_path, tmp_path / "b", logs.append)
    assert "training on MLX's cpu backend with its bundled BLAS (training.use_openblas=off)" in logs


def test_no_openblas_for_a_gpu_backend(monkeypatch):
    """A CUDA (or Metal) MLX gets nothing preloaded, and the log names its backend."""
    monkeypatch.setattr(blas, "mlx_backend", lambda: "cuda")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env, library = blas.preload_env()
    assert library is None and "LD_PRELOAD" not in env
    monkeypatch.setattr("finetune.train.child.mlx_backend", lambda: "cuda")
    from finetune.train.child import _blas_message

    assert "MLX's cuda backend" in _blas_message(load_settings(), None, env)


def test_cuda_child_gets_larger_graphs_unless_the_user_chose(monkeypatch):
    """On CUDA the training child records 50 operations per CUDA graph; a user's own value stays; CPU: untouched."""
    from finetune.train.child import _blas_message

    monkeypatch.setattr(blas, "mlx_backend", lambda: "cuda")
    monkeypatch.setattr("finetune.train.child.mlx_backend", lambda: "cuda")
    env = blas.backend_env({})
    assert env == {"MLX_MAX_OPS_PER_BUFFER": "50"}
    assert "MLX_MAX_OPS_PER_BUFFER=50" in _blas_message(load_settings(), None, env)
    assert blas.backend_env({"MLX_MAX_OPS_PER_BUFFER": "40"}) == {"MLX_MAX_OPS_PER_BUFFER": "40"}
    monkeypatch.setattr(blas, "mlx_backend", lambda: "cpu")
    assert blas.backend_env({}) == {}


def test_user_error_in_child_is_a_training_error(tiny_model_dir, data_path, tmp_path):
    settings = load_settings(None, ["training.batch_size=64"])
    with pytest.raises(TrainingError, match="fewer than training.batch_size=64"):
        run_training_child(settings, str(tiny_model_dir), data_path, tmp_path, lambda _: None)


def test_child_killed_from_outside_is_a_crash_naming_the_signal(tiny_model_dir, data_path, tmp_path):
    run = tmp_path / "run"

    def kill_when_checkpointed() -> None:
        wait_for(lambda: (run / "checkpoints" / "step-0000005").is_dir())
        for pid in child_pids(run):
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_checkpointed)
    killer.start()
    with pytest.raises(TrainingChildError, match="killed by SIGKILL"):
        run_training_child(load_settings(None, LONG), str(tiny_model_dir), data_path, run, lambda _: None)
    killer.join()


def test_timeout_kills_the_child(tiny_model_dir, data_path, tmp_path):
    started = time.monotonic()
    with pytest.raises(TrainingChildError, match="timeout of 4 s"):
        run_training_child(
            load_settings(None, LONG), str(tiny_model_dir), data_path, tmp_path, lambda _: None, timeout=4
        )
    assert time.monotonic() - started < 30
    assert child_pids(tmp_path) == []


def test_interrupt_kills_the_process_group_promptly(tiny_model_dir, data_path, tmp_path):
    def on_event(event: dict) -> None:
        if event["event"] == "train" and event["step"] >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training_child(
            load_settings(None, LONG),
            str(tiny_model_dir),
            data_path,
            tmp_path,
            lambda _: None,
            on_event=on_event,
            progress_interval=0,
        )
    assert child_pids(tmp_path) == []


def test_child_exits_when_its_parent_is_killed(tiny_model_dir, data_path, tmp_path):
    """SIGKILL of the worker process that launched training must not leave an orphan training on."""
    script = textwrap.dedent(f"""
        from pathlib import Path
        from finetune.train.child import run_training_child
        from finetune.config import load_settings
        run_training_child(load_settings(None, {LONG!r}), {str(tiny_model_dir)!r}, Path({str(data_path)!r}),
                           Path({str(tmp_path)!r}), lambda line: print(line, flush=True))
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for line in parent.stdout:
            if line.startswith("step "):
                break
        pids = child_pids(tmp_path)
        assert pids
        parent.kill()
        parent.wait()
        wait_for(lambda: child_pids(tmp_path) == [], timeout=10)
    finally:
        parent.kill()
        for pid in child_pids(tmp_path):
            os.kill(pid, signal.SIGKILL)
