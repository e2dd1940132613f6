"""What each stage returns: small typed records the flow passes on by attribute (and Prefect stores as JSON).

Prefect's JSON result serializer writes any of these as ``{"__class__": <qualified name>, "data": ...}`` and
reads it back with ``pydantic.TypeAdapter(cls)``, so every field is a plain JSON type, a ``Path`` or another
such record. The stages' other results are library types of their own: ``finetune.train.outputs.TrainResult``
(train), ``finetune.evaluation.evaluate.EvalReport`` (evaluate), ``finetune.publishing.PublishedRun``
(publish) and ``finetune.export.BundleExport`` (exports).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune.evaluation.evaluate import EvalReport


@dataclass(frozen=True)
class DatasetVersion:
    """Validated canonical rows in a content-addressed directory."""

    version: str
    directory: Path
    counts: dict[str, int]
    bad_rows: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TokenizedDataset:
    """Every split tokenized once; ``version`` names rows, template and tokenizer (and is the data fingerprint)."""

    version: str
    dataset_version: str
    path: Path
    reused: bool = False


@dataclass(frozen=True)
class DataReport:
    """The run's data report, as Markdown and as JSON."""

    markdown: Path
    json: Path


@dataclass(frozen=True)
class Champion:
    """The current champion: its run id and its bundle, verified into the local cache."""

    run_id: str
    path: Path


def _finite(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass(frozen=True)
class Scorecard:
    """What the champion swap needs of an evaluated run: the gate's verdict and the primary metric's scores."""

    promote: bool
    reason: str
    metric: str | None
    higher_is_better: bool | None
    score: float | None  # the candidate's; None when it was not finite
    champion_score: float | None = None  # the champion re-measured on the same inputs, when there was one

    @classmethod
    def of_report(cls, report: EvalReport) -> Scorecard:
        metric = report.primary_metric
        champion = report.variants.get("champion")
        return cls(
            promote=report.decision.promote,
            reason=report.decision.reason,
            metric=metric,
            higher_is_better=report.higher_is_better,
            score=_finite(report.candidate.metrics.get(metric)),
            champion_score=_finite(champion.metrics.get(metric)) if champion else None,
        )

    @classmethod
    def of_manifest(cls, manifest: Mapping[str, Any]) -> Scorecard:
        """As a published run's manifest recorded it (metrics are stored with non-finite values as null)."""
        evaluation = manifest.get("evaluation") or {}
        decision = manifest.get("decision") or {"promote": False, "reason": "the manifest records no decision"}
        metric = evaluation.get("metric")
        metrics = manifest.get("metrics") or {}
        return cls(
            promote=decision["promote"],
            reason=decision["reason"],
            metric=metric,
            higher_is_better=evaluation.get("higher_is_better"),
            score=_finite((metrics.get("candidate") or {}).get(metric)),
            champion_score=_finite((metrics.get("champion") or {}).get(metric)),
        )


@dataclass(frozen=True)
class Promotion:
    """Whether the run became the champion, and why (or why not)."""

    promoted: bool
    reason: str

    @classmethod
    def left_to_sweep(cls, sweep_id: str) -> Promotion:
        return cls(False, f"trial of sweep {sweep_id}: the sweep promotes its winner")


@dataclass(frozen=True)
class StagedBundle:
    """A sweep trial's bundle, verified into the local cache, with what its manifest recorded."""

    path: Path
    fields: dict[str, Any]  # the manifest's fields other than those publishing writes itself
    scorecard: Scorecard
    champion_run_id: str | None = None  # whose metrics the trial's champion scores are
