"""Decisions a scheduled retrain makes before it spends hours: did anything change, is it late.

A nightly retrain on a Mac that slept through its slot starts hours late, and
one whose dataset, base model and configuration are those of the last
published run would only reproduce it. This module compares and measures;
the Prefect layer (``tasks/schedule.py``) logs and returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from finetune.config import ModelConfig
from finetune.layout import MANIFEST_FILE, RUNS_DIR
from finetune.publishing.publish import read_manifest
from finetune.store import Store


def base_model_ref(model: ModelConfig) -> dict[str, Any]:
    """The base model as a manifest records it (``base_model``)."""
    return {"path": model.path, "revision": model.revision}


def last_published(store: Store) -> dict[str, Any] | None:
    """The manifest of the most recently published run, or None when nothing is published.

    Manifests are written once, so an object's modification time is its publication
    time: one listing and one read, however many runs the store holds.
    """
    manifests = [
        info
        for info in store.list(f"{RUNS_DIR}/")
        if info.key.count("/") == 2 and info.key.endswith("/" + MANIFEST_FILE)
    ]
    if not manifests:
        return None
    newest = max(info.last_modified for info in manifests)
    # Timestamps have one-second resolution on S3: break ties by the manifest's own creation time.
    candidates = [read_manifest(store, info.key.split("/")[1]) for info in manifests if info.last_modified == newest]
    return max(
        (m for m in candidates if m is not None), key=lambda m: (m.get("created", ""), m["run_id"]), default=None
    )


@dataclass(frozen=True)
class Comparison:
    """This run's inputs against the last published run's."""

    previous: dict[str, Any] | None  # the last published manifest
    changes: list[str]  # what differs, phrased for the log; empty when nothing changed

    @property
    def unchanged(self) -> bool:
        return self.previous is not None and not self.changes


def compare_with(
    previous: dict[str, Any] | None, dataset_version: str, config_fingerprint: str, base_model: dict[str, Any]
) -> Comparison:
    if previous is None:
        return Comparison(None, ["nothing published yet"])
    changes = []
    if previous.get("dataset_version") != dataset_version:
        changes.append(f"dataset version {_short(previous.get('dataset_version'))} -> {_short(dataset_version)}")
    if previous.get("base_model") != base_model:
        changes.append(f"base model {_model(previous.get('base_model'))} -> {_model(base_model)}")
    if previous.get("config_fingerprint") != config_fingerprint:
        changes.append(f"configuration {_short(previous.get('config_fingerprint'))} -> {_short(config_fingerprint)}")
    return Comparison(previous, changes)


def nothing_changed_message(previous: dict[str, Any]) -> str:
    return (
        f"nothing changed since run {previous['run_id']} (published {previous.get('created', '?')}): "
        f"same dataset version {_short(previous.get('dataset_version'))}, base model "
        f"{_model(previous.get('base_model'))} and configuration; not retraining (force=true retrains anyway)"
    )


def lateness(scheduled: datetime, started: datetime, grace: timedelta) -> timedelta | None:
    """How late a run started, when later than ``grace``; None when on time (or early)."""
    late = started - scheduled
    return late if late > grace else None


def late_start_message(scheduled: datetime, late: timedelta) -> str:
    return (
        f"started {format_duration(late)} after its scheduled time {scheduled.isoformat(timespec='seconds')} "
        "(the worker was asleep, offline or busy with an earlier run)"
    )


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes)
    return " ".join(parts or [f"{seconds}s"])


def _short(version: Any) -> str:
    return str(version)[:12] if version else "?"


def _model(ref: Any) -> str:
    if not isinstance(ref, dict):
        return "?"
    return ref.get("path", "?") + (f"@{ref['revision']}" if ref.get("revision") else "")
