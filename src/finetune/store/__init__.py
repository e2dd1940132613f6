"""Object storage behind one small interface: S3 (any S3-compatible endpoint) or a local directory."""

from finetune.store.base import (
    ConditionalConflict,
    FileDigest,
    NotFoundError,
    ObjectInfo,
    PreconditionFailed,
    StorageError,
    Store,
    UnsafeKeyError,
    UploadGaveUp,
    VerificationError,
    file_digest,
    join_key,
    new_id,
    redact_url,
    safe_key,
)
from finetune.store.connect import check_reachable, download_uri, open_store, parse_uri
from finetune.store.local import LocalStore
from finetune.store.s3 import S3Store, s3_client, s3_error

__all__ = [
    "ConditionalConflict",
    "FileDigest",
    "LocalStore",
    "NotFoundError",
    "ObjectInfo",
    "PreconditionFailed",
    "S3Store",
    "StorageError",
    "Store",
    "UnsafeKeyError",
    "UploadGaveUp",
    "VerificationError",
    "check_reachable",
    "download_uri",
    "file_digest",
    "join_key",
    "new_id",
    "open_store",
    "parse_uri",
    "redact_url",
    "s3_client",
    "s3_error",
    "safe_key",
]
