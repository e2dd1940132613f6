"""Publishing adapter bundles: verified, written once, promoted only when better.

Layout under the store's root (or ``s3://bucket/prefix``)::

    runs/<run_id>/attempts/<attempt_id>/<bundle files>   staging, one prefix per attempt
    runs/<run_id>/manifest.json                          the commit point, written once (If-None-Match: *)
    champion.json                                        the pointer, compare-and-swapped (If-Match: ETag)

A reader trusts only files a manifest lists, so an interrupted attempt is invisible, and
``gc`` removes it later. The manifest records each file's sha256 and size; downloads are
checked against it. A 412 on a conditional write is reconciled by re-reading: our own
write whose response was lost counts as success, someone else's is never overwritten.

Retries: botocore retries every HTTP call (``storage.max_attempts``). Only failures the SDK
does not retry re-run a whole idempotent step here (409 ConditionalRequestConflict, a failed
verification, an upload that gave up), ``storage.step_attempts`` times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from finetune.config import StorageConfig
from finetune.storage import (
    ConditionalConflict,
    FileDigest,
    NotFoundError,
    PreconditionFailed,
    Store,
    StorageError,
    UnsafeKeyError,
    UploadGaveUp,
    VerificationError,
    file_digest,
    join_key,
    new_id,
    open_store,
    safe_key,
)

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "finetune-manifest/1"
POINTER_FORMAT = "finetune-champion/1"
CHAMPION_KEY = "champion.json"
REQUIRED_FILES = ("adapters.safetensors", "adapter_config.json")
# Weights must be safetensors; everything else in a bundle is text, JSON or an image. Pickle-based
# formats (.bin, .pt, .pkl, .ckpt, .npy…) are refused both when publishing and when fetching.
ALLOWED_SUFFIXES = frozenset(
    {".safetensors", ".json", ".jsonl", ".jinja", ".txt", ".md", ".yaml", ".yml", ".csv", ".png", ".svg", ".html"}
)
_RESERVED_FIELDS = frozenset({"format", "run_id", "attempt_id", "created", "files", "store"})
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_LOCAL_MANIFEST = ".manifest.json"

T = TypeVar("T")


class PublishError(StorageError):
    """A bundle that cannot be published as asked."""


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


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    run_id: str
    reason: str
    previous: dict[str, Any] | None  # the champion pointer we compared against (None: there was none)
    pointer: dict[str, Any] | None  # the pointer now in the store

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    published: bool
    created: str | None
    metric: str | None
    score: float | None
    champion: bool
    attempts: int
    size: int


@dataclass(frozen=True)
class GcReport:
    deleted_attempts: list[str]
    deleted_objects: int
    kept_attempts: int
    dry_run: bool
    aborted_uploads: int = 0  # incomplete multipart uploads (or local temp files) removed


# --------------------------------------------------------------------------- keys


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise PublishError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' (at most 128, not starting with '.')")
    return run_id


def run_prefix(run_id: str) -> str:
    return join_key("runs", check_run_id(run_id))


def manifest_key(run_id: str) -> str:
    return join_key(run_prefix(run_id), "manifest.json")


def attempt_prefix(run_id: str, attempt_id: str) -> str:
    return join_key(run_prefix(run_id), "attempts", attempt_id)


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


def _step(store: Store, what: str, fn: Callable[[], T]) -> T:
    """Run an idempotent step, re-running it only for failures the SDK does not retry."""

    def note(state: Any) -> None:
        log.warning("%s: %s; retrying the step (attempt %d of %d)", what, state.outcome.exception(),
                    state.attempt_number + 1, store.cfg.step_attempts)

    retrying = Retrying(
        stop=stop_after_attempt(store.cfg.step_attempts),
        wait=wait_exponential(multiplier=store.cfg.step_retry_wait_seconds, max=60),
        retry=retry_if_exception_type((ConditionalConflict, VerificationError, UploadGaveUp)),
        before_sleep=note,
        reraise=True,
    )
    return retrying(fn)


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
    digests = {name: file_digest(path) for name, path in files.items()}

    existing = read_manifest(store, run_id)
    if existing is not None:
        return _existing(store, run_id, existing, digests)

    attempt_id = attempt_id or new_id()
    staging = attempt_prefix(run_id, attempt_id)
    log.info("publishing run %s to %s (attempt %s, %d files)", run_id, store.uri_for(run_prefix(run_id)),
             attempt_id, len(files))
    for name, path in files.items():
        key = join_key(staging, name)

        def upload(key: str = key, path: Path = path, digest: FileDigest = digests[name]) -> None:
            store.put_file(key, path, digest=digest)
            store.verify(key, digest)

        _step(store, f"upload {store.uri_for(key)}", upload)

    manifest = {
        **manifest_fields,
        "format": MANIFEST_FORMAT,
        "run_id": run_id,
        "attempt_id": attempt_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {
            name: {"key": join_key(staging, name), "sha256": d.sha256, "size": d.size} for name, d in digests.items()
        },
    }
    body = _manifest_bytes(manifest, store)
    key = manifest_key(run_id)

    def write_manifest() -> dict[str, Any]:
        try:
            store.put_bytes(key, body, if_none_match=True)
            return manifest
        except PreconditionFailed:
            # Either our own write whose response was lost (botocore's retry then sees 412) or another attempt's.
            current = read_manifest(store, run_id)
            if current is not None and current.get("attempt_id") == attempt_id:
                log.info("manifest %s: our earlier write had succeeded", store.uri_for(key))
                return current
            if current is not None and _same_content(current, digests):
                return current
            raise AlreadyPublished(
                f"run {run_id} is already published at {store.uri_for(key)} by attempt "
                f"{current.get('attempt_id') if current else '?'}; not overwritten"
            ) from None

    written = _step(store, f"write {store.uri_for(key)}", write_manifest)
    if written.get("attempt_id") != attempt_id:
        return _existing(store, run_id, written, digests)
    log.info("published run %s: %s", run_id, store.uri_for(key))
    return PublishedRun(run_id, attempt_id, key, store.uri_for(run_prefix(run_id)), written)


def _existing(store: Store, run_id: str, manifest: dict[str, Any], digests: Mapping[str, FileDigest]) -> PublishedRun:
    if not _same_content(manifest, digests):
        raise AlreadyPublished(
            f"run {run_id} is already published at {store.uri_for(manifest_key(run_id))} with different "
            "content; choose a new run id"
        )
    log.info("run %s: identical bundle already published; nothing to do", run_id)
    return PublishedRun(run_id, manifest["attempt_id"], manifest_key(run_id), store.uri_for(run_prefix(run_id)),
                        manifest, reused=True)


# --------------------------------------------------------------------------- champion


def read_champion(store: Store) -> dict[str, Any] | None:
    got = _read_pointer(store)
    return got[0] if got else None


def _read_pointer(store: Store) -> tuple[dict[str, Any], str] | None:
    got = store.get_with_etag(CHAMPION_KEY)
    if got is None:
        return None
    try:
        pointer = json.loads(got[0])
    except ValueError:
        raise StorageError(f"{store.uri_for(CHAMPION_KEY)}: not valid JSON") from None
    if not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT:
        raise StorageError(f"{store.uri_for(CHAMPION_KEY)}: not a {POINTER_FORMAT} pointer")
    return pointer, got[1]


Decide = Callable[[dict[str, Any] | None], tuple[bool, str]]


def _swap_champion(store: Store, run_id: str, fields: dict[str, Any], decide: Decide) -> PromotionDecision:
    """Compare-and-swap champion.json: decide against the pointer as read, write only if it is unchanged.

    Each lost race re-reads and decides again against the new champion, so a competing
    promotion is never overwritten unless we still beat it.
    """
    write_id = new_id()
    rounds = max(10, store.cfg.step_attempts)
    for _ in range(rounds):
        current = _read_pointer(store)
        previous, etag = current if current else (None, None)
        promote, reason = decide(previous)
        if not promote:
            log.info("run %s not promoted: %s", run_id, reason)
            return PromotionDecision(False, run_id, reason, previous, previous)
        pointer = {
            **fields,
            "format": POINTER_FORMAT,
            "run_id": run_id,
            "manifest_key": manifest_key(run_id),
            "reason": reason,
            "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "write_id": write_id,
            "previous": {k: previous.get(k) for k in ("run_id", "metric", "score")} if previous else None,
        }
        body = json.dumps(pointer, indent=2, sort_keys=True, allow_nan=False).encode()

        def write() -> None:
            if etag is None:
                store.put_bytes(CHAMPION_KEY, body, if_none_match=True)
            else:
                store.put_bytes(CHAMPION_KEY, body, if_match=etag)

        try:
            _step(store, f"write {store.uri_for(CHAMPION_KEY)}", write)
        except (PreconditionFailed, NotFoundError):
            now = read_champion(store)
            if now is not None and now.get("write_id") == write_id:
                log.info("champion pointer: our earlier write had succeeded")
            else:
                log.info("champion pointer changed while promoting %s; deciding again", run_id)
                continue
        log.info("promoted run %s to champion: %s", run_id, reason)
        return PromotionDecision(True, run_id, reason, previous, pointer)
    raise StorageError(f"{store.uri_for(CHAMPION_KEY)}: still contended after {rounds} rounds; try again")


def _beats(score: float, other: float, higher_is_better: bool, margin: float) -> bool:
    return score > other + margin if higher_is_better else score < other - margin


def promote_if_better(
    store: Store,
    run_id: str,
    score: float | None,
    *,
    metric: str,
    higher_is_better: bool,
    margin: float = 0.0,
    reason: str = "",
    fresh_scores: Mapping[str, float] | None = None,
) -> PromotionDecision:
    """Make ``run_id`` the champion if its score beats the current champion's by more than ``margin``.

    The champion's score is the one recorded in its pointer, or ``fresh_scores[champion_run_id]``
    when the caller re-measured it on the same inputs. A champion scored on another metric is
    not comparable and is kept (promote manually). The run must be published.
    """
    if read_manifest(store, run_id) is None:
        raise PublishError(f"run {run_id} is not published in {store.uri}; publish before promoting")
    if score is None or not math.isfinite(score):
        return PromotionDecision(False, run_id, f"{metric} {score} is not finite", read_champion(store), None)
    fresh = dict(fresh_scores or {})

    def decide(champion: dict[str, Any] | None) -> tuple[bool, str]:
        suffix = f" ({reason})" if reason else ""
        if champion is None:
            return True, f"no champion yet; {metric} {score:.6g}{suffix}"
        if champion.get("run_id") == run_id:
            return False, f"run {run_id} is already the champion"
        theirs = fresh.get(champion["run_id"], champion.get("score"))
        if champion.get("metric") != metric or theirs is None:
            return False, (
                f"champion {champion['run_id']} is scored on {champion.get('metric')!r}, not {metric!r}; "
                "not comparable, promote manually"
            )
        verdict = "beats" if _beats(score, theirs, higher_is_better, margin) else "does not beat"
        return verdict == "beats", (
            f"{metric} {score:.6g} {verdict} champion {champion['run_id']} ({theirs:.6g}) by more than {margin:g}{suffix}"
        )

    fields = {"metric": metric, "score": score, "higher_is_better": higher_is_better}
    return _swap_champion(store, run_id, fields, decide)


def promote(store: Store, run_id: str, reason: str = "manual promotion") -> PromotionDecision:
    """Make a published run the champion regardless of scores, through the same compare-and-swap."""
    manifest = read_manifest(store, run_id)
    if manifest is None:
        raise PublishError(f"run {run_id} is not published in {store.uri}")
    evaluation = manifest.get("evaluation") or {}
    fields = {k: evaluation.get(k) for k in ("metric", "score", "higher_is_better")}
    return _swap_champion(store, run_id, fields, lambda champion: (True, reason))


# --------------------------------------------------------------------------- listing and gc


def _group_runs(store: Store) -> dict[str, list[Any]]:
    runs: dict[str, list[Any]] = {}
    for info in store.list("runs/"):
        parts = info.key.split("/")
        if len(parts) >= 3:
            runs.setdefault(parts[1], []).append(info)
    return runs


def list_runs(store: Store) -> list[RunSummary]:
    """Every run in the store, published or not, oldest first."""
    champion = read_champion(store)
    summaries = []
    for run_id, infos in _group_runs(store).items():
        manifest = read_manifest(store, run_id) if any(i.key.endswith("/manifest.json") for i in infos) else None
        attempts = {i.key.split("/")[3] for i in infos if i.key.split("/")[2] == "attempts" and len(i.key.split("/")) > 4}
        evaluation = (manifest or {}).get("evaluation") or {}
        summaries.append(RunSummary(
            run_id=run_id,
            published=manifest is not None,
            created=(manifest or {}).get("created") or min(i.last_modified for i in infos).isoformat(timespec="seconds"),
            metric=evaluation.get("metric"),
            score=evaluation.get("score"),
            champion=champion is not None and champion.get("run_id") == run_id,
            attempts=len(attempts),
            size=sum(f["size"] for f in (manifest or {}).get("files", {}).values()),
        ))
    return sorted(summaries, key=lambda s: (s.created or "", s.run_id))


def gc(store: Store, older_than: timedelta, *, dry_run: bool = False, now: datetime | None = None) -> GcReport:
    """Delete staging attempts that no manifest references and whose newest object is older than ``older_than``,
    and abort multipart uploads (remove local temp files) that started before then and never completed.

    A published bundle (the attempt its manifest names) is never deleted. The age guard
    protects attempts still uploading; keep it longer than a publish takes.
    """
    cutoff = (now or datetime.now(timezone.utc)) - older_than
    deleted: list[str] = []
    deleted_objects = kept = 0
    for run_id, infos in _group_runs(store).items():
        attempts: dict[str, list[Any]] = {}
        for info in infos:
            parts = info.key.split("/")
            if len(parts) > 4 and parts[2] == "attempts":
                attempts.setdefault(parts[3], []).append(info)
        if not attempts:
            continue
        manifest = read_manifest(store, run_id)
        published = manifest.get("attempt_id") if manifest else None
        for attempt_id, objects in sorted(attempts.items()):
            if attempt_id == published or max(o.last_modified for o in objects) >= cutoff:
                kept += 1
                continue
            # Re-read right before deleting: the attempt may have been published since the listing.
            manifest = read_manifest(store, run_id)
            if manifest is not None and manifest.get("attempt_id") == attempt_id:
                kept += 1
                continue
            deleted.append(f"{run_id}/{attempt_id}")
            deleted_objects += len(objects)
            if not dry_run:
                store.delete_many([o.key for o in objects])
                log.info("gc: deleted %d objects of unpublished attempt %s/%s", len(objects), run_id, attempt_id)
    aborted = 0 if dry_run else store.clean_incomplete(cutoff)
    return GcReport(deleted, deleted_objects, kept, dry_run, aborted)


# --------------------------------------------------------------------------- fetching


_RUN_REF = re.compile(r"^(?P<store>.*?)/?runs/(?P<run>[^/]+)/?$")
_CHAMPION_REF = re.compile(r"^(?P<store>.*?)/?champion(?:\.json)?/?$")


def split_ref(ref: str) -> tuple[str, str | None]:
    """``(store_uri, run_id)`` from ``<store>/runs/<run_id>``; run_id None for ``<store>/champion``.

    An empty store part means the configured store (``runs/<id>`` or ``champion`` alone).
    """
    ref = ref.strip()
    if m := _RUN_REF.match(ref):
        return m["store"], check_run_id(m["run"])
    if m := _CHAMPION_REF.match(ref):
        return m["store"], None
    raise BundleError(
        f"adapter {ref!r}: expected a bundle directory, <store>/runs/<run_id> or <store>/champion "
        "(store: s3://bucket/prefix, file://… or a local store directory)"
    )


def fetch_bundle(ref: str | Path, cache_dir: Path, cfg: StorageConfig) -> Path:
    """A local directory that ``mlx_lm.load(model, adapter_path=...)`` accepts.

    ``ref`` is a local bundle directory (returned as is), ``<store>/runs/<run_id>`` or
    ``<store>/champion`` where ``<store>`` is ``s3://bucket/prefix``, ``file://…`` or a
    local store directory (empty: ``cfg.uri``). Remote bundles are downloaded into
    ``cache_dir`` only, each file checked against the manifest's sha256 before the
    directory appears; a verified cached copy is reused.
    """
    text = str(ref)
    local = Path(text)
    if "://" not in text and local.is_dir() and (local / "adapter_config.json").is_file():
        bundle_files(local)  # the same safety rules as a downloaded bundle
        return local
    store_part, run_id = split_ref(text)
    store = open_store(cfg, store_part or None)
    if run_id is None:
        champion = read_champion(store)
        if champion is None:
            raise BundleError(f"{store.uri}: no champion yet (publish and promote a run first)")
        run_id = check_run_id(champion["run_id"])
    manifest = read_manifest(store, run_id)
    if manifest is None:
        raise BundleError(f"{store.uri_for(run_prefix(run_id))}: run not published (no manifest)")
    return _materialize(store, run_id, manifest, Path(cache_dir))


def _checked_files(store: Store, run_id: str, manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    where = store.uri_for(manifest_key(run_id))
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{where}: lists no files")
    staging = attempt_prefix(run_id, str(manifest.get("attempt_id"))) + "/"
    for name, entry in files.items():
        check_bundle_name(name, where)
        key = entry.get("key", "") if isinstance(entry, dict) else ""
        try:
            safe_key(key)
        except UnsafeKeyError as exc:
            raise BundleError(f"{where}: {exc}") from None
        if not key.startswith(staging) or not isinstance(entry.get("sha256"), str):
            raise BundleError(f"{where}: entry {name!r} points outside the run's published attempt")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise BundleError(f"{where}: bundle lacks {', '.join(missing)}")
    return files


def _verified(directory: Path, files: Mapping[str, Mapping[str, Any]]) -> bool:
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return False
        digest = file_digest(path)
        if digest.sha256 != entry["sha256"] or digest.size != entry.get("size", digest.size):
            return False
    return True


def _materialize(store: Store, run_id: str, manifest: Mapping[str, Any], cache_dir: Path) -> Path:
    files = _checked_files(store, run_id, manifest)
    store_tag = hashlib.sha256(store.uri.encode()).hexdigest()[:12]
    final = cache_dir / "bundles" / store_tag / run_id / str(manifest["attempt_id"])
    check_run_id(str(manifest["attempt_id"]))
    if final.is_dir() and _verified(final, files):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=final.parent, prefix=".partial-"))
    try:
        for name, entry in files.items():
            dest = partial / name
            if not dest.resolve().is_relative_to(partial.resolve()):
                raise BundleError(f"{store.uri}: {name!r} would be written outside the cache")
            store.get_file(entry["key"], dest)
            got = file_digest(dest)
            if got.sha256 != entry["sha256"] or got.size != entry.get("size", got.size):
                raise BundleError(
                    f"{store.uri_for(entry['key'])}: sha256 {got.sha256[:12]}… does not match the manifest's "
                    f"{entry['sha256'][:12]}…; refusing to load"
                )
        (partial / _LOCAL_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)  # a stale or damaged copy
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("fetched run %s from %s into %s", run_id, store.uri, final)
    return final
