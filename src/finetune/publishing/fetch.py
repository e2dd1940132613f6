"""Fetching a published bundle into a plain, verified local directory that mlx-lm loads as an adapter path."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune.config import StorageConfig
from finetune.fsutil import atomic_dir
from finetune.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILES,
    MANIFEST_FILE,
    attempt_key,
    check_run_id,
    manifest_key,
    run_key,
)
from finetune.publishing.champion import read_champion
from finetune.publishing.publish import BundleError, bundle_files, check_bundle_name, read_manifest
from finetune.store import (
    LocalStore,
    Store,
    UnsafeKeyError,
    file_digest,
    open_store,
    safe_key,
)

log = logging.getLogger(__name__)

_LOCAL_MANIFEST = ".manifest.json"
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
    published_here = (local / MANIFEST_FILE).is_file()  # a local store's run directory: check it against its manifest
    if "://" not in text and local.is_dir() and (local / ADAPTER_CONFIG_FILE).is_file() and not published_here:
        bundle_files(local)  # the same safety rules as a downloaded bundle
        return local
    store, run_id, manifest = _published(text, cfg)
    files = _checked_files(store, run_id, manifest)
    in_place = Path(store.uri_for(run_key(run_id)))
    if isinstance(store, LocalStore) and all(e["key"] == f"{run_key(run_id)}/{n}" for n, e in files.items()):
        # A local store's run directory is the bundle: verify it where it is.
        bad = _mismatch(in_place, files)
        if bad is not None:
            raise BundleError(f"{in_place / bad}: does not match the manifest's sha256; refusing to load")
        return in_place
    return _materialize(store, run_id, manifest, Path(cache_dir))


def pull_bundle(ref: str, dest: Path, cfg: StorageConfig) -> Path:
    """Download ``<store>/runs/<run_id>`` (or ``<store>/champion``) into the plain directory ``dest``, verified.

    ``dest`` must not exist yet (or be empty); it appears only once every file matched the manifest.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BundleError(f"{dest}: already exists and is not an empty directory")
    store, run_id, manifest = _published(ref, cfg)
    if dest.exists():
        dest.rmdir()
    with atomic_dir(dest) as tmp:
        _download(store, run_id, manifest, tmp)
    log.info("pulled run %s from %s into %s", run_id, store.uri, dest)
    return dest


def _published(ref: str, cfg: StorageConfig) -> tuple[Store, str, dict[str, Any]]:
    """The store, run id and manifest a ``<store>/runs/<run_id>`` or ``<store>/champion`` reference names."""
    store_part, run_id = split_ref(ref)
    store = open_store(cfg, store_part or None)
    if run_id is None:
        champion = read_champion(store)
        if champion is None:
            raise BundleError(f"{store.uri}: no champion yet (publish and promote a run first)")
        run_id = check_run_id(champion["run_id"])
    manifest = read_manifest(store, run_id)
    if manifest is None:
        raise BundleError(f"{store.uri_for(run_key(run_id))}: run not published (no manifest)")
    return store, run_id, manifest


def _checked_files(store: Store, run_id: str, manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    where = store.uri_for(manifest_key(run_id))
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{where}: lists no files")
    staging = attempt_key(run_id, str(manifest.get("attempt_id"))) + "/"
    for name, entry in files.items():
        check_bundle_name(name, where)
        key = entry.get("key", "") if isinstance(entry, dict) else ""
        try:
            safe_key(key)
        except UnsafeKeyError as exc:
            raise BundleError(f"{where}: {exc}") from None
        in_run = key == f"{run_key(run_id)}/{name}"  # a local store's bundle, in the run's directory
        if not (key.startswith(staging) or in_run) or not isinstance(entry.get("sha256"), str):
            raise BundleError(f"{where}: entry {name!r} points outside the run's published attempt")
    missing = [name for name in ADAPTER_FILES if name not in files]
    if missing:
        raise BundleError(f"{where}: bundle lacks {', '.join(missing)}")
    return files


def _mismatch(directory: Path, files: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The first listed file that is missing from ``directory`` or differs from its manifest entry."""
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return name
        digest = file_digest(path)
        if digest.sha256 != entry["sha256"] or digest.size != entry.get("size", digest.size):
            return name
    return None


def _materialize(store: Store, run_id: str, manifest: Mapping[str, Any], cache_dir: Path) -> Path:
    """A verified copy in the cache, reused while it still matches the manifest."""
    files = _checked_files(store, run_id, manifest)
    store_tag = hashlib.sha256(store.uri.encode()).hexdigest()[:12]
    final = cache_dir / "bundles" / store_tag / run_id / check_run_id(str(manifest["attempt_id"]))
    if final.is_dir() and _mismatch(final, files) is None:
        return final
    with atomic_dir(final) as tmp:  # a stale or damaged copy is replaced
        _download(store, run_id, manifest, tmp)
    log.info("fetched run %s from %s into %s", run_id, store.uri, final)
    return final


def _download(store: Store, run_id: str, manifest: Mapping[str, Any], out: Path) -> None:
    """Every file the manifest lists into ``out``, each checked against its sha256 and size."""
    for name, entry in _checked_files(store, run_id, manifest).items():
        dest = out / name
        if not dest.resolve().is_relative_to(out.resolve()):
            raise BundleError(f"{store.uri}: {name!r} would be written outside {out}")
        store.get_file(entry["key"], dest)
        got = file_digest(dest)
        if got.sha256 != entry["sha256"] or got.size != entry.get("size", got.size):
            raise BundleError(
                f"{store.uri_for(entry['key'])}: sha256 {got.sha256[:12]}… does not match the manifest's "
                f"{entry['sha256'][:12]}…; refusing to load"
            )
    (out / _LOCAL_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
