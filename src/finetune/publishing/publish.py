"""Publishing adapter bundles: staged per attempt, verified, committed once by the run's manifest.

Layout under the store's root (or ``s3://bucket/prefix``)::

    runs/<run_id>/attempts/<attempt_id>/<bundle files>   staging, one prefix per attempt
    runs/<run_id>/manifest.json                          the commit point, written once (If-None-Match: *)
    champion.json                                        the pointer, compare-and-swapped (If-Match: ETag)

A local store then moves the verified attempt's files into ``runs/<run_id>/`` (under the run's
lock, before the manifest), so that the run's directory is itself the bundle mlx-lm loads; on S3
the manifest points at the attempt's keys and ``finetune pull`` makes the plain directory.

A reader trusts only files a manifest lists, so an interrupted attempt is invisible, and
``gc`` removes it later. The manifest records each file's sha256 and size; downloads are
checked against it. Any error on a conditional write is reconciled by re-reading: our own
write whose response was lost counts as success, someone else's is never overwritten.

Retries: botocore retries every HTTP call (``storage.max_attempts``). Only failures the SDK
does not retry re-run a whole idempotent step here (409 ConditionalRequestConflict, a failed
verification, an upload that gave up), ``storage.step_attempts`` times.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from finetune.errors import PublishError, StorageError
from finetune.layout import ADAPTER_FILES, ATTEMPTS_DIR, MANIFEST_FILE, attempt_key, manifest_key, run_key
from finetune.store import (
    ConditionalConflict,
    FileDigest,
    NotFoundError,
    Store,
    UnsafeKeyError,
    UploadGaveUp,
    VerificationError,
    file_digest,
    join_key,
    new_id,
    safe_key,
)

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "finetune-manifest/1"
REQUIRED_FILES = ADAPTER_FILES
# Weights must be safetensors; everything else in a bundle is text, JSON or an image. Pickle-based
# formats (.bin, .pt, .pkl, .ckpt, .npy…) are refused both when publishing and when fetching.
# .gguf: exported models; like safetensors a typed tensor container, nothing in it is executed on load.
ALLOWED_SUFFIXES = frozenset(
    {
        ".safetensors",
        ".gguf",
        ".json",
        ".jsonl",
        ".jinja",
        ".txt",
        ".md",
        ".yaml",
        ".yml",
        ".csv",
        ".png",
        ".svg",
        ".html",
    }
)
_RESERVED_FIELDS = frozenset({"format", "run_id", "attempt_id", "created", "files", "store"})

T = TypeVar("T")


class AlreadyPublished(PublishError):
    """The run already has a manifest (from another attempt); it is never overwritten."""


class BundleError(StorageError):
    """A bundle that must not be loaded: unsafe names, disallowed files or a sha256 mismatch."""


@dataclass(frozen=True)
class PublishedRun:
    run_id: str
    attempt_id: str
    manifest_key: str
    uri: str  # where the run lives, e.g. s3://bucket/prefix/runs/<run_id>
    manifest: dict[str, Any]
    reused: bool = False  # True when an identical bundle was already published by an earlier attempt


def check_bundle_name(rel: str, where: str) -> str:
    """A bundle-relative file name that is safe to write anywhere and is not a pickle-format weight file."""
    try:
        safe_key(rel)
    except UnsafeKeyError as exc:
        raise BundleError(f"{where}: {exc}") from None
    suffix = os.path.splitext(rel)[1].lower()
    if suffix not in ALLOWED_SUFFIXES:
        raise BundleError(
            f"{where}: refusing {rel!r}: weights must be .safetensors; allowed file types are "
            + ", ".join(sorted(ALLOWED_SUFFIXES))
        )
    return rel


# --------------------------------------------------------------------------- retries


def run_step(store: Store, what: str, fn: Callable[[], T]) -> T:
    """Run an idempotent step, re-running it only for failures the SDK does not retry."""

    def note(state: Any) -> None:
        log.warning(
            "%s: %s; retrying the step (attempt %d of %d)",
            what,
            state.outcome.exception(),
            state.attempt_number + 1,
            store.cfg.step_attempts,
        )

    retrying = Retrying(
        stop=stop_after_attempt(store.cfg.step_attempts),
        wait=wait_exponential(multiplier=store.cfg.step_retry_wait_seconds, max=60),
        retry=retry_if_exception_type((ConditionalConflict, VerificationError, UploadGaveUp)),
        before_sleep=note,
        reraise=True,
    )
    return retrying(fn)


def reread(read: Callable[[], T], error: StorageError) -> T:
    """Read back after an ambiguous write; when the store cannot be read either, the write's error stands."""
    try:
        return read()
    except StorageError as exc:
        raise error from exc


# --------------------------------------------------------------------------- publishing


def bundle_files(bundle_dir: Path) -> dict[str, Path]:
    """Bundle-relative names of the files to publish (hidden files are skipped)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise PublishError(f"bundle {bundle_dir}: not a directory")
    files: dict[str, Path] = {}
    for path in sorted(bundle_dir.rglob("*")):
        rel = path.relative_to(bundle_dir).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or path.is_dir():
            continue
        if path.is_symlink() or not path.is_file():
            raise BundleError(f"bundle {bundle_dir}: {rel} is not a regular file")
        files[check_bundle_name(rel, f"bundle {bundle_dir}")] = path
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise BundleError(f"bundle {bundle_dir}: missing {', '.join(missing)}")
    return files


def _manifest_bytes(manifest: Mapping[str, Any], store: Store) -> bytes:
    try:
        data = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise PublishError(f"manifest for run {manifest.get('run_id')}: not plain JSON ({exc})") from None
    # A last line of defence: the manifest is public, so no configured credential may appear in it.
    # Toy credentials shorter than 8 characters ("minio", "test") would match ordinary words.
    for secret in (store.cfg.access_key_id, store.cfg.secret_access_key, store.cfg.session_token):
        if secret is not None and len(secret.get_secret_value()) >= 8 and secret.get_secret_value().encode() in data:
            raise PublishError(f"manifest for run {manifest.get('run_id')}: contains a storage credential; refusing")
    return data


def read_manifest(store: Store, run_id: str) -> dict[str, Any] | None:
    """The run's manifest, or None if the run was never published."""
    key = manifest_key(run_id)
    try:
        data = store.get_bytes(key)
    except NotFoundError:
        return None
    try:
        manifest = json.loads(data)
    except ValueError:
        raise StorageError(f"{store.uri_for(key)}: not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise StorageError(f"{store.uri_for(key)}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def find_published(store: Store, run_id: str) -> PublishedRun | None:
    """The run as an earlier attempt published it, or None if it was never published."""
    manifest = read_manifest(store, run_id)
    if manifest is None:
        return None
    uri = store.uri_for(run_key(run_id)).rstrip("/")
    return PublishedRun(run_id, manifest["attempt_id"], manifest_key(run_id), uri, manifest, reused=True)


def _same_content(manifest: Mapping[str, Any], digests: Mapping[str, FileDigest]) -> bool:
    files = manifest.get("files", {})
    return set(files) == set(digests) and all(
        files[name].get("sha256") == d.sha256 and files[name].get("size") == d.size for name, d in digests.items()
    )


def publish_run(
    store: Store,
    run_id: str,
    bundle_dir: Path,
    manifest_fields: Mapping[str, Any],
    *,
    attempt_id: str | None = None,
) -> PublishedRun:
    """Upload a bundle to its own staging prefix, verify it, then write the run's manifest once.

    ``manifest_fields`` (base model, dataset version, public config, metrics, code version,
    and ``evaluation: {metric, score, higher_is_better}`` for manual promotion) must be plain
    JSON and must not contain credentials. Raises :class:`AlreadyPublished` if another
    attempt published this run with different content; an identical bundle returns the
    existing publication (``reused=True``) without writing anything.
    """
    files = bundle_files(Path(bundle_dir))
    clash = _RESERVED_FIELDS.intersection(manifest_fields)
    if clash:
        raise PublishError(f"manifest fields {sorted(clash)} are reserved")
    taken = sorted(name for name in files if name == MANIFEST_FILE or name.startswith(f"{ATTEMPTS_DIR}/"))
    if taken:
        raise BundleError(f"bundle {bundle_dir}: {', '.join(taken)}: names the store uses for itself")
    digests = {name: file_digest(path) for name, path in files.items()}

    existing = read_manifest(store, run_id)
    if existing is not None:
        return _existing(store, run_id, existing, digests)
    attempt_id = attempt_id or new_id()
    staging = _upload(store, run_id, attempt_id, files, digests)
    # Locally, no other attempt may move its files into the run's directory while this one commits.
    with store.lock(run_key(run_id)):
        existing = read_manifest(store, run_id)
        if existing is not None:
            return _existing(store, run_id, existing, digests)
        keys = store.finalize(staging, run_key(run_id), list(files))
        manifest = {
            **manifest_fields,
            "format": MANIFEST_FORMAT,
            "run_id": run_id,
            "attempt_id": attempt_id,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": {name: {"key": keys[name], "sha256": d.sha256, "size": d.size} for name, d in digests.items()},
        }
        written = _write_manifest(store, run_id, attempt_id, manifest, digests)
    if written.get("attempt_id") != attempt_id:
        return _existing(store, run_id, written, digests)
    log.info("published run %s: %s", run_id, store.uri_for(manifest_key(run_id)))
    return PublishedRun(run_id, attempt_id, manifest_key(run_id), store.uri_for(run_key(run_id)), written)


def _upload(
    store: Store, run_id: str, attempt_id: str, files: Mapping[str, Path], digests: Mapping[str, FileDigest]
) -> str:
    """Upload and verify every file under the attempt's own staging prefix; returns the prefix."""
    staging = attempt_key(run_id, attempt_id)
    log.info(
        "publishing run %s to %s (attempt %s, %d files)", run_id, store.uri_for(run_key(run_id)), attempt_id, len(files)
    )
    for name, path in files.items():
        key = join_key(staging, name)

        def upload(key: str = key, path: Path = path, digest: FileDigest = digests[name]) -> None:
            store.put_file(key, path, digest=digest)
            store.verify(key, digest)

        run_step(store, f"upload {store.uri_for(key)}", upload)
    return staging


def _write_manifest(
    store: Store, run_id: str, attempt_id: str, manifest: dict[str, Any], digests: Mapping[str, FileDigest]
) -> dict[str, Any]:
    """The commit point: write the manifest once (If-None-Match), reconciling a 412 by re-reading."""
    body = _manifest_bytes(manifest, store)
    key = manifest_key(run_id)

    def write_manifest() -> dict[str, Any]:
        try:
            store.put_bytes(key, body, if_none_match=True)
            return manifest
        except StorageError as error:
            # Any error is ambiguous: the write may have committed and only its response been lost
            # (a reset after commit; botocore's retry then sees 412). The store says what happened.
            current = reread(lambda: read_manifest(store, run_id), error)
            if current is not None and current.get("attempt_id") == attempt_id:
                log.info("manifest %s: our write had succeeded (%s)", store.uri_for(key), error)
                return current
            if current is not None and _same_content(current, digests):
                return current
            if current is None:
                raise
            raise AlreadyPublished(
                f"run {run_id} is already published at {store.uri_for(key)} by attempt "
                f"{current.get('attempt_id')}; not overwritten"
            ) from None

    return run_step(store, f"write {store.uri_for(key)}", write_manifest)


def _existing(store: Store, run_id: str, manifest: dict[str, Any], digests: Mapping[str, FileDigest]) -> PublishedRun:
    if not _same_content(manifest, digests):
        raise AlreadyPublished(
            f"run {run_id} is already published at {store.uri_for(manifest_key(run_id))} with different "
            "content; choose a new run id"
        )
    log.info("run %s: identical bundle already published; nothing to do", run_id)
    return PublishedRun(
        run_id, manifest["attempt_id"], manifest_key(run_id), store.uri_for(run_key(run_id)), manifest, reused=True
    )
