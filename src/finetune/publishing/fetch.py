"""Fetching a published bundle into a plain, verified local directory that mlx-lm loads as an adapter path."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune.config import StorageConfig
from finetune.layout import ADAPTER_CONFIG_FILE, ADAPTER_FILES, attempt_key, check_run_id, manifest_key, run_key
from finetune.publishing.champion import read_champion
from finetune.publishing.publish import BundleError, bundle_files, check_bundle_name, read_manifest
from finetune.store import (
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
    if "://" not in text and local.is_dir() and (local / ADAPTER_CONFIG_FILE).is_file():
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
        raise BundleError(f"{store.uri_for(run_key(run_id))}: run not published (no manifest)")
    return _materialize(store, run_id, manifest, Path(cache_dir))


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
        if not key.startswith(staging) or not isinstance(entry.get("sha256"), str):
            raise BundleError(f"{where}: entry {name!r} points outside the run's published attempt")
    missing = [name for name in ADAPTER_FILES if name not in files]
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
