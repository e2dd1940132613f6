"""Training in a child process: crash isolation, OpenBLAS, prompt cancellation.

An out-of-memory abort, a segfault or a SIGKILL of training must become a
failed attempt that a retry resumes from the last checkpoint, not a dead
worker. So the parent (``run_training_child``) starts ``python -m
finetune.child REQUEST`` in its own process group, with Debian's OpenBLAS
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from finetune import checkpoints, training
from finetune.blas import DISABLE_ENV, is_preloaded, openblas_disabled, preload_env
from finetune.config import Settings
from finetune.data import DataError, load_tokenized

EVENT_PREFIX = "@finetune "
REQUEST_FILE = "train-request.json"
RESULT_FILE = "train-result.json"
USER_ERROR_EXIT = 3
# Events always forwarded; "train" progress is rate-limited.
ALWAYS_FORWARDED = {"start", "eval", "checkpoint", "resume", "skip", "warning", "done", "error"}

Log = Callable[[str], None]
EventFn = Callable[[dict[str, Any]], None]


class TrainingChildError(RuntimeError):
    """The training process died (signal, crash, timeout): worth a retry, which resumes."""


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
) -> training.TrainResult:
    """Train in a child process and return its result.

    Raises ``TrainingError`` (or ``FingerprintMismatch``) for problems the user
    must fix (bad data file, config, fingerprint) and ``TrainingChildError`` when the child crashed, was killed or
    timed out. ``KeyboardInterrupt`` and cancellation kill the child's group.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    request = run_dir / REQUEST_FILE
    checkpoints.write_json(
        request,
        {"settings": settings.public_dict(), "model_path": model_path, "data_path": str(data_path), "fresh": fresh},
    )
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    mirror = CheckpointMirror.open(settings, run_dir, log, fresh)
    env, library = preload_env(enabled=settings.training.use_openblas == "auto")
    env["PYTHONUNBUFFERED"] = "1"
    log(_blas_message(settings, library, env))
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune.child", str(request)],
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
                event = json.loads(line[len(EVENT_PREFIX):])
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
        kind = training.FingerprintMismatch if error.get("kind") == "FingerprintMismatch" else training.TrainingError
        raise kind(error["message"])
    if code != 0:
        if timed_out.is_set():
            raise TrainingChildError(f"training exceeded its timeout of {timeout:g} s and was killed")
        raise TrainingChildError(f"training process {_describe_exit(code)}; last output:\n" + "\n".join(tail))
    return training.TrainResult.from_json(json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8")))


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

    def __init__(self, log: Log, on_event: EventFn | None, interval: float, mirror: "CheckpointMirror | None"):
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


class CheckpointMirror:
    """Copies every K-th checkpoint (and the last ones) to the store in a background thread.

    It runs in the parent, so the training process never holds storage
    credentials; a failed upload is a warning, never a failed training.
    """

    def __init__(self, store: Any, prefix: str, root: Path, every: int, log: Log):
        self.store, self.prefix, self.root, self.every, self.log = store, prefix, root, every, log
        self.seen = 0
        self.mirrored: set[str] = set()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-mirror")

    @classmethod
    def open(cls, settings: Settings, run_dir: Path, log: Log, fresh: bool) -> "CheckpointMirror | None":
        if not settings.training.mirror_checkpoints:
            return None
        from finetune.storage import StorageError, open_store

        root = run_dir / "checkpoints"
        try:
            mirror = cls(open_store(settings.storage), checkpoints.remote_prefix(run_dir.name), root,
                         settings.training.mirror_every, log)
            if fresh:
                checkpoints.prune_remote(mirror.store, mirror.prefix, keep=set())
            elif checkpoints.latest_valid(root) is None:
                pulled = checkpoints.pull_latest(mirror.store, mirror.prefix, root)
                if pulled is not None:
                    log(f"no local checkpoint; fetched step {pulled.step} from {mirror.store.uri_for(mirror.prefix)}")
                    mirror.mirrored.add(pulled.path.name)
                    mirror.pull_best(pulled)
        except StorageError as exc:
            log(f"warning: checkpoint mirroring disabled: {exc}")
            return None
        return mirror

    def pull_best(self, latest: checkpoints.Checkpoint) -> None:
        """The best-validation checkpoint too: it may become the final adapter."""
        best = latest.state["loop"].get("best_step")
        if best is None or best == latest.step:
            return
        name = checkpoints.step_dir_name(best)
        try:
            checkpoints.pull(self.store, self.prefix, self.root, name)
            self.mirrored.add(name)
        except Exception as exc:  # training still works without it; the final adapter falls back to the last step
            self.log(f"warning: best checkpoint {name} not fetched: {exc}")

    def on_checkpoint(self, path: Path) -> None:
        self.seen += 1
        if self.seen % self.every == 0:
            self.pool.submit(self._upload, [path])

    def finish(self, upload_all: bool) -> None:
        """Mirror what is still local and unmirrored (the final and best checkpoints), then wait."""
        if upload_all:
            self.pool.submit(self._upload, checkpoints.committed(self.root))
        self.pool.shutdown(wait=True)

    def abandon(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _upload(self, paths: list[Path]) -> None:
        from finetune.storage import StorageError

        for path in paths:
            if path.name in self.mirrored:
                continue
            try:
                checkpoints.mirror(self.store, self.prefix, checkpoints.verify(path))
            except (checkpoints.CheckpointError, StorageError, OSError) as exc:
                self.log(f"warning: checkpoint {path.name} not mirrored: {exc}")
                continue
            self.mirrored.add(path.name)
            self.log(f"checkpoint {path.name} mirrored to {self.store.uri_for(self.prefix)}")
        local = {p.name for p in checkpoints.committed(self.root)}
        try:
            checkpoints.prune_remote(self.store, self.prefix, keep=local)
        except StorageError as exc:
            self.log(f"warning: pruning mirrored checkpoints failed: {exc}")
        self.mirrored &= local


def format_event(e: dict[str, Any]) -> str | None:
    kind = e["event"]
    if kind == "train":
        loss = f"{e['train_loss']:.4f}" if e.get("train_loss") is not None else "n/a"
        return (
            f"step {e['step']}/{e['total_steps']}  loss {loss}  lr {e['lr']:.2e}  "
            f"{e['tokens_per_sec']:.0f} tok/s ({e['supervised_tokens_per_sec']:.0f} supervised)  "
            f"padding {100 * e['padded_fraction']:.0f}%  peak {e['peak_memory_gb']:.2f} GB  ETA {e['eta_seconds']:.0f} s"
        )
    if kind == "eval":
        return f"step {e['step']}: validation loss {e['val_loss']:.4f}" + (
            f" (best {e['best_val_loss']:.4f} at step {e['best_step']})" if e.get("best_step") is not None else ""
        )
    if kind == "start":
        origin = f"resuming from step {e['resumed_from']}" if e["resumed_from"] else "starting from step 0"
        return (
            f"training {e['total_steps']} steps on {e['train_rows']} rows ({e['valid_rows']} validation), "
            f"{e['trainable_parameters']:,} trainable parameters, {origin}"
        )
    if kind == "checkpoint":
        return f"checkpoint saved: {e['path']}"
    if kind == "resume":
        return f"resumed from checkpoint {e['checkpoint']}"
    if kind == "done":
        return f"training finished at step {e['step']}; adapter (step {e['adapter_step']}) in {e['adapter_dir']}"
    if kind in ("skip", "warning"):
        return f"{kind}: {e['message']}"
    return None  # an error is raised to the caller, which shows it once


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
        result = training.train(settings, request["model_path"], data, run_dir, on_progress=_emit, fresh=request["fresh"])
    except (training.TrainingError, DataError) as exc:
        _emit({"event": "error", "kind": type(exc).__name__, "message": str(exc)})
        return USER_ERROR_EXIT
    checkpoints.write_json(run_dir / RESULT_FILE, result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
