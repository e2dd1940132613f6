"""Object storage behind one small interface: S3 (any S3-compatible endpoint) or a local directory.

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

import base64
import contextlib
import functools
import hashlib
import os
import re
import shutil
import tempfile
import uuid
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from finetune.config import StorageConfig
from finetune.fsutil import atomic_path, fsync_dir

_CHUNK = 1 << 20


class StorageError(RuntimeError):
    """A storage problem, phrased as one line naming the store (never its credentials)."""


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
class FileDigest:
    """What a file is: its size, sha256 (hex) and CRC32 (base64, as S3 reports it)."""

    size: int
    sha256: str
    crc32: str

    @classmethod
    def of_bytes(cls, data: bytes) -> FileDigest:
        return cls(len(data), hashlib.sha256(data).hexdigest(), _crc32_b64(zlib.crc32(data)))


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime
    etag: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    crc32: str | None = None


def _crc32_b64(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def file_digest(path: Path) -> FileDigest:
    """sha256 and CRC32 of a file in one read."""
    sha = hashlib.sha256()
    crc = 0
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return FileDigest(size, sha.hexdigest(), _crc32_b64(crc))


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
    def put_file(self, key: str, path: Path, metadata: dict[str, str] | None = None,
                 digest: FileDigest | None = None) -> FileDigest:
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
    def put_bytes(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None,
                  if_none_match: bool = False, if_match: str | None = None) -> str:
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


# --------------------------------------------------------------------------- local


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
                        shutil.copyfileobj(src, out, _CHUNK)
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
        return _copy_atomic(src, Path(dest))

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
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))

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
                    result.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc)))
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
            if datetime.fromtimestamp(path.stat().st_mtime, timezone.utc) < before:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def _local_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def _copy_atomic(src: Path, dest: Path) -> Path:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest


# --------------------------------------------------------------------------- S3


class S3Store(Store):
    """S3 or any S3-compatible store through boto3; keys live under ``s3://bucket/prefix/``."""

    def __init__(self, client: Any, bucket: str, prefix: str, cfg: StorageConfig, endpoint: str | None = None):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cfg = cfg
        self.endpoint = redact_url(endpoint) if endpoint else None
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def _full(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def _where(self) -> str:
        return f"{self.uri} (endpoint {self.endpoint})" if self.endpoint else self.uri

    def _error(self, exc: BaseException, op: str, key: str | None = None) -> StorageError:
        return s3_error(exc, f"{self._where()}: {op}" + (f" {key}" if key else ""))

    def _checksums_on(self) -> bool:
        return self.cfg.checksum_mode == "when_supported"

    def put_file(self, key, path, metadata=None, digest=None):
        from boto3.exceptions import S3UploadFailedError
        from boto3.s3.transfer import TransferConfig

        path = Path(path)
        digest = digest or file_digest(path)
        extra: dict[str, Any] = {"Metadata": {**(metadata or {}), "sha256": digest.sha256}}
        if self._checksums_on():
            # The full-object CRC32 lets S3 validate the whole upload, multipart included.
            extra.update(ChecksumAlgorithm="CRC32", ChecksumCRC32=digest.crc32)
        mib = 1 << 20
        transfer = TransferConfig(
            multipart_threshold=self.cfg.multipart_threshold_mib * mib,
            multipart_chunksize=self.cfg.multipart_chunk_mib * mib,
            max_concurrency=self.cfg.max_concurrency,
        )
        try:
            self.client.upload_file(str(path), self.bucket, self._full(key), ExtraArgs=extra, Config=transfer)
        except S3UploadFailedError as exc:
            raise self._upload_failure(exc, key) from None
        except Exception as exc:  # transport errors after botocore's retries
            raise self._error(exc, "upload", key) from None
        return digest

    def _upload_failure(self, exc: BaseException, key: str) -> StorageError:
        """boto3 wraps the last ClientError; only a transient one (the SDK retried and gave up) is worth a new step."""
        cause = exc.__context__
        status = getattr(cause, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if cause is None or status is None or status >= 500 or status == 429:
            return UploadGaveUp(f"{self._where()}: upload {key} failed: {_one_line(exc)}")
        return self._error(cause, "upload", key)

    def verify(self, key, digest):
        info = self._head(key, checksum=True)
        if info is None:
            raise VerificationError(f"{self._where()}: {key} missing after upload")
        problems = []
        if info.size != digest.size:
            problems.append(f"size {info.size} != {digest.size}")
        if info.metadata.get("sha256") != digest.sha256:
            problems.append(f"metadata sha256 {info.metadata.get('sha256')!r} != {digest.sha256[:12]}…")
        if info.crc32 is not None and info.crc32 != digest.crc32:
            problems.append(f"stored CRC32 {info.crc32} != {digest.crc32}")
        if not problems and (info.crc32 is None or self.cfg.verify_read_back):
            # No stored checksum to compare (checksum_mode=when_required, older providers), or a store
            # that records the client's checksum without validating it: read the object back.
            stored = self._stream_digest(key)
            if stored.sha256 != digest.sha256:
                problems.append(f"content sha256 {stored.sha256[:12]}… != {digest.sha256[:12]}…")
        if problems:
            raise VerificationError(f"{self._where()}: {key} does not match the upload: " + "; ".join(problems))

    def _stream_digest(self, key: str) -> FileDigest:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
            sha, crc, size = hashlib.sha256(), 0, 0
            for chunk in body.iter_chunks(_CHUNK):
                sha.update(chunk)
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
        except Exception as exc:
            raise self._error(exc, "read back", key) from None
        return FileDigest(size, sha.hexdigest(), _crc32_b64(crc))

    def get_file(self, key, dest):
        return self.get_full_key(self._full(key), Path(dest))

    def get_full_key(self, full_key: str, dest: Path) -> Path:
        """Download ``full_key`` (not relative to the prefix) to ``dest`` atomically."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        os.close(fd)
        try:
            self.client.download_file(self.bucket, full_key, name)
            with open(name, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(name, dest)
        except Exception as exc:
            Path(name).unlink(missing_ok=True)
            if isinstance(exc, StorageError):
                raise
            raise self._error(exc, "download", full_key) from None
        return dest

    def get_bytes(self, key):
        got = self.get_with_etag(key)
        if got is None:
            raise NotFoundError(f"{self._where()}: {key} not found")
        return got[0]

    def get_with_etag(self, key):
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            return resp["Body"].read(), resp["ETag"]
        except Exception as exc:
            err = self._error(exc, "get", key)
            if isinstance(err, NotFoundError):
                return None
            raise err from None

    def put_bytes(self, key, data, *, metadata=None, if_none_match=False, if_match=None):
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key), "Body": data,
                                "Metadata": {**(metadata or {}), "sha256": hashlib.sha256(data).hexdigest()}}
        if key.endswith(".json"):
            args["ContentType"] = "application/json"
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = if_match
        try:
            return self.client.put_object(**args)["ETag"]
        except Exception as exc:
            raise self._error(exc, "put", key) from None

    def head(self, key):
        return self._head(key, checksum=False)

    def _head(self, key: str, checksum: bool) -> ObjectInfo | None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key)}
        if checksum and self._checksums_on():
            args["ChecksumMode"] = "ENABLED"
        try:
            resp = self.client.head_object(**args)
        except Exception as exc:
            err = self._error(exc, "head", key)
            if isinstance(err, NotFoundError):
                return None
            raise err from None
        return ObjectInfo(key, resp["ContentLength"], resp["LastModified"], resp.get("ETag"),
                          resp.get("Metadata", {}), resp.get("ChecksumCRC32"))

    def list(self, prefix=""):
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        result = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix):
                for obj in page.get("Contents", []):
                    result.append(ObjectInfo(self._rel(obj["Key"]), obj["Size"], obj["LastModified"], obj.get("ETag")))
        except Exception as exc:
            raise self._error(exc, "list", prefix or "/") from None
        return sorted(result, key=lambda info: info.key)

    def delete(self, key):
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as exc:
            raise self._error(exc, "delete", key) from None

    def delete_many(self, keys):
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._full(k)} for k in keys[start:start + 1000]]
            try:
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as exc:
                raise self._error(exc, "delete", f"{len(batch)} objects") from None
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(f"{self._where()}: delete {self._rel(first['Key'])}: {first.get('Code')} {first.get('Message')}")


    def clean_incomplete(self, before):
        aborted = 0
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < before:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                        aborted += 1
        except Exception as exc:
            raise self._error(exc, "abort incomplete uploads") from None
        return aborted


def s3_error(exc: BaseException, context: str) -> StorageError:
    """Translate a botocore/boto3 exception into a one-line StorageError subclass."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        FlexibleChecksumError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = err.get("Message") or code
        if code == "NoSuchBucket":
            return StorageError(f"{context}: bucket not found")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFoundError(f"{context}: not found")
        if code in ("PreconditionFailed", "412") or status == 412:
            return PreconditionFailed(f"{context}: precondition failed")
        if code == "ConditionalRequestConflict" or status == 409:
            return ConditionalConflict(f"{context}: conflicting conditional request (409 {code})")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            return StorageError(f"{context}: access denied ({code}); check storage credentials")
        return StorageError(f"{context}: {code or status} {message}")
    if isinstance(exc, FlexibleChecksumError):
        return VerificationError(f"{context}: the object does not match its stored checksum ({_one_line(exc)})")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{context}: no usable credentials; set storage.access_key_id/secret_access_key or the AWS environment"
        )
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return StorageError(f"{context}: cannot connect to the endpoint")
    if isinstance(exc, ReadTimeoutError):
        return StorageError(f"{context}: read timed out")
    return StorageError(f"{context}: {type(exc).__name__}: {_one_line(exc)}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- opening


def parse_uri(uri: str) -> tuple[str, str, str]:
    """Split a storage URI into ``("s3", bucket, key_or_prefix)`` or ``("local", path, "")``."""
    uri = uri.strip()
    if not uri:
        raise StorageError("storage.uri is empty")
    if uri.startswith("s3://"):
        rest = uri[len("s3://"):]
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


def s3_client(cfg: StorageConfig) -> Any:
    """A boto3 S3 client with bounded standard-mode retries and explicit timeouts."""
    import boto3
    from botocore.config import Config

    keys = (cfg.access_key_id, cfg.secret_access_key)
    if (keys[0] is None) != (keys[1] is None):
        raise StorageError("storage.access_key_id and storage.secret_access_key must be set together")
    session = boto3.session.Session(
        botocore_session=_botocore_session(),
        aws_access_key_id=keys[0].get_secret_value() if keys[0] else None,
        aws_secret_access_key=keys[1].get_secret_value() if keys[1] else None,
        aws_session_token=cfg.session_token.get_secret_value() if cfg.session_token else None,
        region_name=cfg.region,
    )
    config = Config(
        retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        request_checksum_calculation=cfg.checksum_mode,
        response_checksum_validation=cfg.checksum_mode,
        s3={"addressing_style": cfg.addressing_style},
        max_pool_connections=max(10, cfg.max_concurrency),
    )
    return session.client("s3", endpoint_url=cfg.endpoint_url, config=config)


@functools.cache
def _shared_loader() -> Any:
    import botocore.loaders

    return botocore.loaders.create_loader()


def _botocore_session() -> Any:
    """A fresh session (own credentials) sharing one loader: parsing the S3 model costs ~0.3 s per client."""
    import botocore.session

    session = botocore.session.Session()
    session.register_component("data_loader", _shared_loader())
    return session


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
        return _copy_atomic(src, target)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri}: expected s3://bucket/key of one object")
    target = dest / key.rsplit("/", 1)[-1] if dest.is_dir() else dest
    store = S3Store(s3_client(cfg), where, "", cfg, cfg.endpoint_url)
    return store.get_full_key(key, target)


def new_id() -> str:
    """A sortable, unique id: UTC timestamp plus randomness."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:12]
