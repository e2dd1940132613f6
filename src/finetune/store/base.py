"""The store interface (keys, digests, errors) that the local and the S3 backend implement.

Both backends give the same guarantees, which publishing relies on:
- a reader never sees a partly written object (S3 commits whole objects; the local
  backend writes a temp file, fsyncs and renames);
- ``put_bytes(if_none_match=True)`` creates only if absent and ``put_bytes(if_match=etag)``
  replaces only the version the caller read (S3 conditional writes; locally hard links
  and a file lock);
- keys are relative to the store's root or prefix and checked by :func:`safe_key`.

Retries live in botocore (standard mode, ``storage.max_attempts`` HTTP attempts per call,
explicit timeouts). Nothing in this module retries on top of it.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from finetune.config import StorageConfig
from finetune.errors import StorageError
from finetune.fsutil import CHUNK, FileDigest, atomic_path, digest_chunks, file_digest

__all__ = ["CHUNK", "FileDigest", "StorageError", "digest_chunks", "file_digest"]


class NotFoundError(StorageError):
    """The object does not exist."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


class ConditionalConflict(StorageError):
    """S3 409 ConditionalRequestConflict: a concurrent conditional write; safe to retry the step."""


class VerificationError(StorageError):
    """The stored object does not match what we uploaded."""


class UploadGaveUp(StorageError):
    """An upload failed after the SDK's own retries were spent."""


class UnsafeKeyError(StorageError):
    """An object key that could escape a directory or hide a file."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime
    etag: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    crc32: str | None = None


_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def safe_key(key: str) -> str:
    """Return ``key`` if it is a plain relative path, else raise :class:`UnsafeKeyError`.

    Refused: empty keys, a leading ``/``, ``//``, ``.``/``..`` segments, segments starting
    with ``.`` (hidden files; the local backend keeps its temp files there), backslashes
    and control characters. Such keys could write outside a destination directory.
    """
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise UnsafeKeyError(f"unsafe object key {key!r}: empty or too long")
    if _UNSAFE_CHARS.search(key):
        raise UnsafeKeyError(f"unsafe object key {key!r}: backslash or control character")
    if key.startswith("/"):
        raise UnsafeKeyError(f"unsafe object key {key!r}: absolute")
    for segment in key.split("/"):
        if segment == "":
            raise UnsafeKeyError(f"unsafe object key {key!r}: empty segment")
        if segment.startswith("."):
            raise UnsafeKeyError(f"unsafe object key {key!r}: segment {segment!r} starts with '.'")
    return key


def join_key(*parts: str) -> str:
    return safe_key("/".join(p.strip("/") for p in parts if p.strip("/")))


def redact_url(url: str) -> str:
    """Drop user:password from a URL so it can be shown."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class Store(ABC):
    """A flat key space of whole objects. Keys are relative to the store's root."""

    uri: str  # shown to users and recorded in manifests; never contains credentials
    cfg: StorageConfig  # retry and transfer settings for the layers above

    @abstractmethod
    def put_file(
        self, key: str, path: Path, metadata: dict[str, str] | None = None, digest: FileDigest | None = None
    ) -> FileDigest:
        """Upload a file (multipart when large); returns its digest, which ``verify`` checks."""

    @abstractmethod
    def verify(self, key: str, digest: FileDigest) -> None:
        """Raise :class:`VerificationError` unless the stored object matches ``digest``."""

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> Path:
        """Download to ``dest`` atomically (temp file + rename in dest's directory)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's content; :class:`NotFoundError` if absent."""

    @abstractmethod
    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        """Content and ETag for a later ``put_bytes(if_match=...)``; None if absent."""

    @abstractmethod
    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        metadata: dict[str, str] | None = None,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Write a small object; returns its ETag. Conditional writes raise
        :class:`PreconditionFailed` (or :class:`NotFoundError` for If-Match on a missing key)."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""

    def lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        """Exclusive access to ``key`` among this store's writers; S3 needs none (its conditional writes decide)."""
        return contextlib.nullcontext()

    def finalize(self, staging: str, final: str, names: list[str]) -> dict[str, str]:
        """Where the verified files of ``staging`` are read from once published (name -> key).

        S3 keeps them in place (the manifest points at the attempt); a local store moves them into
        ``final`` so that the run's directory itself is the bundle.
        """
        return {name: join_key(staging, name) for name in names}

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self.delete(key)

    def uri_for(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{safe_key(key)}"

    @abstractmethod
    def clean_incomplete(self, before: datetime) -> int:
        """Remove uploads that never completed and started before ``before`` (a killed process's
        multipart uploads or temp files); returns how many."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def copy_atomic(src: Path, dest: Path) -> Path:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest


def new_id() -> str:
    """A sortable, unique id: UTC timestamp plus randomness."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:12]
