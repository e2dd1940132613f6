"""Evaluate an adapter against the base model and the champion, on identical inputs.

The adapter is applied on the base with mlx-lm (never fused), prompts are built
with the same templating code as training, and generation is greedy and batched
(mlx-lm's ``batch_generate``), decoded with the same streaming detokenizer as
``mlx_lm.generate`` so that a batched answer equals a one-at-a-time answer.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import EvaluationConfig, Settings
from finetune.data.templating import Encoded, encode_prompt
from finetune.errors import EvaluationError
from finetune.evaluation.gate import Decision, decide_promotion, resolve_primary_metric
from finetune.evaluation.generate import check_adapter_dir, generate_from_tokens, load_for_eval, split_prompt_reference
from finetune.evaluation.metrics import answer_metrics, higher_is_better

# Loss is measured on these splits (train is skipped: it says nothing about generalisation and is the
# largest); "valid" reads as the familiar val_loss.
LOSS_SPLITS = {"valid": "val", "test": "test"}
GENERATION_SPLITS = ("test", "valid")


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


@dataclass
class VariantEval:
    """One model variant (base, champion or candidate) evaluated on the shared inputs."""

    name: str
    adapter: str | None
    metrics: dict[str, float]
    answers: list[str]


@dataclass
class EvalReport:
    primary_metric: str
    higher_is_better: bool
    generation_split: str | None
    questions: list[str]
    references: list[str]
    variants: dict[str, VariantEval]
    decision: Decision
    data_version: str | None = None  # the tokenized dataset's version: it names rows, template and tokenizer
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
            "variants": {
                name: {**asdict(v), "metrics": _finite_or_none(v.metrics)} for name, v in self.variants.items()
            },
            "questions": self.questions,
            "references": self.references,
            "data_version": self.data_version,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        """Inverse of ``to_dict`` (non-finite metrics, stored as null, come back as NaN)."""
        known = {
            "primary_metric",
            "higher_is_better",
            "generation_split",
            "decision",
            "metrics",
            "variants",
            "questions",
            "references",
            "data_version",
        }
        fields = {"name", "adapter", "answers"}  # reports of older bundles also carry a per-variant inputs hash
        variants = {
            name: VariantEval(
                **{k: x for k, x in v.items() if k in fields},
                metrics={k: math.nan if x is None else x for k, x in v["metrics"].items()},
            )
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
            data_version=data.get("data_version"),
            extra={k: v for k, v in data.items() if k not in known},
        )


def _finite_or_none(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """Strict JSON has no NaN or Infinity; the decision's reason names any non-finite metric."""
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


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
    """Loss per split and generation metrics for one loaded model."""
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
    return VariantEval(name, adapter, metrics, answers)


def evaluate_candidate(
    model_path: str,
    adapter_dir: Path | str,
    data: Mapping[str, Sequence[Encoded]],
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    settings: Settings,
    champion_dir: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
    data_version: str | None = None,
) -> EvalReport:
    """Evaluate base, champion (when given) and candidate on identical inputs, and decide promotion.

    ``data_version`` (the tokenized dataset's version) is recorded as what the variants were measured on.

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
        data_version=data_version,
    )


def _last_user_message(conversation: Sequence[Mapping[str, Any]]) -> str:
    return next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")


def _release() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
