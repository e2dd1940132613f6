"""Evaluate an adapter against the base model and the champion, on identical inputs.

The adapter is applied on the base with mlx-lm (never fused), prompts are built
with the same templating code as training, and generation is greedy and batched
(mlx-lm's ``batch_generate``), decoded with the same streaming detokenizer as
``mlx_lm.generate`` so that a batched answer equals a one-at-a-time answer.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import re
import string
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from finetune.config import EvaluationConfig, Settings, TemplateConfig
from finetune.report import higher_is_better, primary_score
from finetune.templating import Encoded, encode_prompt

ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
# Loss is measured on these splits (train is skipped: it says nothing about generalisation and is the
# largest); "valid" reads as the familiar val_loss.
LOSS_SPLITS = {"valid": "val", "test": "test"}
GENERATION_SPLITS = ("test", "valid")


class EvaluationError(ValueError):
    """An evaluation input problem, phrased for the user (names the file or config key)."""


# ---------------------------------------------------------------- loading


def load_for_eval(
    model_path: str,
    adapter_dir: Path | str | None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from mlx-lm, with the adapter applied on the base (no fuse), in eval mode."""
    import mlx_lm

    if adapter_dir is not None:
        check_adapter_dir(Path(adapter_dir))
    model, tokenizer = mlx_lm.load(
        model_path,
        adapter_path=str(adapter_dir) if adapter_dir is not None else None,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    model.eval()
    return model, tokenizer


def check_adapter_dir(adapter_dir: Path) -> None:
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise EvaluationError(f"adapter {adapter_dir}: missing {', '.join(missing)}")
    try:
        json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"adapter {adapter_dir / 'adapter_config.json'}: not valid JSON ({exc})") from None


# ---------------------------------------------------------------- loss


def evaluate_loss(model: Any, examples: Sequence[Encoded], batch_size: int = 8) -> dict[str, float]:
    """Cross-entropy averaged over supervised tokens, and its perplexity.

    Examples are length-sorted and right-padded; a causal model never sees the
    padding of an earlier position, and padding is never a target.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    usable = [e for e in examples if len(e.input_ids) > 1 and any(e.loss_mask[1:])]
    if not usable:
        raise EvaluationError(
            f"no supervised tokens to evaluate in {len(examples)} examples "
            "(empty split, or every answer cut off by template.max_seq_length)"
        )
    usable.sort(key=lambda e: len(e.input_ids))
    was_training = model.training
    model.eval()
    total, n_tokens = mx.array(0.0, dtype=mx.float32), mx.array(0, dtype=mx.int32)
    try:
        for start in range(0, len(usable), batch_size):
            chunk = usable[start : start + batch_size]
            width = max(len(e.input_ids) for e in chunk)
            ids = np.zeros((len(chunk), width), np.int32)
            mask = np.zeros((len(chunk), width), np.float32)
            for row, e in enumerate(chunk):
                ids[row, : len(e.input_ids)] = e.input_ids
                mask[row, : len(e.loss_mask)] = e.loss_mask
            ids_mx, mask_mx = mx.array(ids), mx.array(mask[:, 1:])
            logits = model(ids_mx[:, :-1]).astype(mx.float32)
            ce = nn.losses.cross_entropy(logits, ids_mx[:, 1:], reduction="none")
            total = total + (ce * mask_mx).sum()
            n_tokens = n_tokens + mask_mx.sum().astype(mx.int32)
            mx.eval(total, n_tokens)
    finally:
        model.train(was_training)
    loss = total.item() / n_tokens.item()
    return {
        "loss": loss,
        "perplexity": _exp(loss),
        "n_tokens": int(n_tokens.item()),
        "n_examples": len(usable),
    }


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# ---------------------------------------------------------------- generation


def split_prompt_reference(row: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """A canonical chat row as (conversation before the final answer, the final answer)."""
    messages = row["messages"]
    return list(messages[:-1]), messages[-1]["content"]


def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[dict[str, Any]]],
    template: TemplateConfig,
    max_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers to each conversation, generated in batches."""
    prompts = [encode_prompt(tokenizer, conv, template) for conv in conversations]
    return generate_from_tokens(model, tokenizer, prompts, max_tokens, batch_size)


def generate_from_tokens(
    model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_tokens: int, batch_size: int = 32
) -> list[str]:
    from mlx_lm.generate import batch_generate

    if not prompts:
        return []
    response = batch_generate(
        model,
        tokenizer,
        [list(p) for p in prompts],
        max_tokens=max_tokens,
        completion_batch_size=batch_size,
        prefill_batch_size=min(8, batch_size),
        return_token_ids=True,
    )
    return [detokenize(tokenizer, ids) for ids in response.token_ids]


def detokenize(tokenizer: Any, token_ids: Iterable[int]) -> str:
    """Text exactly as ``mlx_lm.generate`` assembles it (its detokenizer trims a leading space)."""
    detokenizer = tokenizer.detokenizer
    for token in token_ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


def generate_one(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    template: TemplateConfig,
    max_tokens: int,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """One greedy answer via ``mlx_lm.stream_generate``; ``on_text`` receives each new piece (for streaming)."""
    from mlx_lm.generate import stream_generate

    prompt = encode_prompt(tokenizer, messages, template)
    pieces = []
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        pieces.append(response.text)
        if on_text is not None and response.text:
            on_text(response.text)
    return "".join(pieces)


# ---------------------------------------------------------------- metrics


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


def load_json_schema(value: Mapping[str, Any] | Path) -> dict[str, Any]:
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    where = "evaluation.json_schema"
    if isinstance(value, Path):
        where = f"evaluation.json_schema file {value}"
        try:
            value = json.loads(value.read_text(encoding="utf-8"))
        except OSError as exc:
            raise EvaluationError(f"{where}: cannot read ({exc.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EvaluationError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise EvaluationError(f"{where}: a JSON schema must be an object")
    try:
        validator_for(value).check_schema(value)
    except SchemaError as exc:
        raise EvaluationError(f"{where}: not a valid JSON schema ({exc.message})") from None
    return dict(value)


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
    if cfg.answer_regex is not None:
        pattern = re.compile(cfg.answer_regex)
        metrics["regex_pass"] = sum(regex_pass(a, pattern) for a in answers) / n
    validator = json_schema_validator(cfg)
    if validator is not None:
        metrics["json_valid"] = sum(json_valid(a, validator) for a in answers) / n
    return metrics


# ---------------------------------------------------------------- comparison and gate


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


def improvement(candidate: float, reference: float, metric: str) -> float:
    """How much better ``candidate`` is than ``reference``, positive when better, in the metric's units."""
    return candidate - reference if higher_is_better(metric) else reference - candidate


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
        if improvement(score, base_score, metric) <= 0:
            return Decision(False, f"{metric} {score:.4f} does not beat the base model's {base_score:.4f}")
    if champion is None:
        return Decision(True, f"no champion yet; {metric} {score:.4f} passes the gate")
    champion_score = primary_score(champion, metric)
    gain = improvement(score, champion_score, metric)
    if gain <= 0 or gain < cfg.promotion_margin:
        return Decision(
            False,
            f"{metric} {score:.4f} vs champion {champion_score:.4f}: "
            f"improvement {gain:+.4f} is not above the margin {cfg.promotion_margin:g}",
        )
    return Decision(True, f"{metric} {score:.4f} beats champion {champion_score:.4f} by {gain:+.4f}")


@dataclass
class VariantEval:
    """One model variant (base, champion or candidate) evaluated on the shared inputs."""

    name: str
    adapter: str | None
    metrics: dict[str, float]
    answers: list[str]
    inputs_sha256: str


@dataclass
class EvalReport:
    primary_metric: str
    higher_is_better: bool
    generation_split: str | None
    questions: list[str]
    references: list[str]
    variants: dict[str, VariantEval]
    decision: Decision
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def candidate(self) -> VariantEval:
        return self.variants["candidate"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: metrics per variant, the gate decision and the example generations."""
        return {
            "primary_metric": self.primary_metric,
            "higher_is_better": self.higher_is_better,
            "generation_split": self.generation_split,
            "decision": self.decision._asdict(),
            "metrics": {name: _finite_or_none(v.metrics) for name, v in self.variants.items()},
            "variants": {name: {**asdict(v), "metrics": _finite_or_none(v.metrics)} for name, v in self.variants.items()},
            "questions": self.questions,
            "references": self.references,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        """Inverse of ``to_dict`` (non-finite metrics, stored as null, come back as NaN)."""
        known = {"primary_metric", "higher_is_better", "generation_split", "decision", "metrics", "variants", "questions", "references"}
        variants = {
            name: VariantEval(**{**v, "metrics": {k: math.nan if x is None else x for k, x in v["metrics"].items()}})
            for name, v in data["variants"].items()
        }
        return cls(
            primary_metric=data["primary_metric"],
            higher_is_better=data["higher_is_better"],
            generation_split=data["generation_split"],
            questions=list(data["questions"]),
            references=list(data["references"]),
            variants=variants,
            decision=Decision(**data["decision"]),
            extra={k: v for k, v in data.items() if k not in known},
        )


def _finite_or_none(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """Strict JSON has no NaN or Infinity; the decision's reason names any non-finite metric."""
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def _fingerprint(data: Mapping[str, Sequence[Encoded]], prompts: Sequence[list[int]]) -> str:
    h = hashlib.sha256()
    for split in LOSS_SPLITS:
        for e in data.get(split, ()):
            h.update(f"{split}:{e.input_ids}:{e.loss_mask}\n".encode())
    for p in prompts:
        h.update(f"prompt:{p}\n".encode())
    return h.hexdigest()


def evaluate_variant(
    name: str,
    model: Any,
    tokenizer: Any,
    data: Mapping[str, Sequence[Encoded]],
    prompts: Sequence[list[int]],
    references: Sequence[str],
    cfg: EvaluationConfig,
    adapter: str | None = None,
) -> VariantEval:
    """Loss per split and generation metrics for one loaded model; the inputs' hash is recorded."""
    metrics: dict[str, float] = {}
    for split, prefix in LOSS_SPLITS.items():
        examples = data.get(split)
        if not examples:
            continue
        result = evaluate_loss(model, examples, cfg.batch_size)
        metrics[f"{prefix}_loss"] = result["loss"]
        metrics[f"{prefix}_ppl"] = result["perplexity"]
        metrics[f"{prefix}_tokens"] = float(result["n_tokens"])
    answers = generate_from_tokens(model, tokenizer, prompts, cfg.max_tokens, cfg.generation_batch_size)
    metrics.update(answer_metrics(answers, references, cfg))
    return VariantEval(name, adapter, metrics, answers, _fingerprint(data, prompts))


def evaluate_candidate(
    model_path: str,
    adapter_dir: Path | str,
    data: Mapping[str, Sequence[Encoded]],
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    settings: Settings,
    champion_dir: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate base, champion (when given) and candidate on identical inputs, and decide promotion.

    ``data`` maps split names to encoded examples; loss is measured on "valid" (val_loss) and "test";
    ``rows`` maps split names to chat rows; generation uses the first non-empty of
    test, valid (capped at evaluation.max_examples).
    """
    cfg = settings.evaluation
    split = next((s for s in GENERATION_SPLITS if rows.get(s)), None)
    gen_rows = list(rows[split])[: cfg.max_examples] if split else []
    metric = resolve_primary_metric(cfg, gen_rows)
    pairs = [split_prompt_reference(row) for row in gen_rows]
    variants_to_run: list[tuple[str, Path | str | None]] = [("base", None)]
    if champion_dir is not None:
        variants_to_run.append(("champion", champion_dir))
    variants_to_run.append(("candidate", adapter_dir))
    for _, path in variants_to_run:
        if path is not None:
            check_adapter_dir(Path(path))

    prompts: list[list[int]] | None = None
    variants: dict[str, VariantEval] = {}
    for name, path in variants_to_run:
        if progress is not None:
            progress(f"evaluating {name}")
        model, tokenizer = load_for_eval(
            model_path, path, trust_remote_code=settings.model.trust_remote_code, revision=settings.model.revision
        )
        if prompts is None:
            # Built once from the base's tokenizer so every variant sees the very same token ids.
            prompts = [encode_prompt(tokenizer, conv, settings.template) for conv, _ in pairs]
        variants[name] = evaluate_variant(
            name, model, tokenizer, data, prompts, [ref for _, ref in pairs], cfg, str(path) if path else None
        )
        # Free one variant's weights before loading the next: only one model is resident at a time.
        del model, tokenizer
        _release()
    if metric not in variants["candidate"].metrics:
        raise EvaluationError(
            f"evaluation.primary_metric {metric!r} was not measured "
            f"(measured: {', '.join(sorted(variants['candidate'].metrics))})"
        )
    decision = decide_promotion(
        variants["candidate"].metrics,
        variants["champion"].metrics if "champion" in variants else None,
        cfg,
        metric=metric,
        base=variants["base"].metrics,
    )
    return EvalReport(
        primary_metric=metric,
        higher_is_better=higher_is_better(metric),
        generation_split=split,
        questions=[_last_user_message(conv) for conv, _ in pairs],
        references=[ref for _, ref in pairs],
        variants=variants,
        decision=decision,
    )


def _last_user_message(conversation: Sequence[Mapping[str, Any]]) -> str:
    return next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")


def _release() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
