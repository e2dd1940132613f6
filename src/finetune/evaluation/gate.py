"""The one promotion gate: used by evaluation's decision and by the champion swap in publishing.

A candidate beats a reference when it is strictly better and its gain, in the metric's units and
direction, is at least the margin: with ``promotion_margin`` 0.25, a validation loss of 1.75 beats a
champion's 2.0 (gain exactly 0.25) and 1.76 does not. A gain equal to the margin up to float rounding
counts as equal. With no margin a tie is not a win.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from finetune.config import EvaluationConfig
from finetune.evaluation.metrics import higher_is_better, primary_score


class Decision(NamedTuple):
    promote: bool
    reason: str


def resolve_primary_metric(cfg: EvaluationConfig, generation_rows: Sequence[Mapping[str, Any]]) -> str:
    """``auto``: exact match for question→answer data, validation loss for plain text data."""
    if cfg.primary_metric != "auto":
        return cfg.primary_metric
    is_qa = bool(generation_rows) and all(
        any(m["role"] == "user" for m in row["messages"][:-1]) for row in generation_rows
    )
    return "exact_match" if is_qa else "val_loss"


def gain(candidate: float, reference: float, *, higher_is_better: bool) -> float:
    """How much better ``candidate`` is than ``reference``, positive when better, in the metric's units."""
    return candidate - reference if higher_is_better else reference - candidate


def beats(candidate: float, reference: float, *, higher_is_better: bool, margin: float = 0.0) -> bool:
    """The rule: strictly better, by at least ``margin`` (equal to the margin promotes)."""
    g = gain(candidate, reference, higher_is_better=higher_is_better)
    return g > 0 and (g >= margin or math.isclose(g, margin, rel_tol=1e-9, abs_tol=1e-12))


def improvement(candidate: float, reference: float, metric: str) -> float:
    return gain(candidate, reference, higher_is_better=higher_is_better(metric))


def decide_promotion(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    cfg: EvaluationConfig,
    *,
    metric: str,
    base: Mapping[str, float] | None = None,
) -> Decision:
    """Promote only a candidate that is finite, passes the floors, beats the base and beats the champion by the margin."""
    bad = sorted(name for name, value in candidate.items() if not math.isfinite(value))
    if bad:
        return Decision(False, f"candidate has non-finite metrics: {', '.join(bad)}")
    for name, bound in cfg.floors.items():
        if name not in candidate:
            return Decision(False, f"floor on {name} but {name} was not measured")
        if improvement(candidate[name], bound, name) < 0:
            relation = "below the floor" if higher_is_better(name) else "above the ceiling"
            return Decision(False, f"{name} {candidate[name]:.4f} is {relation} {bound:.4f}")
    score = primary_score(candidate, metric)
    if cfg.require_beat_base and base is not None:
        base_score = primary_score(base, metric)
        if not beats(score, base_score, higher_is_better=higher_is_better(metric)):
            return Decision(False, f"{metric} {score:.4f} does not beat the base model's {base_score:.4f}")
    if champion is None:
        return Decision(True, f"no champion yet; {metric} {score:.4f} passes the gate")
    champion_score = primary_score(champion, metric)
    better = improvement(score, champion_score, metric)
    if not beats(score, champion_score, higher_is_better=higher_is_better(metric), margin=cfg.promotion_margin):
        return Decision(
            False,
            f"{metric} {score:.4f} vs champion {champion_score:.4f}: "
            f"improvement {better:+.4f} is below the margin {cfg.promotion_margin:g}",
        )
    return Decision(True, f"{metric} {score:.4f} beats champion {champion_score:.4f} by {better:+.4f}")
