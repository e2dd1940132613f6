"""Answer metrics (SQuAD-style normalisation, exact match, correct fact, contains, token F1, regex, JSON schema) and their directions."""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from finetune.config import EvaluationConfig
from finetune.schemas import load_json_schema

LOWER_IS_BETTER_SUFFIXES = ("_loss", "_ppl")


def higher_is_better(metric: str) -> bool:
    return not metric.endswith(LOWER_IS_BETTER_SUFFIXES)


def primary_score(metrics: Mapping[str, float], metric: str) -> float:
    """The value the gate compares; a missing metric is an error naming what was measured."""
    if metric not in metrics:
        raise KeyError(f"metric {metric!r} not measured (have: {', '.join(sorted(metrics)) or 'none'})")
    return float(metrics[metric])


def normalize_answer(text: str) -> str:
    """SQuAD-style: NFKC, case-folded, punctuation and English articles removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not (ch in string.punctuation or unicodedata.category(ch).startswith("P")))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize_answer(answer) == normalize_answer(reference))


def contains_reference(answer: str, reference: str) -> float:
    """1 when the normalised reference appears in the normalised answer as whole words."""
    ref = normalize_answer(reference)
    if not ref:
        return exact_match(answer, reference)
    return float(f" {ref} " in f" {normalize_answer(answer)} ")


def key_span(reference: str, pattern: re.Pattern[str]) -> str:
    """The part of the reference that carries the fact: group 1 (or the match); the whole reference if no match."""
    found = pattern.search(reference)
    if found is None:
        return reference
    return found.group(1) if pattern.groups else found.group(0)


def correct_fact(answer: str, reference: str, pattern: re.Pattern[str]) -> float:
    """1 when the answer contains the reference's key span: knowledge, whatever the phrasing."""
    return contains_reference(answer, key_span(reference, pattern))


def token_f1(answer: str, reference: str) -> float:
    pred, ref = normalize_answer(answer).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def regex_pass(answer: str, pattern: re.Pattern[str]) -> float:
    """1 when ``pattern`` is found in the answer (anchor it with ^…$ to require a full match)."""
    return float(pattern.search(answer) is not None)


_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n(.*)\n\s*```$", re.DOTALL)


def json_valid(answer: str, validator: Any) -> float:
    """1 when the answer (optionally inside a ``` fence) parses as JSON and satisfies the schema."""
    text = answer.strip()
    fenced = _FENCE.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        return 0.0
    return float(validator.is_valid(value))


def json_schema_validator(cfg: EvaluationConfig) -> Any | None:
    """A jsonschema validator for ``evaluation.json_schema`` (inline mapping or a .json file), or None."""
    if cfg.json_schema is None:
        return None
    from jsonschema.validators import validator_for

    schema = load_json_schema(cfg.json_schema)
    return validator_for(schema)(schema)


def answer_metrics(answers: Sequence[str], references: Sequence[str], cfg: EvaluationConfig) -> dict[str, float]:
    """Generation metrics averaged over examples (each in [0, 1])."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    if not answers:
        return {}
    n = len(answers)
    pairs = list(zip(answers, references))
    metrics = {
        "exact_match": sum(exact_match(a, r) for a, r in pairs) / n,
        "contains": sum(contains_reference(a, r) for a, r in pairs) / n,
        "token_f1": sum(token_f1(a, r) for a, r in pairs) / n,
    }
    if cfg.fact_regex is not None:
        fact = re.compile(cfg.fact_regex)
        metrics["correct_fact"] = sum(correct_fact(a, r, fact) for a, r in pairs) / n
    if cfg.answer_regex is not None:
        pattern = re.compile(cfg.answer_regex)
        metrics["regex_pass"] = sum(regex_pass(a, pattern) for a in answers) / n
    validator = json_schema_validator(cfg)
    if validator is not None:
        metrics["json_valid"] = sum(json_valid(a, validator) for a in answers) / n
    return metrics
