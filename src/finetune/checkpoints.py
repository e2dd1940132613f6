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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{7,})$")
_TMP_PREFIX = ".tmp-"
# Fault injection for crash tests: "NAME:STEP" SIGKILLs this process at that point of that step's write.
FAILPOINT_ENV = "FINETUNE_FAILPOINT"
from finetune.fsutil import fsync_dir, sha256_file


class CheckpointError(RuntimeError):
    """A checkpoint directory that is not a complete, verified checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


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
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-", dir=root))
    try:
        hashes = {}
        for stem, tensors in arrays.items():
            name = f"{stem}.safetensors"
            save_arrays(tmp / name, tensors)
            hashes[name] = sha256_file(tmp / name)
            failpoint(f"checkpoint-{stem}", step)
        full_state = {**state, "format": FORMAT_VERSION, "step": step, "files": hashes}
        write_json(tmp / STATE_FILE, full_state)
        fsync_dir(tmp)
        failpoint("checkpoint-rename", step)
        if final.exists():
            # Same step written again (a resumed run that re-reached it): replace the old copy.
            _discard(final)
        os.replace(tmp, final)
        fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Checkpoint(final, step, full_state)


def _discard(path: Path) -> None:
    trash = path.with_name(f"{_TMP_PREFIX}old-{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


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
        if sha256_file(file) != digest:
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
            if p.name.startswith(_TMP_PREFIX):
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
            _discard(path)
            removed.append(path)
    return removed


def load_arrays(checkpoint: Checkpoint, stem: str) -> dict[str, mx.array]:
    return mx.load(str(checkpoint.file(f"{stem}.safetensors")))


# ---------------------------------------------------------------- mirroring to an object store


def remote_prefix(run_id: str) -> str:
    """Where a run's checkpoints live in the store; apart from ``runs/`` so bundle publishing never sees them."""
    return f"training/{run_id}/checkpoints"


def mirror(store: Any, prefix: str, ckpt: Checkpoint) -> None:
    """Upload a verified checkpoint; its state file goes last, so the remote copy also commits atomically."""
    for name, sha in ckpt.state["files"].items():
        key = f"{prefix}/{ckpt.path.name}/{name}"
        digest = store.put_file(key, ckpt.file(name))
        if digest.sha256 != sha:
            raise CheckpointError(f"{ckpt.file(name)}: changed since the checkpoint was written")
        store.verify(key, digest)
    key = f"{prefix}/{ckpt.path.name}/{STATE_FILE}"
    store.verify(key, store.put_file(key, ckpt.file(STATE_FILE)))


def remote_steps(store: Any, prefix: str) -> dict[str, list[str]]:
    """Remote checkpoint directory name -> its object keys."""
    found: dict[str, list[str]] = {}
    for info in store.list(prefix + "/"):
        name = info.key[len(prefix) + 1 :].split("/", 1)[0]
        if _NAME.match(name):
            found.setdefault(name, []).append(info.key)
    return found


def prune_remote(store: Any, prefix: str, keep: set[str]) -> None:
    """Delete remote checkpoints not in ``keep``, state file first so a half-deleted one is never taken as valid."""
    for name, keys in remote_steps(store, prefix).items():
        if name not in keep:
            keys.sort(key=lambda k: not k.endswith("/" + STATE_FILE))
            store.delete_many(keys)


def pull(store: Any, prefix: str, root: Path, name: str) -> Checkpoint:
    """Download one remote checkpoint into ``root`` (temp dir, rename) and verify it; CheckpointError if broken."""
    keys = remote_steps(store, prefix).get(name, [])
    if f"{prefix}/{name}/{STATE_FILE}" not in keys:
        raise CheckpointError(f"{prefix}/{name}: not in the store or not committed")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root))
    try:
        for key in keys:
            store.get_file(key, tmp / key.rsplit("/", 1)[1])
        fsync_dir(tmp)
        if (root / name).exists():
            _discard(root / name)
        os.replace(tmp, root / name)
        try:
            return verify(root / name)
        except CheckpointError:
            shutil.rmtree(root / name, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pull_latest(store: Any, prefix: str, root: Path) -> Checkpoint | None:
    """Download the newest remote checkpoint that verifies; broken ones are skipped with a warning."""
    for name in sorted(remote_steps(store, prefix), key=lambda n: int(_NAME.match(n).group(1)), reverse=True):
        try:
            return pull(store, prefix, root, name)
        except Exception as exc:  # a broken remote copy must not stop a resume from an older one
            log.warning("skipping remote checkpoint %s/%s: %s", prefix, name, exc)
    return None
