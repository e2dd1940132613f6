"""Prefect tasks that prepare a run: storage credentials and reachability, base model resolved."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from finetune.config import SECRET_FIELDS, ConfigError, Settings, StorageConfig
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


def with_block_credentials(settings: Settings) -> Settings:
    """``settings`` with the storage credentials of the Secret block ``storage.credentials_block`` names.

    Not a task: its result would hold the secrets. The block's value is a JSON object with
    any of access_key_id, secret_access_key, session_token; the server stores it encrypted.
    """
    name = settings.storage.credentials_block
    if not name:
        return settings
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError as exc:
        raise ConfigError(f"storage.credentials_block: no Secret block named {name!r} ({exc})") from None
    if not isinstance(value, dict) or not set(value) <= set(SECRET_FIELDS) or not value:
        raise ConfigError(
            f"storage.credentials_block {name!r}: the Secret's value must be a JSON object with "
            f"{', '.join(SECRET_FIELDS)}, got {type(value).__name__}"
            + (f" with keys {sorted(value)}" if isinstance(value, dict) else "")
        )
    storage = StorageConfig(**{**settings.storage.model_dump(), **value})
    return settings.model_copy(update={"storage": storage})
