"""Stage results: each one survives Prefect's JSON result serializer as itself, and scorecards read like the gate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prefect.serializers import JSONSerializer

from finetune.evaluation.evaluate import EvalReport, VariantEval
from finetune.evaluation.gate import Decision
from finetune.export import BundleExport, ExportedFile
from finetune.pipeline.results import (
    Champion,
    DataReport,
    DatasetVersion,
    Promotion,
    Scorecard,
    StagedBundle,
    TokenizedDataset,
)
from finetune.publishing import PublishedRun
from finetune.train.outputs import TrainResult


def report(candidate_loss: float = 1.5, champion: bool = True) -> EvalReport:
    variants = {"base": VariantEval("base", None, {"val_loss": 6.5, "exact_match": 0.0}, ["zzz"])}
    if champion:
        variants["champion"] = VariantEval("champion", "/c", {"val_loss": 2.0, "exact_match": 0.5}, ["Rome"])
    variants["candidate"] = VariantEval("candidate", "/a", {"val_loss": candidate_loss, "exact_match": 1.0}, ["Paris"])
    return EvalReport(
        primary_metric="val_loss",
        higher_is_better=False,
        generation_split="test",
        questions=["Capital of France?"],
        references=["Paris"],
        variants=variants,
        decision=Decision(math.isfinite(candidate_loss), "val_loss beats the champion"),
        data_version="tok-1",
    )


SCORECARD = Scorecard(True, "beats", "val_loss", higher_is_better=False, score=1.5, champion_score=2.0)
RECORDS = [
    DatasetVersion("d1", Path("/w/datasets/d1"), {"train": 8, "valid": 2}, bad_rows=1, problems=["line 3: no role"]),
    TokenizedDataset("t1", "d1", Path("/w/tokenized/t1/tokenized.safetensors")),
    DataReport(Path("/r/data_report.md"), Path("/r/data_report.json")),
    TrainResult(Path("/r/adapter"), 12, 6.1, 2.0, 1.9, 10, False, 4, 0, [{"step": 6, "val_loss": None, "lr": 1e-4}]),
    report(),
    Champion("run-a", Path("/w/cache/bundles/x")),
    SCORECARD,
    Promotion(False, "worse"),
    PublishedRun("run-b", "att-1", "runs/run-b/manifest.json", "s3://b/p/runs/run-b", {"files": {}}, reused=True),
    BundleExport("gguf", "exports/gguf", {"exports/gguf/m.gguf": ExportedFile(10, "ab" * 32)}, {"f16": {}}, 1.5),
    StagedBundle(Path("/w/cache/bundles/y"), {"metrics": {"candidate": {"val_loss": 1.5}}}, SCORECARD, "run-a"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_each_stage_result_survives_the_json_result_serializer(record) -> None:
    serializer = JSONSerializer()
    blob = serializer.dumps(record)
    assert f'"__class__": "{type(record).__module__}.{type(record).__qualname__}"'.encode() in blob
    back = serializer.loads(blob)
    assert type(back) is type(record) and back == record


def test_a_report_with_a_non_finite_metric_round_trips_with_nan() -> None:
    back = JSONSerializer().loads(JSONSerializer().dumps(report(math.nan)))
    assert isinstance(back, EvalReport) and math.isnan(back.candidate.metrics["val_loss"])
    assert isinstance(back.decision, Decision) and not back.decision.promote


def test_scorecard_of_a_report_holds_the_gate_and_both_scores() -> None:
    assert Scorecard.of_report(report()) == Scorecard(
        True, "val_loss beats the champion", "val_loss", higher_is_better=False, score=1.5, champion_score=2.0
    )
    first = Scorecard.of_report(report(champion=False))
    assert first.champion_score is None and first.score == 1.5
    assert Scorecard.of_report(report(math.nan)).score is None  # never a NaN into the champion pointer


def test_scorecard_of_a_manifest_reads_what_publishing_recorded() -> None:
    manifest = {
        "decision": {"promote": True, "reason": "beats"},
        "evaluation": {"metric": "exact_match", "higher_is_better": True, "champion_run_id": "run-a"},
        "metrics": {"candidate": {"exact_match": 0.75}, "champion": {"exact_match": None}},
    }
    assert Scorecard.of_manifest(manifest) == Scorecard(True, "beats", "exact_match", True, 0.75, None)
    unknown = Scorecard.of_manifest({"run_id": "old"})
    assert not unknown.promote and unknown.reason == "the manifest records no decision" and unknown.score is None


def test_a_sweep_trial_leaves_promotion_to_its_sweep() -> None:
    assert Promotion.left_to_sweep("s1") == Promotion(False, "trial of sweep s1: the sweep promotes its winner")
