"""Opening a store from a URI (a local path, file://… or s3://bucket/prefix), checking it, fetching one object."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from finetune.config import StorageConfig
from finetune.store.base import NotFoundError, StorageError, Store, copy_atomic
from finetune.store.local import LocalStore
from finetune.store.s3 import S3Store, s3_client, s3_error


def parse_uri(uri: str) -> tuple[str, str, str]:
    """Split a storage URI into ``("s3", bucket, key_or_prefix)`` or ``("local", path, "")``."""
    uri = uri.strip()
    if not uri:
        raise StorageError("storage.uri is empty")
    if uri.startswith("s3://"):
        rest = uri[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StorageError(f"storage.uri {uri}: missing bucket name")
        return "s3", bucket, prefix.strip("/")
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        host = "" if parts.netloc in ("", "localhost") else parts.netloc
        return "local", unquote(host + parts.path), ""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", uri):
        raise StorageError(f"storage.uri {uri}: unsupported scheme (use a local path, file:// or s3://)")
    return "local", uri, ""


def open_store(cfg: StorageConfig, uri: str | None = None) -> Store:
    """The store for ``uri`` (default ``cfg.uri``): a local directory, ``file://…`` or ``s3://bucket/prefix``."""
    kind, where, prefix = parse_uri(uri or cfg.uri)
    if kind == "local":
        return LocalStore(Path(where), cfg)
    return S3Store(s3_client(cfg), where, prefix, cfg, cfg.endpoint_url)


def check_reachable(store: Store) -> None:
    """Raise a one-line :class:`StorageError` if the store cannot be used; writes nothing."""
    if isinstance(store, LocalStore):
        _check_local(store.root)
        return
    assert isinstance(store, S3Store)
    try:
        store.client.head_bucket(Bucket=store.bucket)
    except Exception as exc:
        err = s3_error(exc, f"storage.uri {store._where()}")
        if isinstance(err, NotFoundError):
            err = StorageError(f"storage.uri {store._where()}: bucket not found")
        raise err from None


def _check_local(root: Path) -> None:
    probe = root
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise StorageError(f"storage.uri {root}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageError(f"storage.uri {root}: {probe} is not writable")


def download_uri(cfg: StorageConfig, uri: str, dest: Path) -> Path:
    """Fetch one object (``s3://bucket/key``, ``file://…`` or a local path) to ``dest``.

    ``dest`` may be an existing directory (the object's base name is used) or a file path.
    The write is atomic. Credentials and endpoint come from ``cfg``.
    """
    kind, where, key = parse_uri(uri)
    dest = Path(dest)
    if kind == "local":
        src = Path(where)
        if not src.is_file():
            raise NotFoundError(f"{uri}: not found")
        target = dest / src.name if dest.is_dir() else dest
        return copy_atomic(src, target)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri}: expected s3://bucket/key of one object")
    target = dest / key.rsplit("/", 1)[-1] if dest.is_dir() else dest
    store = S3Store(s3_client(cfg), where, "", cfg, cfg.endpoint_url)
    return store.get_full_key(key, target)
