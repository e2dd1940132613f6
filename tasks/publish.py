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
from finetune.layout import bundle_cache, run_ref, sweep_key
from finetune.pipeline.results import Champion, Promotion, Scorecard
from finetune.publishing import (
    PublishedRun,
    fetch_bundle,
    find_published,
    promote_if_better,
    publish_run,
    read_champion,
)
from finetune.store import open_store


def trial_storage(storage: StorageConfig, sweep_id: str) -> StorageConfig:
    """The sweep's staging area as a store of its own: same credentials and endpoint, prefix ``sweeps/<id>``."""
    return storage.model_copy(update={"uri": f"{storage.uri.rstrip('/')}/{sweep_key(sweep_id)}"})


@task(name="publish-bundle", cache_policy=NO_CACHE, result_serializer="json")
def publish_bundle(
    storage: StorageConfig, run_id: str, bundle_dir: Path | str, manifest_fields: dict[str, Any]
) -> PublishedRun:
    """Publish the bundle once; a retried run with the same bundle reuses the publication."""
    store = open_store(storage)
    published = publish_run(store, run_id, Path(bundle_dir), manifest_fields)
    logger = get_run_logger()
    if published.reused:
        logger.info("run %s was already published with this bundle: %s", run_id, published.uri)
    else:
        logger.info("published %d files to %s", len(published.manifest["files"]), published.uri)
    return published


@task(name="find-published-run", cache_policy=NO_CACHE, result_serializer="json")
def find_published_run(storage: StorageConfig, run_id: str) -> PublishedRun | None:
    """``run_id`` as an earlier attempt published it, if it did (a re-run then only decides promotion)."""
    published = find_published(open_store(storage), run_id)
    if published is not None:
        get_run_logger().info("run %s is already published at %s; not training it again", run_id, published.uri)
    return published


@task(name="champion-bundle", cache_policy=NO_CACHE, result_serializer="json")
def champion_bundle(storage: StorageConfig, work_dir: str) -> Champion | None:
    """The current champion's run id and bundle, verified into the local cache; None when there is none yet."""
    store = open_store(storage)
    champion = read_champion(store)
    if champion is None:
        get_run_logger().info("no champion yet in %s", store.uri)
        return None
    # By run id, not "champion": a promotion between the two reads must not mix one run's id with another's files.
    path = fetch_bundle(run_ref(store.uri, champion["run_id"]), bundle_cache(work_dir), storage)
    get_run_logger().info("champion: run %s", champion["run_id"])
    return Champion(champion["run_id"], Path(path))


@task(name="promote", cache_policy=NO_CACHE, result_serializer="json")
def promote_candidate(
    storage: StorageConfig, run_id: str, scorecard: Scorecard, margin: float, champion_run_id: str | None = None
) -> Promotion:
    """Promote only when the evaluation gate passed, and then through the champion pointer's CAS.

    With ``champion_run_id`` (whose scores ``scorecard`` holds), the CAS compares with that champion as
    re-measured on this run's inputs; without, with the score its pointer recorded.
    """
    logger = get_run_logger()
    if not scorecard.promote:
        logger.info("not promoted: %s", scorecard.reason)
        return Promotion(False, scorecard.reason)
    fresh = scorecard.champion_score
    result = promote_if_better(
        open_store(storage),
        run_id,
        scorecard.score,
        metric=scorecard.metric,
        higher_is_better=scorecard.higher_is_better,
        margin=margin,
        fresh_scores={champion_run_id: fresh} if champion_run_id and fresh is not None else {},
    )
    logger.info("%s: %s", "promoted" if result.promoted else "not promoted", result.reason)
    return Promotion(result.promoted, result.reason)
