"""Crash-safe writes and file hashes shared by every module that writes to disk.

A reader (or a resumed run) must see the old file or the new one, never half:
write beside the target, fsync, rename over it, fsync the directory. The same
holds for directories (a checkpoint, an adapter, a fetched bundle).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    """What a file is: its size, sha256 (hex) and CRC32 (base64, as S3 reports it)."""

    size: int
    sha256: str
    crc32: str


def digest_chunks(chunks: Iterable[bytes]) -> FileDigest:
    """sha256 and CRC32 of a stream in one pass."""
    sha, crc, size = hashlib.sha256(), 0, 0
    for chunk in chunks:
        sha.update(chunk)
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
    return FileDigest(size, sha.hexdigest(), base64.b64encode(crc.to_bytes(4, "big")).decode())


def file_digest(path: Path | str) -> FileDigest:
    """The one file hash: size, sha256 and CRC32 in one read."""
    with open(path, "rb") as f:
        return digest_chunks(iter(lambda: f.read(CHUNK), b""))


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside ``path``; when the block succeeds it is fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: Path | str, *, replace: bool = True) -> Iterator[Path]:
    """A temporary directory beside ``path``; when the block succeeds it is fsynced and renamed to ``path``.

    An existing ``path`` is replaced (moved aside, then deleted), or with ``replace=False`` kept as it
    is: the caller names directories by their content, so an existing one is already complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        install_dir(tmp, path, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_dir(tmp: Path, path: Path, *, replace: bool = True) -> Path:
    """Rename the finished directory ``tmp`` to ``path`` (see :func:`atomic_dir` for ``replace``)."""
    fsync_dir(tmp)
    if path.exists() and not replace:
        return path
    if path.exists():
        discard_dir(path)
    try:
        os.rename(tmp, path)
    except OSError:
        if replace or not path.exists():  # else another process just installed the same content
            raise
    fsync_dir(path.parent)
    return path


def discard_dir(path: Path) -> None:
    """Delete a directory so that no reader ever sees it half-deleted: rename it aside first."""
    trash = path.with_name(f".tmp-old-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def write_bytes_atomic(path: Path | str, payload: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def write_json_atomic(path: Path | str, data: Any) -> Path:
    return write_bytes_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode("utf-8"))
