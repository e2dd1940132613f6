"""The finetune pipeline: fetch -> template -> train -> evaluate -> publish.

Parameters mirror the configuration sections, so the Prefect UI shows a typed
form. Secrets are not parameters: workers read them from their environment
(FINETUNE_STORAGE__*, or the standard AWS chain) or the Secret block storage.credentials_block names.
"""

from __future__ import annotations

from typing import Any

from prefect import State, flow, get_run_logger
from prefect.runtime import flow_run

from finetune import layout
from finetune.config import (
    DatasetConfig,
    EvaluationConfig,
    ExportConfig,
    LoraConfig,
    ModelConfig,
    StorageOptions,
    TemplateConfig,
    TrainingConfig,
)
from finetune.pipeline.results import Promotion, Scorecard
from finetune.pipeline.summary import (
    already_published,
    bundle_metrics,
    hyperparameters,
    manifest_fields,
    run_summary,
    settings_from_sections,
)
from tasks.bundle import assemble_bundle
from tasks.data import fetch_dataset, report_dataset, template_dataset
from tasks.evaluate import evaluate_adapter, link_bundle, write_reports
from tasks.export import export_formats
from tasks.logs import log_cancels_as_cancels
from tasks.prepare import check_storage, resolve_model, with_block_credentials
from tasks.publish import (
    champion_bundle,
    find_published_run,
    promote_candidate,
    publish_bundle,
    trial_storage,
)
from tasks.schedule import (
    check_unchanged,
    enter_worker_dir,
    log_late_start,
    nothing_changed,
    training_slot,
)
from tasks.train import train_with_retries


def default_run_id() -> str:
    """Derived from this flow run, so retrying it (Retry in the UI, flow retries) resumes the same run."""
    return f"{flow_run.scheduled_start_time:%Y%m%d-%H%M%S}-{str(flow_run.id)[:8]}"


@flow(name="finetune-pipeline", log_prints=True)
def finetune_pipeline(
    run_id: str | None = None,
    force: bool = False,
    dataset: DatasetConfig = DatasetConfig(),
    model: ModelConfig = ModelConfig(),
    training: TrainingConfig = TrainingConfig(),
    lora: LoraConfig = LoraConfig(),
    template: TemplateConfig = TemplateConfig(),
    evaluation: EvaluationConfig = EvaluationConfig(),
    export: ExportConfig = ExportConfig(),
    storage: StorageOptions = StorageOptions(),
    work_dir: str = ".finetune",
    fresh: bool = False,
    skip_if_unchanged: bool = False,
    sweep_id: str | None = None,
) -> dict[str, Any] | State:
    """Train, evaluate and publish one LoRA adapter; re-running with the same run_id resumes it.

    With ``skip_if_unchanged`` (the nightly deployment's schedule and trigger), Skipped when
    dataset version, base model and configuration equal the last published run's, unless
    ``force``; a run asked for on demand trains. As a trial of sweep ``sweep_id`` the bundle goes
    to the sweep's staging area of the store and is never promoted: the sweep promotes its winner.

    Args:
        run_id: Name of this run; re-running a run id resumes it. Empty: derived from the flow run.
        force: Train even when data, base model and configuration equal the last published run's.
        dataset: The data: source (path, s3://, https://, hf:, builtin:capitals), format, row shape.
        model: The base model: a Hugging Face id or local MLX directory (builtin:tiny-llama: the demo).
        training: Iterations, learning rate, batch size, schedule, checkpoints.
        lora: Adapter rank, scale, dropout and which layers.
        template: Chat template, system prompt, sequence length.
        evaluation: Metrics, the primary metric and the promotion gate.
        export: Optional exports of the bundle (fused, gguf, peft), each verified.
        storage: Where bundles go (storage.uri); credentials are never parameters: the worker's
            environment, or the Secret block named in storage.credentials_block.
        work_dir: Run directories and caches on the worker (relative to ~/finetune-worker there).
        fresh: Discard this run id's checkpoints and start over.
        skip_if_unchanged: Stop after fetching the data when nothing changed (the nightly deployment).
        sweep_id: Set by a sweep for its trials.
    """
    enter_worker_dir()
    log_cancels_as_cancels()
    sections = dict(dataset=dataset, template=template, model=model, lora=lora, training=training)
    sections.update(evaluation=evaluation, storage=storage, export=export)
    settings = with_block_credentials(settings_from_sections(work_dir, **sections))
    run_id = run_id or default_run_id()
    run_dir = str(layout.run_dir(work_dir, run_id))
    get_run_logger().info("run %s in %s", run_id, run_dir)
    log_late_start()

    store_uri = check_storage(settings.storage)
    publish_to = trial_storage(settings.storage, sweep_id) if sweep_id else settings.storage
    if done := find_published_run(publish_to, run_id):
        # Published by an earlier attempt that may have failed before (or while) promoting: decide now.
        if sweep_id:
            promotion = Promotion.left_to_sweep(sweep_id)
        else:
            scorecard = Scorecard.of_manifest(done.manifest)
            promotion = promote_candidate(settings.storage, run_id, scorecard, settings.evaluation.promotion_margin)
        return already_published(done, run_dir, store_uri, promotion)
    model_path = resolve_model(settings.model.path, settings.model.revision, work_dir, settings.model.dtype)

    fetched = fetch_dataset(settings.dataset, settings.storage, work_dir)
    # Scheduled and triggered runs (retrain-nightly sets it) skip; a run someone asked for trains.
    if skip_if_unchanged and not force and (previous := check_unchanged(settings, fetched.version)):
        return nothing_changed(previous, store_uri)
    tokens = template_dataset(fetched.directory, model_path, settings.template, settings.dataset.on_bad_row, work_dir)
    report_dataset(fetched.directory, tokens.path, run_dir, settings.training.batch_size)

    with training_slot():
        trained = train_with_retries(settings, model_path, tokens.path, run_dir, fresh=fresh)

    champion = champion_bundle(settings.storage, work_dir)
    report = evaluate_adapter(
        model_path,
        trained.adapter_dir,
        tokens.path,
        fetched.directory,
        settings,
        run_id,
        champion_dir=champion.path if champion else None,
    )

    bundle_uri = layout.run_ref(store_uri, run_id)
    reports = write_reports(
        report,
        trained.history,
        run_dir,
        base_model=settings.model.path,
        data_version=fetched.version,
        hyperparameters=hyperparameters(settings),
        run_id=run_id,
        bundle_uri=bundle_uri,
    )
    bundle_dir = assemble_bundle(
        run_dir,
        trained.adapter_dir,
        model_path,
        settings.template,
        settings.public_dict(),
        bundle_metrics(report, trained),
        reports,
    )
    exports = export_formats(bundle_dir, settings) if settings.export.formats else []
    fields = manifest_fields(settings, fetched, tokens, report, champion, exports)
    published = publish_bundle(publish_to, run_id, bundle_dir, fields)
    if sweep_id:
        promotion = Promotion.left_to_sweep(sweep_id)
    else:
        scorecard = Scorecard.of_report(report)
        margin = settings.evaluation.promotion_margin
        promotion = promote_candidate(settings.storage, run_id, scorecard, margin, champion and champion.run_id)
    link_bundle(publish_to, published.uri, run_id, promotion.promoted)

    return run_summary(
        run_id=run_id,
        run_dir=run_dir,
        store_uri=store_uri,
        model_path=model_path,
        fetched=fetched,
        trained=trained,
        report=report,
        published=published,
        promotion=promotion,
        exports=exports,
    )
