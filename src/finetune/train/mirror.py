"""Checkpoints mirrored to the object store, so a retry on another machine resumes where the last one stopped.

Uploads run in the training parent (the child never holds storage credentials),
in a background thread; a failed upload is a warning, never a failed training.
A remote checkpoint commits like a local one: its state file goes last.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from finetune.config import Settings
from finetune.errors import StorageError
from finetune.fsutil import atomic_dir
from finetune.layout import CHECKPOINTS_DIR, checkpoints_key
from finetune.train import checkpoints
from finetune.train.checkpoints import STATE_FILE, Checkpoint, CheckpointError, step_of, verify

log = logging.getLogger(__name__)

Log = Callable[[str], None]


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
        if step_of(name) is not None:
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
    with atomic_dir(root / name) as tmp:
        for key in keys:
            store.get_file(key, tmp / key.rsplit("/", 1)[1])
    try:
        return verify(root / name)
    except CheckpointError:
        shutil.rmtree(root / name, ignore_errors=True)
        raise


def pull_latest(store: Any, prefix: str, root: Path) -> Checkpoint | None:
    """Download the newest remote checkpoint that verifies; broken ones are skipped with a warning."""
    for name in sorted(remote_steps(store, prefix), key=step_of, reverse=True):
        try:
            return pull(store, prefix, root, name)
        except Exception as exc:  # a broken remote copy must not stop a resume from an older one
            log.warning("skipping remote checkpoint %s/%s: %s", prefix, name, exc)
    return None


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
    def open(cls, settings: Settings, run_dir: Path, log: Log, fresh: bool) -> CheckpointMirror | None:
        if not settings.training.mirror_checkpoints:
            return None
        from finetune.store import open_store

        root = run_dir / CHECKPOINTS_DIR
        try:
            mirror = cls(
                open_store(settings.storage), checkpoints_key(run_dir.name), root, settings.training.mirror_every, log
            )
            if fresh:
                prune_remote(mirror.store, mirror.prefix, keep=set())
            elif checkpoints.latest_valid(root) is None:
                pulled = pull_latest(mirror.store, mirror.prefix, root)
                if pulled is not None:
                    log(f"no local checkpoint; fetched step {pulled.step} from {mirror.store.uri_for(mirror.prefix)}")
                    mirror.mirrored.add(pulled.path.name)
                    mirror.pull_best(pulled)
        except StorageError as exc:
            log(f"warning: checkpoint mirroring disabled: {exc}")
            return None
        return mirror

    def pull_best(self, latest: Checkpoint) -> None:
        """The best-validation checkpoint too: it may become the final adapter."""
        best = latest.state["loop"].get("best_step")
        if best is None or best == latest.step:
            return
        name = checkpoints.step_dir_name(best)
        try:
            pull(self.store, self.prefix, self.root, name)
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
        for path in paths:
            if path.name in self.mirrored:
                continue
            try:
                mirror(self.store, self.prefix, verify(path))
            except (CheckpointError, StorageError, OSError) as exc:
                self.log(f"warning: checkpoint {path.name} not mirrored: {exc}")
                continue
            self.mirrored.add(path.name)
            self.log(f"checkpoint {path.name} mirrored to {self.store.uri_for(self.prefix)}")
        local = {p.name for p in checkpoints.committed(self.root)}
        try:
            prune_remote(self.store, self.prefix, keep=local)
        except StorageError as exc:
            self.log(f"warning: pruning mirrored checkpoints failed: {exc}")
        self.mirrored &= local
