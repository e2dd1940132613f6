"""Prefect tasks that prepare a run: storage reachable, base model resolved."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from finetune.config import StorageConfig
from finetune.model.resolve import resolve_model as resolve_model_ref
from finetune.store import check_reachable, open_store


@task(name="check-storage", cache_policy=NO_CACHE, result_serializer="json")
def check_storage(storage: StorageConfig) -> str:
    """Fail before any training when the store is unreachable or misconfigured; returns its URI."""
    store = open_store(storage)
    check_reachable(store)
    get_run_logger().info("publishing to %s", store.uri)
    return store.uri


@task(name="resolve-model", cache_policy=NO_CACHE, result_serializer="json")
def resolve_model(model: str, revision: str | None, work_dir: str, dtype: str = "auto") -> str:
    """A local model directory: builds the tiny model, imports GGUF files, downloads hub ids, on first use."""
    path = str(resolve_model_ref(model, revision, Path(work_dir), dtype))
    get_run_logger().info("base model: %s", path)
    return path
