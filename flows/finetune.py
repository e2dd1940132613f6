"""The finetune pipeline: fetch -> template -> train -> evaluate -> publish.

Parameters mirror the configuration sections, so the Prefect UI shows a typed
form. Secrets are not parameters: workers read them from their environment
(FINETUNE_STORAGE__*, or the standard AWS chain).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import State, flow, get_run_logger
from prefect.runtime import flow_run

from finetune.config import (
    SECTIONS,
    DatasetConfig,
    EvaluationConfig,
    ExportConfig,
    LoraConfig,
    ModelConfig,
    Settings,
    StorageConfig,
    TemplateConfig,
    TrainingConfig,
    load_settings,
)
from finetune.publishing.retrain import base_model_ref
from tasks.bundle import assemble_bundle
from tasks.data import fetch_dataset, report_dataset, template_dataset
from tasks.evaluate import evaluate_adapter, link_bundle, write_reports
from tasks.export import export_formats
from tasks.prepare import check_storage, resolve_model
from tasks.publish import (
    champion_bundle,
    find_published_run,
    promote_candidate,
    publish_bundle,
)
from tasks.schedule import (
    check_unchanged,
    enter_worker_dir,
    log_late_start,
    nothing_changed,
    training_slot,
)
from tasks.train import train_adapter_task


def default_run_id() -> str:
    """Derived from this flow run, so retrying it (Retry in the UI, flow retries) resumes the same run."""
    return f"{flow_run.scheduled_start_time:%Y%m%d-%H%M%S}-{str(flow_run.id)[:8]}"


@flow(name="finetune-pipeline", log_prints=True)
def finetune_pipeline(
    dataset: DatasetConfig = DatasetConfig(),
    template: TemplateConfig = TemplateConfig(),
    model: ModelConfig = ModelConfig(),
    lora: LoraConfig = LoraConfig(),
    training: TrainingConfig = TrainingConfig(),
    evaluation: EvaluationConfig = EvaluationConfig(),
    storage: StorageConfig = StorageConfig(),
    export: ExportConfig = ExportConfig(),
    work_dir: str = ".finetune",
    run_id: str | None = None,
    fresh: bool = False,
    force: bool = False,
) -> dict[str, Any] | State:
    """Train, evaluate and publish one LoRA adapter; re-running with the same run_id resumes it.

    Skipped (state Skipped) when dataset version, base model and configuration equal the
    last published run's, unless ``force``.
    """
    enter_worker_dir()
    settings = settings_from_parameters(locals())
    run_id = run_id or default_run_id()
    run_dir = str(Path(work_dir) / "runs" / run_id)
    get_run_logger().info("run %s in %s", run_id, run_dir)
    log_late_start()

    store_uri = check_storage(settings.storage)
    if done := find_published_run(settings.storage, run_id):
        return {**summary_of_manifest(done), "run_dir": run_dir, "store": store_uri}
    model_path = resolve_model(settings.model.path, settings.model.revision, work_dir, settings.model.dtype)

    fetched = fetch_dataset(settings.dataset, settings.storage, work_dir)
    if not force and (previous := check_unchanged(settings, fetched["version"])):
        return nothing_changed(previous, store_uri)
    tokens = template_dataset(
        fetched["directory"], model_path, settings.template, settings.dataset.on_bad_row, work_dir
    )
    report_dataset(fetched["directory"], tokens["path"], run_dir, settings.training.batch_size)

    with training_slot():
        trained = train_adapter_task(settings)(settings, model_path, tokens["path"], run_dir, fresh=fresh)

    champion = champion_bundle(settings.storage, work_dir)
    report = evaluate_adapter(
        model_path,
        trained["adapter_dir"],
        tokens["path"],
        fetched["directory"],
        settings,
        run_id,
        champion_dir=champion["path"] if champion else None,
    )

    reports = write_reports(
        report,
        trained["history"],
        run_dir,
        base_model=settings.model.path,
        data_version=fetched["version"],
        hyperparameters={"lora": settings.lora.model_dump(), "training": settings.training.model_dump()},
        run_id=run_id,
        bundle_uri=f"{store_uri.rstrip('/')}/runs/{run_id}",
    )
    metrics = {"evaluation": report["metrics"], "decision": report["decision"], "training": summary_of(trained)}
    bundle_dir = assemble_bundle(
        run_dir, trained["adapter_dir"], model_path, settings.template, settings.public_dict(), metrics, reports
    )
    exports = export_formats(bundle_dir, settings) if settings.export.formats else []
    fields = manifest_fields(settings, fetched["version"], tokens["version"], report)
    published = publish_bundle(settings.storage, run_id, bundle_dir, {**fields, "exports": exports})
    promotion = promote_candidate(
        settings.storage, run_id, report, settings.evaluation.promotion_margin, champion["run_id"] if champion else None
    )
    link_bundle(published["uri"], run_id, promotion["promoted"])

    return {
        "run_id": run_id,
        "run_dir": run_dir,
        "store": store_uri,
        "bundle_uri": published["uri"],
        "model_path": model_path,
        "dataset_version": fetched["version"],
        "metrics": report["metrics"],
        "promoted": promotion["promoted"],
        "promotion_reason": promotion["reason"],
        "training": summary_of(trained),
        "exports": [{"format": e["format"], "path": e["path"], "verification": e["verification"]} for e in exports],
    }


def flow_parameters(settings: Settings) -> dict[str, Any]:
    """The flow's parameters for these settings (the sections and the work directory)."""
    return {**{name: getattr(settings, name) for name in SECTIONS}, "work_dir": str(settings.work_dir)}


def settings_from_parameters(parameters: dict[str, Any]) -> Settings:
    """Flow parameters over the worker's environment; secrets left unset come from the environment."""
    sections = {
        name: value.model_dump(exclude_none=True) for name, value in parameters.items() if hasattr(value, "model_dump")
    }
    return load_settings(overrides={"work_dir": parameters["work_dir"], **sections})


def summary_of(trained: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in trained.items() if k not in ("history", "adapter_dir")}


def summary_of_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": manifest["run_id"],
        "bundle_uri": manifest["uri"],
        "dataset_version": manifest.get("dataset_version"),
        "metrics": manifest.get("metrics", {}),
        "promoted": None,
        "promotion_reason": "already published by an earlier run; nothing done",
    }


def manifest_fields(
    settings: Settings, data_version: str, tokens_version: str, report: dict[str, Any]
) -> dict[str, Any]:
    from finetune import __version__

    candidate = report["metrics"]["candidate"]
    return {
        "base_model": base_model_ref(settings.model),
        "dataset_version": data_version,
        "tokenized_version": tokens_version,
        "config": settings.public_dict(),
        "config_fingerprint": settings.fingerprint(),
        "metrics": report["metrics"],
        "decision": report["decision"],
        "evaluation": {
            "metric": report["primary_metric"],
            "score": candidate.get(report["primary_metric"]),
            "higher_is_better": report["higher_is_better"],
        },
        "code_version": __version__,
    }
