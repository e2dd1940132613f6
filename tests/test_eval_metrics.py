"""Answer metrics, metric directions, the promotion gate and the evaluation config, on hand-made cases."""

from __future__ import annotations

import json
import math
import re

import pytest

from finetune.config import ConfigError, EvaluationConfig, load_settings
from finetune.evaluation.gate import decide_promotion, resolve_primary_metric
from finetune.evaluation.metrics import (
    answer_metrics,
    contains_reference,
    correct_fact,
    exact_match,
    higher_is_better,
    json_schema_validator,
    json_valid,
    key_span,
    normalize_answer,
    primary_score,
    regex_pass,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The capital is Paris.", "capital is paris"),
        ("  PARIS!!  ", "paris"),
        ("an apple, a pear", "apple pear"),
        ("Théâtre", "théâtre"),
        ("ﬁne", "fine"),  # NFKC folds the ligature
        ("there", "there"),  # articles only as whole words
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_and_articles() -> None:
    assert exact_match("the Paris.", "Paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert exact_match("", "Paris") == 0.0


def test_contains_reference_needs_whole_words() -> None:
    assert contains_reference("The capital of France is Paris.", "Paris") == 1.0
    assert contains_reference("It is New York City", "new york") == 1.0
    assert contains_reference("Parisian cafés", "Paris") == 0.0
    assert contains_reference("", "Paris") == 0.0
    # A reference that normalises to nothing falls back to exact match.
    assert contains_reference("the", "The") == 1.0
    assert contains_reference("the end", "The") == 0.0


def test_token_f1() -> None:
    assert token_f1("Paris", "Paris") == 1.0
    assert token_f1("Lyon", "Paris") == 0.0
    # pred {capital, paris}, ref {paris}: precision 1/2, recall 1 -> 2/3
    assert token_f1("capital Paris", "Paris") == pytest.approx(2 / 3)
    # repeated tokens count by multiplicity: overlap 1 of pred 2, ref 1
    assert token_f1("paris paris", "paris") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0
    assert token_f1("", "Paris") == 0.0


def test_regex_pass_searches_unless_anchored() -> None:
    assert regex_pass("answer: 42", re.compile(r"\d+")) == 1.0
    assert regex_pass("answer: 42", re.compile(r"^\d+$")) == 0.0
    assert regex_pass("42", re.compile(r"^\d+$")) == 1.0


def test_json_valid_with_schema_and_fences() -> None:
    cfg = EvaluationConfig(
        json_schema={"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}
    )
    validator = json_schema_validator(cfg)
    assert json_valid('{"city": "Paris"}', validator) == 1.0
    assert json_valid('```json\n{"city": "Paris"}\n```', validator) == 1.0
    assert json_valid('{"city": 3}', validator) == 0.0
    assert json_valid('{"town": "Paris"}', validator) == 0.0
    assert json_valid("{city: Paris}", validator) == 0.0
    any_json = json_schema_validator(EvaluationConfig(json_schema={}))
    assert json_valid("[1, 2]", any_json) == 1.0
    assert json_valid("not json", any_json) == 0.0


def test_json_schema_from_file(tmp_path) -> None:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"type": "array"}))
    validator = json_schema_validator(EvaluationConfig(json_schema=path))
    assert json_valid("[1]", validator) == 1.0
    assert json_valid("{}", validator) == 0.0


def test_answer_metrics_average_and_optional_checks() -> None:
    answers = ["Paris", "The capital is Rome.", "Berlin?", '{"a": 1}']
    references = ["Paris", "Rome", "Madrid", "x"]
    base = answer_metrics(answers, references, EvaluationConfig())
    assert set(base) == {"exact_match", "correct_fact", "contains", "token_f1"}
    assert base["correct_fact"] == pytest.approx(2 / 4)
    assert base["exact_match"] == pytest.approx(1 / 4)
    assert base["contains"] == pytest.approx(2 / 4)
    # per row: 1; 'capital is rome' vs 'rome': p=1/3, r=1 -> 0.5; 0; 0
    assert base["token_f1"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    checked = answer_metrics(answers, references, EvaluationConfig(answer_regex=r"^[A-Z][a-z]+$", json_schema={}))
    assert checked["regex_pass"] == pytest.approx(1 / 4)
    assert checked["json_valid"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        answer_metrics(["a", "b"], ["a"], EvaluationConfig())


@pytest.mark.parametrize(
    ("reference", "span"),
    [
        ("Amman is the capital of Jordan.", "Amman"),
        ("The capital of Algeria is Algiers.", "Algiers"),
        ("Addis Ababa.", "Addis Ababa"),
        ("Washington, D.C. is the capital of the United States.", "Washington, D.C."),
        ("A free-form reference", "A free-form reference"),
    ],
)
def test_key_span_of_the_capitals_answers(reference: str, span: str) -> None:
    assert key_span(reference, re.compile(EvaluationConfig().fact_regex)) == span


def test_correct_fact_ignores_phrasing_but_not_the_city() -> None:
    pattern = re.compile(EvaluationConfig().fact_regex)
    assert correct_fact("The capital of Jordan is Amman.", "Amman is the capital of Jordan.", pattern) == 1.0
    assert correct_fact("amman", "Amman.", pattern) == 1.0
    assert correct_fact("The capital of Jordan is Irbid.", "Amman is the capital of Jordan.", pattern) == 0.0
    assert correct_fact("Ammanford", "Amman.", pattern) == 0.0  # whole words
    custom = EvaluationConfig(fact_regex=r"answer: (\w+)")
    assert answer_metrics(["it is 42"], ["answer: 42"], custom)["correct_fact"] == 1.0
    assert "correct_fact" not in answer_metrics(["x"], ["x"], EvaluationConfig(fact_regex=None))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        EvaluationConfig(fact_regex="(")


def test_directions_and_primary_score() -> None:
    assert not higher_is_better("val_loss") and not higher_is_better("test_ppl")
    assert higher_is_better("exact_match") and higher_is_better("token_f1")
    assert primary_score({"val_loss": 1.5}, "val_loss") == 1.5
    with pytest.raises(KeyError, match="exact_match.*val_loss"):
        primary_score({"val_loss": 1.5}, "exact_match")


def test_auto_primary_metric_depends_on_data() -> None:
    qa = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    text = [{"messages": [{"role": "assistant", "content": "some text"}]}]
    cfg = EvaluationConfig()
    assert resolve_primary_metric(cfg, qa) == "exact_match"
    assert resolve_primary_metric(cfg, text) == "val_loss"
    assert resolve_primary_metric(cfg, []) == "val_loss"
    assert resolve_primary_metric(EvaluationConfig(primary_metric="token_f1"), text) == "token_f1"


# ---------------------------------------------------------------- gate

BASE = {"val_loss": 3.0, "exact_match": 0.1}
CHAMPION = {"val_loss": 2.0, "exact_match": 0.5}


def gate(candidate, champion=CHAMPION, base=BASE, metric="val_loss", **cfg):
    return decide_promotion(candidate, champion, EvaluationConfig(**cfg), metric=metric, base=base)


def test_gate_promotes_a_better_candidate_and_not_a_worse_one() -> None:
    better = gate({"val_loss": 1.5, "exact_match": 0.5})
    assert better.promote and "beats champion" in better.reason
    worse = gate({"val_loss": 2.5, "exact_match": 0.5})
    assert not worse.promote and "champion 2.0000" in worse.reason
    tie = gate({"val_loss": 2.0, "exact_match": 0.5})
    assert not tie.promote


def test_gate_direction_follows_the_metric() -> None:
    assert gate({"val_loss": 9.0, "exact_match": 0.6}, metric="exact_match").promote
    assert not gate({"val_loss": 1.0, "exact_match": 0.4}, metric="exact_match").promote


def test_gate_margin() -> None:
    assert not gate({"val_loss": 1.95, "exact_match": 0.5}, promotion_margin=0.1).promote
    assert gate({"val_loss": 1.85, "exact_match": 0.5}, promotion_margin=0.1).promote


def test_gate_rejects_non_finite_metrics() -> None:
    decision = gate({"val_loss": math.nan, "exact_match": 0.9})
    assert not decision.promote and "non-finite" in decision.reason and "val_loss" in decision.reason
    assert not gate({"val_loss": 1.0, "val_ppl": math.inf, "exact_match": 0.9}).promote


def test_gate_floors_are_direction_aware() -> None:
    candidate = {"val_loss": 1.5, "exact_match": 0.5}
    assert gate(candidate, floors={"exact_match": 0.5, "val_loss": 1.5}).promote
    low = gate(candidate, floors={"exact_match": 0.6})
    assert not low.promote and "below the floor" in low.reason
    high = gate(candidate, floors={"val_loss": 1.4})
    assert not high.promote and "above the ceiling" in high.reason
    missing = gate(candidate, floors={"token_f1": 0.1})
    assert not missing.promote and "token_f1 was not measured" in missing.reason


def test_gate_without_champion_still_needs_to_beat_base() -> None:
    first = gate({"val_loss": 2.9, "exact_match": 0.0}, champion=None)
    assert first.promote and "no champion" in first.reason
    no_gain = gate({"val_loss": 3.1, "exact_match": 0.0}, champion=None)
    assert not no_gain.promote and "base model" in no_gain.reason
    assert gate({"val_loss": 3.1, "exact_match": 0.0}, champion=None, require_beat_base=False).promote


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("evaluation.answer_regex=(unclosed", "evaluation.answer_regex.*not a valid regular expression"),
        ("evaluation.floors={exact_matc: 0.5}", "evaluation.floors.exact_matc"),
        ('evaluation.json_schema={"type": 5}', "evaluation.json_schema.*not a valid JSON schema"),
        ("evaluation.json_schema=/no/such/schema.json", "/no/such/schema.json.*cannot read"),
        ("evaluation.primary_metric=accuracy", "evaluation.primary_metric"),
    ],
)
def test_bad_evaluation_config_names_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, [override])


def test_evaluation_config_from_yaml(tmp_path) -> None:
    (tmp_path / "schema.json").write_text('{"type": "object"}')
    config = tmp_path / "c.yaml"
    config.write_text(
        "evaluation:\n  primary_metric: token_f1\n  floors: {exact_match: 0.2, val_loss: 4}\n"
        f"  answer_regex: '^\\w+'\n  json_schema: {tmp_path / 'schema.json'}\n"
    )
    cfg = load_settings(config).evaluation
    assert cfg.primary_metric == "token_f1"
    assert cfg.floors == {"exact_match": 0.2, "val_loss": 4.0}
    assert json_valid("{}", json_schema_validator(cfg)) == 1.0
