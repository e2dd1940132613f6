"""Prefect side of a sweep: trial flow runs on the pool, what each one left, the winner's publication, the artifacts."""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger

from finetune.config import StorageConfig
from finetune.layout import bundle_cache, run_ref
from finetune.pipeline.results import Scorecard, StagedBundle
from finetune.publishing import fetch_bundle, read_manifest
from finetune.store import open_store
from finetune.sweep import Sweep, Trial, TrialOutcome, metric_plot_png, trial_rows
from tasks.train import HISTORY_KEY

TRIAL_DEPLOYMENT = "finetune-pipeline/sweep-trial"
TABLE_KEY = "sweep-trials"
PLOT_KEY = "sweep-plot"
# What publish_run writes itself; everything else of a trial's manifest carries over to the published run.
MANIFEST_OWN_FIELDS = {"format", "run_id", "attempt_id", "created", "files", "store"}


def trial_tag(run_id: str) -> str:
    return f"trial:{run_id}"


def _previous_runs(deployment_id: UUID, run_id: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[trial_tag(run_id)])),
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        )
    return sorted(runs, key=lambda r: r.created or 0)


def submit_trial(deployment: str, sweep: Sweep, trial: Trial, parameters: dict[str, Any]) -> FlowRun:
    """The trial's flow run: a Completed one is reused, a live one is watched, otherwise a new one is queued.

    Called from the sweep flow, so ``run_deployment`` links the new run to it (a task run of the
    parent is the child's parent_task_run_id). A new run of a trial that crashed or was cancelled
    has the same run id, so it resumes from that trial's last checkpoint.
    """
    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
    previous = _previous_runs(deployment_id, trial.run_id)
    if done := next((r for r in previous if r.state and r.state.type == StateType.COMPLETED), None):
        logger.info("trial %d (%s): finished earlier in flow run %s; reused", trial.index, trial.label(), done.name)
        return done
    if live := next((r for r in previous if r.state and not r.state.is_final()), None):
        logger.info(
            "trial %d (%s): flow run %s is still %s; watching it",
            trial.index,
            trial.label(),
            live.name,
            live.state.name,
        )
        return live
    attempt = len(previous)
    run = run_deployment(
        deployment,
        parameters=parameters,
        timeout=0,
        flow_run_name=trial.run_id if attempt == 0 else f"{trial.run_id}.{attempt}",
        tags=[f"sweep:{sweep.sweep_id}", trial_tag(trial.run_id)],
        # One flow run per trial and attempt, even if this flow is retried between creating and recording it.
        idempotency_key=f"{trial.run_id}.{attempt}",
    )
    verb = "resumes" if attempt else "queued"
    logger.info("trial %d (%s): %s as flow run %s", trial.index, trial.label(), verb, run.name)
    return run


def wait_for_runs(runs: Sequence[FlowRun], poll_seconds: float) -> list[FlowRun]:
    """Poll until every trial's flow run is final (Completed, Failed, Crashed or Cancelled)."""
    logger = get_run_logger()
    current = list(runs)
    last: dict[UUID, str] = {}
    while True:
        with get_client(sync_client=True) as client:
            current = [r if r.state and r.state.is_final() else client.read_flow_run(r.id) for r in current]
        for r in current:
            if last.get(r.id) != (name := r.state.name if r.state else "?"):
                last[r.id] = name
                logger.info("trial run %s: %s", r.name, name)
        if all(r.state and r.state.is_final() for r in current):
            return current
        time.sleep(poll_seconds)


def _tokens_per_sec(flow_run_id: UUID) -> float | None:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    # Keys carry the deployment's name (tasks.artifacts.artifact_key).
    history = [a for a in artifacts if (a.key or "").endswith(HISTORY_KEY)]
    rows = history[0].data if history else None
    if isinstance(rows, str):
        import json

        rows = json.loads(rows)
    # Cells without a value are a dash, not None (tasks.artifacts.table).
    rates = [r["tokens_per_sec"] for r in rows or [] if isinstance(r.get("tokens_per_sec"), (int, float))]
    return sum(rates) / len(rates) if rates else None


@task(name="collect-trial", cache_policy=NO_CACHE)
def collect_outcome(trial: Trial, flow_run_id: UUID, staging: StorageConfig) -> TrialOutcome:
    """What a trial left: its state and wall time from its flow run; metrics and the gate's verdict from its manifest."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    outcome = TrialOutcome(trial, run.state.name if run.state else "?", flow_run_id=str(run.id))
    if run.start_time and run.end_time:
        outcome.wall_seconds = (run.end_time - run.start_time).total_seconds()
    if not (run.state and run.state.type == StateType.COMPLETED):
        return outcome
    manifest = read_manifest(open_store(staging), trial.run_id)
    if manifest is None:
        outcome.state = "Completed, not published"
        return outcome
    outcome.metrics = {k: v for k, v in manifest["metrics"]["candidate"].items() if v is not None}
    outcome.primary_metric = manifest["evaluation"]["metric"]
    outcome.decision = manifest["decision"]
    outcome.tokens_per_sec = _tokens_per_sec(run.id)
    return outcome


@task(name="stage-trial-bundle", cache_policy=NO_CACHE, result_serializer="json")
def staged_bundle(staging: StorageConfig, run_id: str, work_dir: str) -> StagedBundle:
    """A trial's bundle from the sweep's staging area, verified into the local cache, with its manifest's fields."""
    store = open_store(staging)
    manifest = read_manifest(store, run_id)
    if manifest is None:
        raise FileNotFoundError(
            f"{run_ref(store.uri, run_id)}: the trial was not published to the sweep's staging area"
        )
    path = fetch_bundle(run_ref(store.uri, run_id), bundle_cache(work_dir), staging)
    fields = {k: v for k, v in manifest.items() if k not in MANIFEST_OWN_FIELDS}
    champion_run_id = manifest["evaluation"].get("champion_run_id")
    return StagedBundle(Path(path), fields, Scorecard.of_manifest(manifest), champion_run_id)


@task(name="sweep-artifacts", cache_policy=NO_CACHE)
def sweep_artifacts(
    sweep: Sweep, outcomes: list[TrialOutcome], metric: str | None, winner: str | None, summary: str, out_dir: str
) -> str:
    """The trials table and the plot (as a Markdown image, which the UI renders), also written to ``out_dir``."""
    swept = sweep.swept_fields()
    create_table_artifact(
        table=trial_rows(outcomes, swept, metric, winner),
        key=TABLE_KEY,
        description=f"sweep {sweep.sweep_id}: {summary}",
    )
    if metric is None:
        return ""
    png = metric_plot_png(outcomes, swept, metric)
    path = Path(out_dir) / f"{sweep.sweep_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    image = base64.b64encode(png).decode()
    create_markdown_artifact(
        markdown=f"### Sweep `{sweep.sweep_id}`\n\n{summary}\n\n![{metric} per trial](data:image/png;base64,{image})",
        key=PLOT_KEY,
        description=f"sweep {sweep.sweep_id}: {metric} against each swept parameter",
    )
    return str(path)
