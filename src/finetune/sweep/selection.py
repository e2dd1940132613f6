"""What a finished sweep knows about each trial, and the ranking by the gate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune.evaluation.gate import improvement
from finetune.evaluation.metrics import higher_is_better
from finetune.sweep.space import Trial

COMPLETED = "Completed"


@dataclass
class TrialOutcome:
    """One trial as the sweep saw it: its flow run's state and, when it published, its evaluation."""

    trial: Trial
    state: str
    flow_run_id: str | None = None
    wall_seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the candidate's, from the trial's manifest
    primary_metric: str | None = None
    decision: dict[str, Any] | None = None  # the gate's verdict vs base and champion, from the trial's evaluation
    tokens_per_sec: float | None = None

    @property
    def score(self) -> float | None:
        if self.primary_metric is None:
            return None
        value = self.metrics.get(self.primary_metric)
        return float(value) if value is not None and math.isfinite(value) else None

    @property
    def finished(self) -> bool:
        return self.state == COMPLETED and self.score is not None


def primary_metric_of(outcomes: Sequence[TrialOutcome]) -> str:
    """The one metric every finished trial was judged on; trials measured on different metrics are not comparable."""
    metrics = {o.primary_metric for o in outcomes if o.finished}
    if len(metrics) != 1:
        raise ValueError(
            f"finished trials disagree on the primary metric ({sorted(map(str, metrics))}): not comparable"
        )
    return metrics.pop()  # type: ignore[return-value]


def rank(outcomes: Sequence[TrialOutcome]) -> list[TrialOutcome]:
    """Finished trials, best first by the gate's notion of better (ties: earlier trial first)."""
    finished = [o for o in outcomes if o.finished]
    if not finished:
        return []
    metric = primary_metric_of(finished)
    best = finished[0].score
    # improvement() is the gate's comparison: positive when better, whichever direction the metric runs.
    return sorted(finished, key=lambda o: (-improvement(o.score, best, metric), o.trial.index))  # type: ignore[arg-type]


def winner(outcomes: Sequence[TrialOutcome]) -> TrialOutcome | None:
    """The best finished trial that the gate let through (beats the base, floors, champion); None if none did."""
    return next((o for o in rank(outcomes) if o.decision and o.decision.get("promote")), None)


__all__ = ["TrialOutcome", "higher_is_better", "primary_metric_of", "rank", "winner"]
