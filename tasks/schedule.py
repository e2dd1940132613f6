"""Prefect side of scheduled retraining: the pull step, late-start logging, the "nothing changed" skip, the training slot."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, State

from finetune.config import Settings
from finetune.pipeline.summary import unchanged_summary
from finetune.publishing.retrain import (
    base_model_ref,
    compare_with,
    last_published,
    late_start_message,
    lateness,
    nothing_changed_message,
)
from finetune.store import open_store

# Prefect itself marks a run Late after 15 s; a minute keeps queue hand-offs out of the log.
LATE_AFTER = timedelta(minutes=1)
SKIPPED_STATE = "Skipped"
# Names the global concurrency limit that holds one training per machine (deployments/provision.py creates it).
TRAINING_SLOT_ENV = "FINETUNE_TRAINING_SLOT"
MACHINE_SLOT = "mlx-training-{host}"
REPO_ENV = "FINETUNE_REPO"
# Where deployment runs resolve relative paths (prefect.yaml's job variables set it).
WORKER_DIR_ENV = "FINETUNE_WORKER_DIR"


def use_local_clone(directory: str | None = None) -> dict[str, str]:
    """Deployment pull step: run the flow from this machine's clone of the repository.

    The clone is ``directory``, else ``$FINETUNE_REPO``, else the clone this package was
    installed from (``pip install -e .``), so a worker started from its clone's .venv
    needs no setting. Not ``set_working_directory: "{{ $FINETUNE_REPO }}"``: ``prefect
    deploy`` substitutes that from the deploying machine's environment when set there.
    """
    chosen = directory or os.environ.get(REPO_ENV)
    path = Path(chosen).expanduser().resolve() if chosen else Path(__file__).resolve().parents[1]
    if not ((path / "prefect.yaml").is_file() and (path / "flows" / "finetune.py").is_file()):
        hint = (
            f"check {REPO_ENV} in the worker's environment"
            if chosen
            else f"set {REPO_ENV} in the worker's environment to the clone's path, or pip install -e . from a clone"
        )
        raise FileNotFoundError(
            f"{path}: not a clone of the finetune repository (no prefect.yaml, flows/finetune.py); {hint}"
        )
    os.chdir(path)
    return {"directory": str(path)}


def enter_worker_dir() -> Path | None:
    """Change to ``$FINETUNE_WORKER_DIR`` (created if missing) when it is set.

    A worker clones each deployment run into a temporary directory that is deleted after
    the run: relative paths in parameters (``work_dir``, a local store) must not live there,
    or checkpoints and published bundles vanish with it.
    """
    chosen = os.environ.get(WORKER_DIR_ENV)
    if not chosen:
        return None
    path = Path(chosen).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    return path


def log_late_start(grace: timedelta = LATE_AFTER) -> timedelta | None:
    """Warn when this flow run started well after its scheduled time; returns the delay."""
    scheduled = flow_run.scheduled_start_time
    late = lateness(scheduled, datetime.now(UTC), grace)
    if late is not None:
        get_run_logger().warning(late_start_message(scheduled, late))
    return late


@task(name="check-unchanged", cache_policy=NO_CACHE, result_serializer="json")
def check_unchanged(settings: Settings, dataset_version: str) -> dict[str, Any] | None:
    """The last published manifest when nothing changed since it (skip training); None when this run must train."""
    comparison = compare_with(
        last_published(open_store(settings.storage)),
        dataset_version,
        settings.fingerprint(),
        base_model_ref(settings.model),
    )
    logger = get_run_logger()
    if comparison.unchanged:
        logger.info(nothing_changed_message(comparison.previous))
        return comparison.previous
    logger.info("training: %s", "; ".join(comparison.changes))
    return None


def nothing_changed(previous: dict[str, Any], store_uri: str) -> State:
    """The flow's final state for a skipped retrain: Completed, named Skipped, pointing at the published run."""
    result = unchanged_summary(previous, store_uri)
    return Completed(name=SKIPPED_STATE, message=result["reason"], data=result)


def training_slot_name(template: str = MACHINE_SLOT, host: str | None = None) -> str:
    """The slot ``template`` names on this machine: ``{host}`` is its short host name, lowercased."""
    return template.format(host=(host or socket.gethostname()).split(".")[0].lower())


@contextlib.contextmanager
def training_slot() -> Iterator[None]:
    """Hold this machine's training slot (a global concurrency limit of 1) while training.

    Only when the environment names one (``FINETUNE_TRAINING_SLOT``, set for every
    deployment run by prefect.yaml's job variables): runs from a laptop or the demo need
    no server-side limit. The limit is created on first use, so a new Mac needs no
    provisioning; ``strict=True`` because Prefect otherwise silently skips a missing one.
    """
    template = os.environ.get(TRAINING_SLOT_ENV)
    if not template:
        yield
        return
    from prefect.concurrency.sync import concurrency

    name = training_slot_name(template)
    ensure_slot(name)
    get_run_logger().info("waiting for training slot %s", name)
    with concurrency(name, occupy=1, strict=True):
        yield


def ensure_slot(name: str, limit: int = 1) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another machine's run created it meanwhile
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
