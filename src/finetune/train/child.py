"""Training in a child process: crash isolation, OpenBLAS, prompt cancellation.

An out-of-memory abort, a segfault or a SIGKILL of training must become a
failed attempt that a retry resumes from the last checkpoint, not a dead
worker. So the parent (``run_training_child``) starts ``python -m
finetune.train.child REQUEST`` in its own process group, with Debian's OpenBLAS
preloaded when present, forwards the child's progress events, and kills the
whole group when it is interrupted, cancelled or times out. The child in turn
exits when its parent disappears without cleaning up (SIGKILL of a worker).

Protocol: the child prints one ``@finetune {json}`` line per progress event
and writes ``train-result.json`` into the run directory before exiting 0.
An error the user must fix is an ``error`` event and exit code 3; anything
else (traceback, signal) is a crash.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.config import Settings
from finetune.data.tokenized import load_tokenized
from finetune.errors import DataError, FingerprintMismatch, TrainingChildError, TrainingError
from finetune.layout import TRAIN_REQUEST_FILE, TRAIN_RESULT_FILE
from finetune.train.blas import DISABLE_ENV, is_preloaded, openblas_disabled, preload_env
from finetune.train.checkpoints import write_json
from finetune.train.mirror import CheckpointMirror
from finetune.train.progress import format_event
from finetune.train.trainer import TrainResult, train

EVENT_PREFIX = "@finetune "
REQUEST_FILE = TRAIN_REQUEST_FILE
RESULT_FILE = TRAIN_RESULT_FILE
USER_ERROR_EXIT = 3
# Events always forwarded; "train" progress is rate-limited.
ALWAYS_FORWARDED = {"start", "eval", "checkpoint", "resume", "skip", "warning", "done", "error"}

Log = Callable[[str], None]
EventFn = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------- parent side


def run_training_child(
    settings: Settings,
    model_path: str,
    data_path: Path,
    run_dir: Path,
    log: Log,
    *,
    fresh: bool = False,
    on_event: EventFn | None = None,
    timeout: float | None = None,
    progress_interval: float = 5.0,
) -> TrainResult:
    """Train in a child process and return its result.

    Raises ``TrainingError`` (or ``FingerprintMismatch``) for problems the user
    must fix (bad data file, config, fingerprint) and ``TrainingChildError`` when the child crashed, was killed or
    timed out. ``KeyboardInterrupt`` and cancellation kill the child's group.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    request = run_dir / REQUEST_FILE
    write_json(
        request,
        {"settings": settings.public_dict(), "model_path": model_path, "data_path": str(data_path), "fresh": fresh},
    )
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    mirror = CheckpointMirror.open(settings, run_dir, log, fresh)
    env, library = preload_env(enabled=settings.training.use_openblas == "auto")
    env["PYTHONUNBUFFERED"] = "1"
    log(_blas_message(settings, library, env))
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune.train.child", str(request)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own process group, so one killpg stops everything it started
        text=True,
        bufsize=1,
    )
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        _kill_group(proc)

    timer = threading.Timer(timeout, on_timeout) if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    tail: deque[str] = deque(maxlen=30)
    error: dict[str, Any] | None = None
    try:
        forward = _Forwarder(log, on_event, progress_interval, mirror)
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(EVENT_PREFIX):
                event = json.loads(line[len(EVENT_PREFIX) :])
                error = event if event["event"] == "error" else error
                forward(event)
            elif line.strip():
                tail.append(line)
                log(line)
        code = proc.wait()
        forward.flush()
    except BaseException:
        _kill_group(proc)
        proc.wait()
        if mirror:
            mirror.abandon()
        raise
    finally:
        if timer:
            timer.cancel()
        _kill_group(proc)  # stragglers the child may have left in its group
    if mirror:
        # Also after a crash: the retry, maybe on another machine, resumes from what was mirrored.
        mirror.finish(upload_all=code == 0)
    if code == USER_ERROR_EXIT and error is not None:
        kind = FingerprintMismatch if error.get("kind") == "FingerprintMismatch" else TrainingError
        raise kind(error["message"])
    if code != 0:
        if timed_out.is_set():
            raise TrainingChildError(f"training exceeded its timeout of {timeout:g} s and was killed")
        raise TrainingChildError(f"training process {_describe_exit(code)}; last output:\n" + "\n".join(tail))
    return TrainResult.from_json(json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8")))


def _blas_message(settings: Settings, library: str | None, env: dict[str, str]) -> str:
    if library:
        return f"training with OpenBLAS preloaded (LD_PRELOAD={library})"
    if is_preloaded(env):
        return f"training with OpenBLAS preloaded by the environment (LD_PRELOAD={env['LD_PRELOAD']})"
    if settings.training.use_openblas == "off":
        return "training with MLX's bundled BLAS (training.use_openblas=off)"
    if openblas_disabled():
        return f"training with MLX's bundled BLAS ({DISABLE_ENV}=off)"
    return "training with MLX's bundled BLAS (Debian OpenBLAS not found)"


def _describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory, or killed from outside)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Forwarder:
    """Sends events to the log and callback; step progress at most every ``interval`` seconds."""

    def __init__(self, log: Log, on_event: EventFn | None, interval: float, mirror: CheckpointMirror | None):
        self.log, self.on_event, self.interval, self.mirror = log, on_event, interval, mirror
        self.last_sent = 0.0
        self.pending: dict[str, Any] | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "checkpoint" and self.mirror is not None:
            self.mirror.on_checkpoint(Path(event["path"]))
        if event["event"] not in ALWAYS_FORWARDED:
            now = time.monotonic()
            if now - self.last_sent < self.interval:
                self.pending = event
                return
            self.last_sent = now
        self.pending = None
        self._send(event)

    def flush(self) -> None:
        if self.pending is not None:
            self._send(self.pending)
            self.pending = None

    def _send(self, event: dict[str, Any]) -> None:
        text = format_event(event)
        if text:
            self.log(text)
        if self.on_event is not None:
            self.on_event(event)


# ---------------------------------------------------------------- child side


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(EVENT_PREFIX + json.dumps(event) + "\n")
    sys.stdout.flush()


def _exit_with_parent() -> None:
    """If the parent dies without killing us (SIGKILL of a worker), stop instead of training on as an orphan."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(70)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def main(argv: list[str]) -> int:
    _exit_with_parent()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    request_path = Path(argv[0])
    request = json.loads(request_path.read_text(encoding="utf-8"))
    run_dir = request_path.parent
    try:
        settings = Settings(**request["settings"])
        data = load_tokenized(Path(request["data_path"]))
        result = train(settings, request["model_path"], data, run_dir, on_progress=_emit, fresh=request["fresh"])
    except (TrainingError, DataError) as exc:
        _emit({"event": "error", "kind": type(exc).__name__, "message": str(exc)})
        return USER_ERROR_EXIT
    write_json(run_dir / RESULT_FILE, result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
