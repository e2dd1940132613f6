"""Atomic, self-verifying training checkpoints.

A checkpoint is a directory ``checkpoints/step-NNNNNNN/``. Its files are
written into a temporary sibling directory and fsynced; ``state.json`` goes
last and records the sha256 of every other file, so it is the commit marker;
then the directory is renamed into place and the parent fsynced. A checkpoint
is valid only if its state file parses and every listed file matches its hash:
a kill at any moment leaves either the previous checkpoints untouched or a
temporary directory that the next start deletes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from finetune.errors import FingerprintMismatch
from finetune.fsutil import atomic_dir, discard_dir, file_digest

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{7,})$")
TMP_PREFIX = ".tmp-"
# Fault injection for crash tests: "NAME:STEP" SIGKILLs this process at that point of that step's write.
FAILPOINT_ENV = "FINETUNE_FAILPOINT"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is not a complete, verified checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


@dataclass
class LoopState:
    """Everything besides tensors that a checkpoint must restore."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # micro-batches of ``epoch`` already consumed
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    skipped_batches: int = 0
    supervised_tokens: int = 0

    def record_eval(self, val_loss: float, patience: int | None) -> bool:
        """Note a validation loss at ``step``; True when it is the best so far (early stopping counts the others)."""
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.best_step, self.evals_since_best = val_loss, self.step, 0
            return True
        self.evals_since_best += 1
        self.stopped_early = patience is not None and self.evals_since_best >= patience
        return False


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint directory name, None for any other name."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def save_arrays(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    """safetensors through an open file: mx.save_safetensors would append a suffix to a temp name."""
    with open(path, "wb") as f:
        mx.save_safetensors(f, arrays, metadata=metadata or {})
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def failpoint(name: str, step: int) -> None:
    if os.environ.get(FAILPOINT_ENV) == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def write_checkpoint(
    root: Path,
    step: int,
    arrays: dict[str, dict[str, mx.array]],
    state: dict[str, Any],
) -> Checkpoint:
    """Write ``arrays`` (file stem -> tensors) and ``state`` as checkpoint ``step`` under ``root``."""
    final = root / step_dir_name(step)
    # The same step written again (a resumed run that re-reached it) replaces the old copy.
    with atomic_dir(final) as tmp:
        hashes = {}
        for stem, tensors in arrays.items():
            name = f"{stem}.safetensors"
            save_arrays(tmp / name, tensors)
            hashes[name] = file_digest(tmp / name).sha256
            failpoint(f"checkpoint-{stem}", step)
        full_state = {**state, "format": FORMAT_VERSION, "step": step, "files": hashes}
        write_json(tmp / STATE_FILE, full_state)
        failpoint("checkpoint-rename", step)
    return Checkpoint(final, step, full_state)


def verify(path: Path) -> Checkpoint:
    """Parse and hash-check one checkpoint directory; CheckpointError says what is wrong."""
    match = _NAME.match(path.name)
    if not match:
        raise CheckpointError(f"{path}: not a checkpoint directory name")
    state_path = path / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {STATE_FILE} (incomplete write)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_path}: unreadable ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or not isinstance(state.get("files"), dict):
        raise CheckpointError(f"{state_path}: unknown checkpoint format")
    if state.get("step") != int(match.group(1)):
        raise CheckpointError(f"{state_path}: step {state.get('step')} does not match the directory name")
    for name, digest in state["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if file_digest(file).sha256 != digest:
            raise CheckpointError(f"{file}: sha256 mismatch (corrupt or truncated)")
    return Checkpoint(path, state["step"], state)


def committed(root: Path) -> list[Path]:
    """Checkpoint directories by step, oldest first (not yet verified)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def remove_leftovers(root: Path) -> None:
    """Delete temporary directories of interrupted writes."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def latest_valid(root: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; broken ones are logged and skipped, never fatal."""
    for path in reversed(committed(root)):
        try:
            return verify(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def prune(root: Path, keep_last: int, keep_step: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and the one at ``keep_step``."""
    paths = committed(root)
    keep = set(paths[-keep_last:])
    removed = []
    for path in paths:
        if path not in keep and path.name != (step_dir_name(keep_step) if keep_step is not None else None):
            discard_dir(path)
            removed.append(path)
    return removed


def load_arrays(checkpoint: Checkpoint, stem: str) -> dict[str, mx.array]:
    return mx.load(str(checkpoint.file(f"{stem}.safetensors")))


def load_trained(checkpoint: Checkpoint, model: Any, optimizer: Any) -> None:
    """The checkpoint's adapter into ``model``'s LoRA layers and its per-tensor state into ``optimizer``."""
    adapter = load_arrays(checkpoint, "adapters")
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(adapter) != set(expected) or any(adapter[k].shape != expected[k].shape for k in expected):
        raise FingerprintMismatch(f"{checkpoint.path}: adapter tensors do not match the model's LoRA layers")
    model.load_weights(list(adapter.items()), strict=False)
    optimizer.state = tree_unflatten(list(load_arrays(checkpoint, "optimizer").items()))
    mx.eval(model.parameters(), optimizer.state)
