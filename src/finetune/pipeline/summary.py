"""What a run records and reports: the manifest's fields, the bundle's metrics, the summary the CLI prints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from finetune.config import SECRET_FIELDS, SECTIONS, Settings, StorageOptions, load_settings
from finetune.evaluation.report import examples_of
from finetune.layout import run_ref
from finetune.pipeline.results import Champion, DatasetVersion, Promotion, TokenizedDataset
from finetune.publishing import PublishedRun
from finetune.publishing.retrain import base_model_ref, nothing_changed_message

if TYPE_CHECKING:
    from finetune.evaluation.evaluate import EvalReport
    from finetune.export import BundleExport
    from finetune.train.outputs import TrainResult


def settings_from_sections(work_dir: str, **sections: Any) -> Settings:
    """Flow parameters (one pydantic model per section) over the worker's environment; unset secrets come from it."""
    overrides = {name: value.model_dump(exclude_none=True) for name, value in sections.items()}
    return load_settings(overrides={"work_dir": work_dir, **overrides})


def flow_parameters(settings: Settings) -> dict[str, Any]:
    """The flow's parameters for these settings (the sections and the work directory)."""
    sections = {name: getattr(settings, name) for name in SECTIONS}
    # Credentials are never parameters (the server stores parameters in plain text): the flow reads them
    # from its environment or the Secret block storage.credentials_block names.
    return {
        **sections,
        "storage": StorageOptions(**settings.storage.model_dump(exclude=set(SECRET_FIELDS))),
        "work_dir": str(settings.work_dir),
    }


def hyperparameters(settings: Settings) -> dict[str, Any]:
    """The model card's hyperparameters: what defines the adapter (retries or report intervals do not)."""
    return {"lora": settings.lora.defining_fields(), "training": settings.training.defining_fields()}


def training_summary(trained: TrainResult) -> dict[str, Any]:
    """The training result without its per-step history and local paths."""
    return {k: v for k, v in trained.to_json().items() if k not in ("history", "adapter_dir")}


def bundle_metrics(report: EvalReport, trained: TrainResult) -> dict[str, Any]:
    """The bundle's metrics.json: evaluation per variant, the gate's decision, the training summary."""
    recorded = report.to_dict()
    return {"evaluation": recorded["metrics"], "decision": recorded["decision"], "training": training_summary(trained)}


def manifest_fields(
    settings: Settings,
    fetched: DatasetVersion,
    tokens: TokenizedDataset,
    report: EvalReport,
    champion: Champion | None = None,
    exports: Sequence[BundleExport] = (),
) -> dict[str, Any]:
    """What the manifest records besides the files: inputs, config, fingerprint, metrics, the score to promote on."""
    from finetune import __version__

    recorded = report.to_dict()
    return {
        "base_model": base_model_ref(settings.model),
        "dataset_version": fetched.version,
        "tokenized_version": tokens.version,
        "config": settings.public_dict(),
        "config_fingerprint": settings.fingerprint(),
        "metrics": recorded["metrics"],
        "decision": recorded["decision"],
        "evaluation": {
            "metric": report.primary_metric,
            "score": recorded["metrics"]["candidate"].get(report.primary_metric),
            "higher_is_better": report.higher_is_better,
            # Whose metrics ["metrics"]["champion"] are: a later promotion compares like for like.
            "champion_run_id": champion.run_id if champion else None,
        },
        "code_version": __version__,
        "exports": [e.to_dict() for e in exports],
    }


def run_summary(
    *,
    run_id: str,
    run_dir: str,
    store_uri: str,
    model_path: str,
    fetched: DatasetVersion,
    trained: TrainResult,
    report: EvalReport,
    published: PublishedRun,
    promotion: Promotion,
    exports: Sequence[BundleExport] = (),
) -> dict[str, Any]:
    """The flow's result (what the CLI prints and the UI shows): where the run went and how it did."""
    return {
        "run_id": run_id,
        "run_dir": run_dir,
        "store": store_uri,
        "bundle_uri": published.uri,
        "model_path": model_path,
        "dataset_version": fetched.version,
        "metrics": report.to_dict()["metrics"],
        "promoted": promotion.promoted,
        "promotion_reason": promotion.reason,
        "training": training_summary(trained),
        "exports": [{"format": e.format, "path": e.path, "verification": e.verification} for e in exports],
        "examples": examples_of(report),
    }


def already_published(published: PublishedRun, run_dir: str, store_uri: str, promotion: Promotion) -> dict[str, Any]:
    """The summary of a re-run whose run id is already published: not trained again, promotion decided."""
    return {
        "run_id": published.run_id,
        "bundle_uri": published.uri,
        "dataset_version": published.manifest.get("dataset_version"),
        "metrics": published.manifest.get("metrics", {}),
        "promoted": promotion.promoted,
        "promotion_reason": f"already published by an earlier attempt; {promotion.reason}",
        "run_dir": run_dir,
        "store": store_uri,
    }


def unchanged_summary(previous: dict[str, Any], store_uri: str) -> dict[str, Any]:
    """The summary of a skipped retrain, pointing at the last published run."""
    return {
        "skipped": True,
        "reason": nothing_changed_message(previous),
        "run_id": previous["run_id"],
        "bundle_uri": run_ref(store_uri, previous["run_id"]),
        "dataset_version": previous.get("dataset_version"),
        "metrics": previous.get("metrics", {}),
        "promoted": False,
        "promotion_reason": "not evaluated: nothing changed",
    }
