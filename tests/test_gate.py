"""The one promotion gate at the margin boundary: evaluation's decision and the champion swap agree."""

from __future__ import annotations

import pytest
from s3faults import make_bundle

from finetune.config import EvaluationConfig, StorageConfig
from finetune.evaluation.gate import beats, decide_promotion
from finetune.publishing import promote_if_better, publish_run, read_champion
from finetune.store import open_store

MARGIN = 0.25
# (metric, champion score, candidate at champion + margin exactly, just above, just below) in "better" terms.
CASES = {
    "exact_match": (0.5, 0.75, 0.76, 0.74),  # higher is better
    "val_loss": (2.0, 1.75, 1.74, 1.76),  # lower is better
}
BOUNDARY = [
    pytest.param(metric, champion, candidate, expected, id=f"{metric}-{where}")
    for metric, (champion, equal, above, below) in CASES.items()
    for where, candidate, expected in (("equal", equal, True), ("above", above, True), ("below", below, False))
]


@pytest.mark.parametrize(("metric", "champion", "candidate", "expected"), BOUNDARY)
def test_evaluation_gate_at_the_margin(metric, champion, candidate, expected) -> None:
    # The base is far worse, so only the champion comparison decides.
    base = {"exact_match": 0.0, "val_loss": 9.0}
    decision = decide_promotion(
        {**base, metric: candidate},
        {**base, metric: champion},
        EvaluationConfig(promotion_margin=MARGIN),
        metric=metric,
        base=base,
    )
    assert decision.promote is expected, decision.reason


@pytest.mark.parametrize(("metric", "champion", "candidate", "expected"), BOUNDARY)
def test_champion_swap_at_the_margin(tmp_path, metric, champion, candidate, expected) -> None:
    store = open_store(StorageConfig(uri=str(tmp_path / "store")))
    fields = {"evaluation": {"metric": metric, "higher_is_better": metric == "exact_match"}}
    for run in ("champ", "cand"):
        publish_run(store, run, make_bundle(tmp_path / run, weights=run.encode() * 8), fields)
    higher = metric == "exact_match"
    assert promote_if_better(store, "champ", champion, metric=metric, higher_is_better=higher).promoted
    swap = promote_if_better(store, "cand", candidate, metric=metric, higher_is_better=higher, margin=MARGIN)
    assert swap.promoted is expected, swap.reason
    assert read_champion(store)["run_id"] == ("cand" if expected else "champ")


def test_the_issue_example_promotes_in_both_places(tmp_path) -> None:
    """margin 0.25, champion 2.0, candidate 1.75: the log said "promote" and then "not promoted"."""
    assert beats(1.75, 2.0, higher_is_better=False, margin=0.25)
    assert not beats(1.75 + 1e-9, 2.0, higher_is_better=False, margin=0.25)


def test_equal_to_the_margin_within_float_rounding() -> None:
    # 0.3 - 0.1 is 0.19999999999999998 in binary floating point: still "equal to" a margin of 0.2.
    assert beats(0.3, 0.1, higher_is_better=True, margin=0.2)
    assert not beats(0.299, 0.1, higher_is_better=True, margin=0.2)


def test_without_a_margin_a_tie_is_not_a_win() -> None:
    assert not beats(2.0, 2.0, higher_is_better=False)
    assert not beats(0.5, 0.5, higher_is_better=True)
    assert beats(0.5000001, 0.5, higher_is_better=True)
    assert not beats(0.5, 0.5, higher_is_better=True, margin=0.0)
