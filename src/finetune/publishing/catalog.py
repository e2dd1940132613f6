"""What the store holds: every run (published or not), and garbage collection of unpublished attempts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune.layout import RUNS_DIR
from finetune.publishing.champion import read_champion
from finetune.publishing.publish import read_manifest
from finetune.store import (
    Store,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    published: bool
    created: str | None
    metric: str | None
    score: float | None
    champion: bool
    attempts: int
    size: int


@dataclass(frozen=True)
class GcReport:
    deleted_attempts: list[str]
    deleted_objects: int
    kept_attempts: int
    dry_run: bool
    aborted_uploads: int = 0  # incomplete multipart uploads (or local temp files) removed


def _group_runs(store: Store) -> dict[str, list[Any]]:
    runs: dict[str, list[Any]] = {}
    for info in store.list(f"{RUNS_DIR}/"):
        parts = info.key.split("/")
        if len(parts) >= 3:
            runs.setdefault(parts[1], []).append(info)
    return runs


def list_runs(store: Store) -> list[RunSummary]:
    """Every run in the store, published or not, oldest first."""
    champion = read_champion(store)
    summaries = []
    for run_id, infos in _group_runs(store).items():
        manifest = read_manifest(store, run_id) if any(i.key.endswith("/manifest.json") for i in infos) else None
        attempts = {(manifest or {}).get("attempt_id")} - {None}  # a local store moved its files into the run
        attempts |= {
            i.key.split("/")[3] for i in infos if i.key.split("/")[2] == "attempts" and len(i.key.split("/")) > 4
        }
        evaluation = (manifest or {}).get("evaluation") or {}
        summaries.append(
            RunSummary(
                run_id=run_id,
                published=manifest is not None,
                created=(manifest or {}).get("created")
                or min(i.last_modified for i in infos).isoformat(timespec="seconds"),
                metric=evaluation.get("metric"),
                score=evaluation.get("score"),
                champion=champion is not None and champion.get("run_id") == run_id,
                attempts=len(attempts),
                size=sum(f["size"] for f in (manifest or {}).get("files", {}).values()),
            )
        )
    return sorted(summaries, key=lambda s: (s.created or "", s.run_id))


def gc(store: Store, older_than: timedelta, *, dry_run: bool = False, now: datetime | None = None) -> GcReport:
    """Delete staging attempts that no manifest references and whose newest object is older than ``older_than``,
    and abort multipart uploads (remove local temp files) that started before then and never completed.

    A published bundle (the attempt its manifest names) is never deleted. The age guard
    protects attempts still uploading; keep it longer than a publish takes.
    """
    cutoff = (now or datetime.now(UTC)) - older_than
    deleted: list[str] = []
    deleted_objects = kept = 0
    for run_id, infos in _group_runs(store).items():
        attempts: dict[str, list[Any]] = {}
        for info in infos:
            parts = info.key.split("/")
            if len(parts) > 4 and parts[2] == "attempts":
                attempts.setdefault(parts[3], []).append(info)
        if not attempts:
            continue
        manifest = read_manifest(store, run_id)
        published = manifest.get("attempt_id") if manifest else None
        for attempt_id, objects in sorted(attempts.items()):
            if attempt_id == published or max(o.last_modified for o in objects) >= cutoff:
                kept += 1
                continue
            # Re-read right before deleting: the attempt may have been published since the listing.
            manifest = read_manifest(store, run_id)
            if manifest is not None and manifest.get("attempt_id") == attempt_id:
                kept += 1
                continue
            deleted.append(f"{run_id}/{attempt_id}")
            deleted_objects += len(objects)
            if not dry_run:
                store.delete_many([o.key for o in objects])
                log.info("gc: deleted %d objects of unpublished attempt %s/%s", len(objects), run_id, attempt_id)
    aborted = 0 if dry_run else store.clean_incomplete(cutoff)
    return GcReport(deleted, deleted_objects, kept, dry_run, aborted)
