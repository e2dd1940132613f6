"""A local directory as a store, with the S3 semantics publishing needs (atomic renames, exclusive links, a lock)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from finetune.config import StorageConfig
from finetune.fsutil import CHUNK, file_digest, fsync_dir
from finetune.store.base import (
    NotFoundError,
    ObjectInfo,
    PreconditionFailed,
    Store,
    VerificationError,
    copy_atomic,
    safe_key,
)


class LocalStore(Store):
    """A directory with the S3 semantics publishing needs (atomic renames, O_EXCL-like links, a file lock)."""

    _TMP = ".tmp"
    _LOCKS = ".locks"

    def __init__(self, root: Path, cfg: StorageConfig | None = None):
        self.root = Path(root).expanduser().absolute()
        self.cfg = cfg or StorageConfig(uri=str(self.root))
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / safe_key(key)

    @contextlib.contextmanager
    def _temp_for(self, data_source: Path | bytes) -> Iterator[Path]:
        """A complete, fsynced copy of the data under the store's temp dir (same filesystem)."""
        tmp_dir = self.root / self._TMP
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp_dir)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(data_source, bytes):
                    out.write(data_source)
                else:
                    with open(data_source, "rb") as src:
                        shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    def _install(self, tmp: Path, dest: Path, exclusive: bool) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if exclusive:
            # A hard link fails if dest exists, and dest appears complete or not at all.
            try:
                os.link(tmp, dest)
            except FileExistsError:
                raise PreconditionFailed(f"{self.uri}: {dest.relative_to(self.root)} already exists") from None
        else:
            os.replace(tmp, dest)
        fsync_dir(dest.parent)

    def put_file(self, key, path, metadata=None, digest=None):
        digest = digest or file_digest(Path(path))
        with self._temp_for(Path(path)) as tmp:
            self._install(tmp, self._path(key), exclusive=False)
        return digest

    def verify(self, key, digest):
        path = self._path(key)
        if not path.is_file():
            raise VerificationError(f"{self.uri}: {key} missing after upload")
        stored = file_digest(path)
        if stored.size != digest.size or stored.sha256 != digest.sha256:
            raise VerificationError(
                f"{self.uri}: {key} stored size/sha256 {stored.size}/{stored.sha256[:12]} "
                f"!= uploaded {digest.size}/{digest.sha256[:12]}"
            )

    def get_file(self, key, dest):
        src = self._path(key)
        if not src.is_file():
            raise NotFoundError(f"{self.uri}: {key} not found")
        return copy_atomic(src, Path(dest))

    def get_bytes(self, key):
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFoundError(f"{self.uri}: {key} not found") from None

    def get_with_etag(self, key):
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, _local_etag(data)

    def put_bytes(self, key, data, *, metadata=None, if_none_match=False, if_match=None):
        dest = self._path(key)
        with self._temp_for(data) as tmp:
            if if_match is None:
                self._install(tmp, dest, exclusive=if_none_match)
            else:
                with self._lock(key):
                    current = self.get_with_etag(key)
                    if current is None:
                        raise NotFoundError(f"{self.uri}: {key} not found (If-Match)")
                    if current[1] != if_match:
                        raise PreconditionFailed(f"{self.uri}: {key} changed since it was read")
                    self._install(tmp, dest, exclusive=False)
        return _local_etag(data)

    def lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        return self._lock(key)

    def finalize(self, staging: str, final: str, names: list[str]) -> dict[str, str]:
        keys = {}
        for name in names:
            src, dest = self._path(f"{staging}/{name}"), self._path(f"{final}/{name}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)  # each file appears whole; the manifest written next makes them the bundle
            fsync_dir(dest.parent)
            keys[name] = f"{final}/{name}"
        return keys

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        import fcntl

        lock_dir = self.root / self._LOCKS
        lock_dir.mkdir(parents=True, exist_ok=True)
        lock_path = lock_dir / hashlib.sha256(key.encode()).hexdigest()
        with open(lock_path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def head(self, key):
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if not path.is_file():
            return None
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def list(self, prefix=""):
        if not self.root.is_dir():
            return []
        result = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            # Temp files and lock files live in hidden directories at the root.
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    st = path.stat()
                    result.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
        return sorted(result, key=lambda info: info.key)

    def delete(self, key):
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Remove emptied directories up to the root so listings stay tidy.
        parent = path.parent
        while parent != self.root and parent.is_dir():
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def uri_for(self, key):
        return str(self._path(key))

    def clean_incomplete(self, before):
        removed = 0
        tmp_dir = self.root / self._TMP
        for path in tmp_dir.iterdir() if tmp_dir.is_dir() else ():
            if datetime.fromtimestamp(path.stat().st_mtime, UTC) < before:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def _local_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'
