"""Prefect tasks for the evaluate stage: run the comparison, log the gate, publish artifacts, write reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from finetune.config import Settings, StorageConfig
from finetune.evaluation.evaluate import EvalReport
from finetune.evaluation.report import comparison_rows, samples_markdown, write_loss_plot, write_model_card
from finetune.layout import MODEL_CARD_FILE, PLOT_FILE
from finetune.pipeline.stages import evaluate_run
from tasks.artifacts import artifact_key, bundle_link, image_markdown, table

# Stable keys: the Artifacts page then shows each key's history across runs.
METRICS_KEY = "evaluation-metrics"
SAMPLES_KEY = "evaluation-samples"
BUNDLE_KEY = "published-bundle"
PLOT_KEY = "loss-curve"


def publish_eval_artifacts(report: EvalReport, run_id: str, samples: int = 5) -> None:
    """Table artifact (metrics side by side) and markdown artifact (decision and example generations)."""
    verdict = "promoted" if report.decision.promote else "not promoted"
    create_table_artifact(
        table=table(comparison_rows(report)),
        key=artifact_key(METRICS_KEY),
        description=f"run {run_id}: {verdict}: {report.decision.reason} (* primary metric)",
    )
    create_markdown_artifact(
        markdown=f"Run `{run_id}`\n\n" + samples_markdown(report, samples),
        key=artifact_key(SAMPLES_KEY),
        description=f"run {run_id}: example generations next to their references",
    )


@task(name="evaluate", cache_policy=NO_CACHE, result_serializer="json")
def evaluate_adapter(
    model_path: str,
    adapter_dir: Path | str,
    tokenized_path: Path | str,
    dataset_dir: Path | str,
    settings: Settings,
    run_id: str,
    champion_dir: Path | str | None = None,
) -> EvalReport:
    """Evaluate base, champion and candidate; log and publish the decision."""
    logger = get_run_logger()
    report = evaluate_run(
        model_path, adapter_dir, tokenized_path, dataset_dir, settings, champion_dir, progress=logger.info
    )
    for name, variant in report.variants.items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in variant.metrics.items() if not k.endswith("_tokens"))
        logger.info("%s: %s", name, shown)
    logger.info("gate: %s: %s", "promote" if report.decision.promote else "do not promote", report.decision.reason)
    publish_eval_artifacts(report, run_id, settings.evaluation.samples_in_report)
    return report


@task(name="write-reports", cache_policy=NO_CACHE, result_serializer="json")
def write_reports(
    report: EvalReport,
    history: Sequence[Mapping[str, Any]],
    out_dir: str,
    *,
    base_model: str,
    data_version: str,
    hyperparameters: Mapping[str, Any],
    run_id: str,
    bundle_uri: str | None = None,
) -> list[str]:
    """Write loss_curve.png (when the history has losses) and README.md into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    paths = []
    has_losses = any(h.get("train_loss") is not None or h.get("val_loss") is not None for h in history)
    if has_losses:
        paths.append(write_loss_plot(history, out / PLOT_FILE))
        create_markdown_artifact(
            markdown=image_markdown(paths[-1], f"Loss curve of run {run_id}"),
            key=artifact_key(PLOT_KEY),
            description=f"run {run_id}: training and validation loss per step",
        )
    else:
        get_run_logger().warning("no loss history to plot; the model card has no loss curve")
    paths.append(
        write_model_card(
            out / MODEL_CARD_FILE,
            report,
            base_model=base_model,
            data_version=data_version,
            hyperparameters=hyperparameters,
            run_id=run_id,
            bundle_uri=bundle_uri,
            plot_file=PLOT_FILE if has_losses else None,
        )
    )
    return [str(p) for p in paths]


@task(name="link-bundle", cache_policy=NO_CACHE)
def link_bundle(storage: StorageConfig, uri: str, run_id: str, promoted: bool) -> None:
    """The published bundle: a link a browser opens (S3: presigned), or its local path as text."""
    url, markdown = bundle_link(storage, uri)
    verdict = "promoted to champion" if promoted else "published, not promoted"
    if url is None:
        create_markdown_artifact(
            markdown=markdown, key=artifact_key(BUNDLE_KEY), description=f"run {run_id}: {verdict}"
        )
    else:
        create_link_artifact(
            link=url,
            link_text=f"bundle of run {run_id}",
            key=artifact_key(BUNDLE_KEY),
            description=f"run {run_id}: {verdict}: {uri}",
        )
