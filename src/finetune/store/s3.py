"""S3 or any S3-compatible store through boto3: bounded standard-mode retries, full-object CRC32, conditional writes."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from finetune.config import StorageConfig
from finetune.fsutil import CHUNK, FileDigest, digest_chunks, file_digest
from finetune.store.base import (
    ConditionalConflict,
    NotFoundError,
    ObjectInfo,
    PreconditionFailed,
    StorageError,
    Store,
    UploadGaveUp,
    VerificationError,
    redact_url,
    safe_key,
)


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
        return full[len(self.prefix) + 1 :] if self.prefix else full

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
            return digest_chunks(body.iter_chunks(CHUNK))
        except Exception as exc:
            raise self._error(exc, "read back", key) from None

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
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._full(key),
            "Body": data,
            "Metadata": {**(metadata or {}), "sha256": hashlib.sha256(data).hexdigest()},
        }
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
        return ObjectInfo(
            key,
            resp["ContentLength"],
            resp["LastModified"],
            resp.get("ETag"),
            resp.get("Metadata", {}),
            resp.get("ChecksumCRC32"),
        )

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
            batch = [{"Key": self._full(k)} for k in keys[start : start + 1000]]
            try:
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as exc:
                raise self._error(exc, "delete", f"{len(batch)} objects") from None
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(
                    f"{self._where()}: delete {self._rel(first['Key'])}: {first.get('Code')} {first.get('Message')}"
                )

    def clean_incomplete(self, before):
        aborted = 0
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < before:
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
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
