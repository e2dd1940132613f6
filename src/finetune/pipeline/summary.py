"""What a run records and reports: the manifest's fields, the bundle's metrics, the summary the CLI prints."""

from __future__ import annotations

from typing import Any

from finetune.config import SECRET_FIELDS, SECTIONS, Settings, StorageOptions, load_settings
from finetune.layout import run_ref
from finetune.publishing.retrain import base_model_ref, nothing_changed_message


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


def training_summary(trained: dict[str, Any]) -> dict[str, Any]:
    """The training result without its per-step history and local paths."""
    return {k: v for k, v in trained.items() if k not in ("history", "adapter_dir")}


def bundle_metrics(report: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """The bundle's metrics.json: evaluation per variant, the gate's decision, the training summary."""
    return {"evaluation": report["metrics"], "decision": report["decision"], "training": training_summary(trained)}


def manifest_fields(
    settings: Settings,
    data_version: str,
    tokens_version: str,
    report: dict[str, Any],
    champion: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the manifest records besides the files: inputs, config, fingerprint, metrics, the score to promote on."""
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
            # Whose metrics report["metrics"]["champion"] are: a later promotion compares like for like.
            "champion_run_id": champion["run_id"] if champion else None,
        },
        "code_version": __version__,
    }


def already_published(
    manifest: dict[str, Any], run_dir: str, store_uri: str, promotion: dict[str, Any]
) -> dict[str, Any]:
    """The summary of a re-run whose run id is already published: not trained again, promotion decided."""
    return {
        "run_id": manifest["run_id"],
        "bundle_uri": manifest["uri"],
        "dataset_version": manifest.get("dataset_version"),
        "metrics": manifest.get("metrics", {}),
        "promoted": promotion["promoted"],
        "promotion_reason": f"already published by an earlier attempt; {promotion['reason']}",
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
