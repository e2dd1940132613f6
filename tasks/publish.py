"""Prefect tasks for the publish stage: verified upload, write-once manifest, champion CAS.

Transport retries belong to botocore and step retries to publishing.py; the
tasks add no retries of their own, so nothing is retried at two layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from finetune.config import StorageConfig
from finetune.layout import run_key, sweep_key
from finetune.publishing import fetch_bundle, promote_if_better, publish_run, read_champion, read_manifest
from finetune.store import open_store


def trial_storage(storage: StorageConfig, sweep_id: str) -> StorageConfig:
    """The sweep's staging area as a store of its own: same credentials and endpoint, prefix ``sweeps/<id>``."""
    return storage.model_copy(update={"uri": f"{storage.uri.rstrip('/')}/{sweep_key(sweep_id)}"})


@task(name="publish-bundle", cache_policy=NO_CACHE, result_serializer="json")
def publish_bundle(
    storage: StorageConfig, run_id: str, bundle_dir: str, manifest_fields: dict[str, Any]
) -> dict[str, Any]:
    """Publish the bundle once; a retried run with the same bundle reuses the publication."""
    store = open_store(storage)
    published = publish_run(store, run_id, Path(bundle_dir), manifest_fields)
    logger = get_run_logger()
    if published.reused:
        logger.info("run %s was already published with this bundle: %s", run_id, published.uri)
    else:
        logger.info("published %d files to %s", len(published.manifest["files"]), published.uri)
    return {"uri": published.uri, "manifest_key": published.manifest_key, "reused": published.reused}


@task(name="find-published-run", cache_policy=NO_CACHE, result_serializer="json")
def find_published_run(storage: StorageConfig, run_id: str) -> dict[str, Any] | None:
    """The manifest of ``run_id`` if it is already published (a re-run then only decides promotion)."""
    store = open_store(storage)
    manifest = read_manifest(store, run_id)
    if manifest is None:
        return None
    uri = store.uri_for(run_key(run_id)).rstrip("/")
    get_run_logger().info("run %s is already published at %s; not training it again", run_id, uri)
    return {**manifest, "uri": uri}


def report_of_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The parts of the evaluation report a promotion decision needs, as the run's manifest recorded them."""
    evaluation = manifest.get("evaluation") or {}
    return {
        "decision": manifest.get("decision") or {"promote": False, "reason": "the manifest records no decision"},
        "primary_metric": evaluation.get("metric"),
        "higher_is_better": evaluation.get("higher_is_better"),
        # The champion it was measured against may have changed since: compare with the pointer's score.
        "metrics": {"candidate": (manifest.get("metrics") or {}).get("candidate", {})},
    }


@task(name="champion-bundle", cache_policy=NO_CACHE, result_serializer="json")
def champion_bundle(storage: StorageConfig, work_dir: str) -> dict[str, str] | None:
    """The current champion's run id and bundle, verified into the local cache; None when there is none yet."""
    store = open_store(storage)
    champion = read_champion(store)
    if champion is None:
        get_run_logger().info("no champion yet in %s", store.uri)
        return None
    # By run id, not "champion": a promotion between the two reads must not mix one run's id with another's files.
    path = fetch_bundle(
        f"{store.uri.rstrip('/')}/runs/{champion['run_id']}", Path(work_dir) / "cache" / "bundles", storage
    )
    get_run_logger().info("champion: run %s", champion["run_id"])
    return {"run_id": champion["run_id"], "path": str(path)}


@task(name="promote", cache_policy=NO_CACHE, result_serializer="json")
def promote_candidate(
    storage: StorageConfig, run_id: str, report: dict[str, Any], margin: float, champion_run_id: str | None = None
) -> dict[str, Any]:
    """Promote only when the evaluation gate passed, and then through the champion pointer's CAS."""
    logger = get_run_logger()
    decision = report["decision"]
    if not decision["promote"]:
        logger.info("not promoted: %s", decision["reason"])
        return {"promoted": False, "reason": decision["reason"]}
    metric = report["primary_metric"]
    metrics = report["metrics"]
    result = promote_if_better(
        open_store(storage),
        run_id,
        metrics["candidate"][metric],
        metric=metric,
        higher_is_better=report["higher_is_better"],
        margin=margin,
        fresh_scores=_champion_scores(report, champion_run_id),
    )
    logger.info("%s: %s", "promoted" if result.promoted else "not promoted", result.reason)
    return {"promoted": result.promoted, "reason": result.reason}


def _champion_scores(report: dict[str, Any], champion_run_id: str | None) -> dict[str, float]:
    """The champion re-measured on this run's inputs, for a like-for-like decision in the CAS."""
    score = report["metrics"].get("champion", {}).get(report["primary_metric"])
    return {champion_run_id: score} if champion_run_id and score is not None else {}
