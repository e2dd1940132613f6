"""Training in a child process: crash isolation, OpenBLAS, prompt cancellation.

An out-of-memory abort, a segfault or a SIGKILL of training must become a
failed attempt that a retry resumes from the last checkpoint, not a dead
worker. So the parent (``run_training_child``) starts ``python -m
finetune.train.child REQUEST`` in its own process group, with Debian's OpenBLAS
preloaded when present, forwards the child's progress events, and kills the
whole group when it is interrupted, cancelled or times out. The child in turn
exits when its parent disappears without cleaning up (SIGKILL of a worker).

With ``training.hosts`` the parent starts ``mlx.launch`` instead, which starts
one such child per rank (see ``launch``); rank 0 reports progress and writes
the result, every rank announces itself with a ``rank`` event, and a failed
rank stops all of them.

Protocol: the child prints one ``@finetune {json}`` line per progress event
and writes ``train-result.json`` into the run directory before exiting 0.
An error the user must fix is an ``error`` event and exit code 3; anything
else (traceback, signal) is a crash.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.config import Settings
from finetune.data.tokenized import read_tokenized
from finetune.errors import DataError, FingerprintMismatch, ModelError, TrainingChildError, TrainingError
from finetune.layout import TRAIN_REQUEST_FILE, TRAIN_RESULT_FILE
from finetune.model.resolve import resolve_model
from finetune.train.blas import (
    DISABLE_ENV,
    OPS_PER_GRAPH_ENV,
    backend_env,
    is_preloaded,
    mlx_backend,
    openblas_disabled,
    preload_env,
)
from finetune.train.checkpoints import write_json
from finetune.train.distributed import WATCHDOG_EXIT, Reducer
from finetune.train.launch import RankWatch, rank_command, strip_ansi
from finetune.train.mirror import CheckpointMirror
from finetune.train.progress import format_event
from finetune.train.trainer import TrainResult, train

EVENT_PREFIX = "@finetune "
REQUEST_FILE = TRAIN_REQUEST_FILE
RESULT_FILE = TRAIN_RESULT_FILE
USER_ERROR_EXIT = 3
RANK_GRACE_SECONDS = 1.0  # after the first failed rank, before the whole group is killed
# Where a rank on another machine keeps the tokenized data rank 0 sent it (named by content, reused by retries).
RANK_DATA_CACHE = Path(tempfile.gettempdir()) / "finetune-rank-data"
# Events always forwarded; "train" progress is rate-limited.
ALWAYS_FORWARDED = {"start", "note", "eval", "checkpoint", "resume", "skip", "warning", "done", "error", "rank"}

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
    backend_env(env)
    env["PYTHONUNBUFFERED"] = "1"
    if settings.training.hosts is None:
        env.pop("MLX_RANK", None)  # a parent that is itself a rank must not make its child join that group
    log(_blas_message(settings, library, env))
    command = rank_command(settings, request)
    proc = subprocess.Popen(
        command,
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
    ranks = RankWatch()
    grace: threading.Timer | None = None
    try:
        forward = _Forwarder(log, on_event, progress_interval, mirror)
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            event = _parse_event(line)
            if event is not None:
                error = error or (event if event["event"] == "error" else None)
                # Other ranks only announce themselves and report errors; progress is rank 0's.
                if event.get("rank", 0) == 0 or event["event"] in ("rank", "error"):
                    forward(event)
            elif line.strip():
                line = strip_ansi(line)
                tail.append(line)
                log(line)
                if ranks.saw_failure(line):
                    # Soon, not at once: a second line may say which rank died first (its peers fail after it).
                    grace = threading.Timer(RANK_GRACE_SECONDS, _kill_group, [proc])
                    grace.daemon = True
                    grace.start()
        code = proc.wait()
        forward.flush()
    except BaseException:
        _kill_group(proc)
        proc.wait()
        if mirror:
            mirror.abandon()
        raise
    finally:
        for pending in (timer, grace):
            if pending:
                pending.cancel()
        _kill_group(proc)  # stragglers the child may have left in its group
    failed = ranks.failures
    if mirror:
        # Also after a crash: the retry, maybe on another machine, resumes from what was mirrored.
        mirror.finish(upload_all=code == 0 and not failed)
    if error is not None and USER_ERROR_EXIT in (code, *(c for _, c in failed)):
        kind = FingerprintMismatch if error.get("kind") == "FingerprintMismatch" else TrainingError
        raise kind(error["message"])
    if timed_out.is_set():
        raise TrainingChildError(f"training exceeded its timeout of {timeout:g} s and was killed")
    if failed:
        how = ", ".join(f"rank {rank} {_describe_exit(c)}" for rank, c in failed)
        raise TrainingChildError(f"training {how}; every rank was stopped; last output:\n" + "\n".join(tail))
    if code != 0:
        raise TrainingChildError(f"training process {_describe_exit(code)}; last output:\n" + "\n".join(tail))
    result = run_dir / RESULT_FILE
    if not result.exists():
        raise TrainingChildError("training ended without writing its result; last output:\n" + "\n".join(tail))
    return TrainResult.from_json(json.loads(result.read_text(encoding="utf-8")))


def _parse_event(line: str) -> dict[str, Any] | None:
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        return json.loads(line[len(EVENT_PREFIX) :])
    except json.JSONDecodeError:
        return None  # cut short, e.g. by a kill: shown as plain output


def _blas_message(settings: Settings, library: str | None, env: dict[str, str]) -> str:
    backend = mlx_backend()
    if backend != "cpu":
        knobs = f"; {OPS_PER_GRAPH_ENV}={env[OPS_PER_GRAPH_ENV]}" if OPS_PER_GRAPH_ENV in env else ""
        return f"training on MLX's {backend} backend (GPU matrix products; OpenBLAS not preloaded{knobs})"
    if library:
        return f"training on MLX's cpu backend with OpenBLAS preloaded (LD_PRELOAD={library})"
    if is_preloaded(env):
        return (
            f"training on MLX's cpu backend with OpenBLAS preloaded by the environment (LD_PRELOAD={env['LD_PRELOAD']})"
        )
    if settings.training.use_openblas == "off":
        return "training on MLX's cpu backend with its bundled BLAS (training.use_openblas=off)"
    if openblas_disabled():
        return f"training on MLX's cpu backend with its bundled BLAS ({DISABLE_ENV}=off)"
    return "training on MLX's cpu backend with its bundled BLAS (Debian OpenBLAS not found)"


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "was stopped by mlx.launch"
    if code == WATCHDOG_EXIT:
        return "gave up waiting for the other ranks (training.distributed_timeout_seconds)"
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
    parser = argparse.ArgumentParser(prog="python -m finetune.train.child")
    parser.add_argument("request", type=Path)
    parser.add_argument("--backend", default="ring")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    run_dir = args.request.parent
    dist = Reducer.connect(args.backend, args.timeout)
    me = {} if dist.is_main else {"rank": dist.rank}
    if dist.world > 1:
        _emit({"event": "rank", "rank": dist.rank, "world": dist.world, "pid": os.getpid(), "host": _host()})
    try:
        # Only rank 0's machine has the run directory: the request reaches the others over the group.
        request = dist.on_main(lambda: json.loads(args.request.read_text(encoding="utf-8")))
        settings = Settings(**request["settings"])
        data = read_tokenized(dist.share_file(Path(request["data_path"]), RANK_DATA_CACHE))
        emit = _emit if dist.is_main else None  # the others' progress would repeat rank 0's
        result = train(settings, _model_here(request, settings), data, run_dir, emit, request["fresh"], dist)
    except (TrainingError, DataError, ModelError) as exc:
        where = "" if dist.is_main else f"rank {dist.rank} ({_host()}): "
        _emit({"event": "error", "kind": type(exc).__name__, "message": where + str(exc), **me})
        return USER_ERROR_EXIT
    if dist.is_main:
        write_json(run_dir / RESULT_FILE, result.to_json())
    return 0


def _model_here(request: dict[str, Any], settings: Settings) -> str:
    """Rank 0's model directory, or, on another Mac without that path, the same reference resolved there.

    The ranks' model fingerprints are compared before the first step, so a different model is an error.
    """
    if Path(request["model_path"]).is_dir():
        return request["model_path"]
    return str(resolve_model(settings.model.path, settings.model.revision, settings.work_dir))


def _host() -> str:
    import socket

    return socket.gethostname()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
