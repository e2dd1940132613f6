"""Evaluation on the tiny model: loss, adapter loading, generation, and base/champion/candidate comparisons."""

from __future__ import annotations

import base64
import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import pytest
from conftest import write_tokenized
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from finetune.config import Settings, load_settings
from finetune.data import load_splits
from finetune.data.templating import Encoded, encode_chat, encode_prompt
from finetune.errors import EvaluationError
from finetune.evaluation.evaluate import EvalReport, evaluate_candidate, evaluate_loss
from finetune.evaluation.generate import generate_answers, generate_one, load_for_eval, split_prompt_reference

LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}
N_LAYERS = 4


# ---------------------------------------------------------------- fixtures: adapters in mlx-lm format


def _save_adapter(model: nn.Module, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": N_LAYERS, "lora_parameters": LORA}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _lora_model(model_dir: Path, seed: int) -> tuple[nn.Module, object]:
    model, tokenizer = mlx_lm.load(str(model_dir))
    model.freeze()
    mx.random.seed(seed)
    linear_to_lora_layers(model, N_LAYERS, LORA)
    return model, tokenizer


def _masked_loss(model: nn.Module, ids: mx.array, mask: mx.array) -> mx.array:
    ce = nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:], reduction="none") * mask[:, 1:]
    return ce.sum() / mask[:, 1:].sum()


def train_adapter(model_dir: Path, out: Path, examples: list[Encoded], steps: int = 15, batch: int = 8) -> Path:
    """A few Adam steps of LoRA on the demo answers: enough to lower the loss clearly."""
    model, _ = _lora_model(model_dir, seed=0)
    optimizer = optim.Adam(learning_rate=3e-3)
    loss_and_grad = nn.value_and_grad(model, _masked_loss)
    for step in range(steps):
        chunk = [examples[(step * batch + i) % len(examples)] for i in range(batch)]
        width = max(len(e.input_ids) for e in chunk)
        ids, mask = np.zeros((batch, width), np.int32), np.zeros((batch, width), np.float32)
        for row, e in enumerate(chunk):
            ids[row, : len(e.input_ids)], mask[row, : len(e.loss_mask)] = e.input_ids, e.loss_mask
        _, grads = loss_and_grad(model, mx.array(ids), mx.array(mask))
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    return _save_adapter(model, out)


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(
        None, ["evaluation.max_examples=8", "evaluation.max_tokens=8", "evaluation.primary_metric=val_loss"]
    )


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return mlx_lm.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def splits(settings: Settings):
    return load_splits(settings.dataset)


@pytest.fixture(scope="module")
def encoded(loaded, splits, settings: Settings) -> dict[str, list[Encoded]]:
    tokenizer = loaded[1]
    return {
        name: [encode_chat(tokenizer, row["messages"], settings.template) for row in getattr(splits, name)]
        for name in ("train", "valid", "test")
    }


@pytest.fixture(scope="module")
def good_adapter(tiny_model_dir: Path, encoded, tmp_path_factory) -> Path:
    return train_adapter(tiny_model_dir, tmp_path_factory.mktemp("good"), encoded["train"])


@pytest.fixture(scope="module")
def bad_adapter(good_adapter: Path, tmp_path_factory) -> Path:
    """The good adapter with its LoRA update reversed (B negated): it pushes the base the wrong way.

    (Random LoRA noise is no good here: it moves the random base towards uniform logits, lowering its loss.)
    """
    out = tmp_path_factory.mktemp("bad")
    weights = mx.load(str(good_adapter / "adapters.safetensors"))
    flipped = {k: -v if k.endswith("lora_b") else v for k, v in weights.items()}
    mx.save_safetensors(str(out / "adapters.safetensors"), flipped)
    shutil.copy(good_adapter / "adapter_config.json", out / "adapter_config.json")
    return out


# ---------------------------------------------------------------- loss


def _reference_loss(model: nn.Module, example: Encoded) -> tuple[float, int]:
    """Sum of -log p(target) over supervised tokens, one token position at a time, in numpy."""
    logits = np.array(model(mx.array([example.input_ids]))[0].astype(mx.float32))
    total, count = 0.0, 0
    for i in range(1, len(example.input_ids)):
        if example.loss_mask[i]:
            row = logits[i - 1].astype(np.float64)
            log_z = np.log(np.exp(row - row.max()).sum()) + row.max()
            total += log_z - row[example.input_ids[i]]
            count += 1
    return total, count


def test_loss_counts_only_supervised_tokens_and_ignores_padding(loaded, encoded) -> None:
    model = loaded[0]
    examples = encoded["valid"][:10]
    sums = [_reference_loss(model, e) for e in examples]
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    batched = evaluate_loss(model, examples, batch_size=4)
    assert batched["n_tokens"] == sum(n for _, n in sums) == sum(sum(e.loss_mask[1:]) for e in examples)
    assert batched["loss"] == pytest.approx(expected, rel=1e-5)
    assert batched["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert evaluate_loss(model, examples, batch_size=1)["loss"] == pytest.approx(batched["loss"], rel=1e-5)


def test_loss_rejects_examples_without_targets(loaded) -> None:
    with pytest.raises(EvaluationError, match="no supervised tokens"):
        evaluate_loss(loaded[0], [Encoded([1, 2, 3], [0, 0, 0]), Encoded([4], [1])], batch_size=2)


def test_loss_leaves_training_mode_as_it_was(loaded, encoded) -> None:
    model = loaded[0]
    model.train()
    evaluate_loss(model, encoded["valid"][:2], 2)
    assert model.training
    model.eval()
    evaluate_loss(model, encoded["valid"][:2], 2)
    assert not model.training


# ---------------------------------------------------------------- loading and generation


def test_adapter_is_applied_on_the_base_and_lowers_loss(tiny_model_dir, good_adapter, loaded, encoded) -> None:
    model, _ = load_for_eval(str(tiny_model_dir), good_adapter)
    assert any(isinstance(m, LoRALinear) for _, m in model.named_modules()), "adapter not applied as LoRA layers"
    assert not model.training
    adapted = evaluate_loss(model, encoded["valid"], 8)["loss"]
    base = evaluate_loss(loaded[0], encoded["valid"], 8)["loss"]
    assert adapted < base - 0.5


def test_missing_adapter_files_name_the_directory(tiny_model_dir, tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(EvaluationError, match=f"{tmp_path}.*adapters.safetensors"):
        load_for_eval(str(tiny_model_dir), tmp_path)


def _conversations(splits, n: int) -> list[list[dict]]:
    return [split_prompt_reference(row)[0] for row in splits.test[:n]]


@pytest.mark.parametrize("with_adapter", [False, True])
def test_generate_one_equals_mlx_lm_generate(tiny_model_dir, good_adapter, splits, settings, with_adapter) -> None:
    model, tokenizer = load_for_eval(str(tiny_model_dir), good_adapter if with_adapter else None)
    for conversation in _conversations(splits, 3):
        prompt = encode_prompt(tokenizer, conversation, settings.template)
        expected = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)
        streamed: list[str] = []
        assert generate_one(model, tokenizer, conversation, settings.template, 12, on_text=streamed.append) == expected
        assert "".join(streamed) == expected


def test_batched_generation_equals_one_at_a_time(loaded, splits, settings) -> None:
    model, tokenizer = loaded
    # Different prompt lengths in one batch exercise the padded prefill.
    conversations = _conversations(splits, 10)
    assert len({len(encode_prompt(tokenizer, c, settings.template)) for c in conversations}) > 1
    batched = generate_answers(model, tokenizer, conversations, settings.template, max_tokens=12, batch_size=4)
    single = [generate_one(model, tokenizer, c, settings.template, 12) for c in conversations]
    assert any(single), "the random base model should produce some text"
    assert batched == single


# ---------------------------------------------------------------- comparisons and the gate


def _data(encoded) -> dict[str, list[Encoded]]:
    # Subsets keep the three-variant comparisons quick on a CPU without OpenBLAS.
    return {"valid": encoded["valid"][:12], "test": encoded["test"][:12]}


def test_base_champion_candidate_see_identical_inputs(
    tiny_model_dir, good_adapter, bad_adapter, encoded, splits, settings
):
    rows = {"test": splits.test}
    report = evaluate_candidate(
        str(tiny_model_dir), good_adapter, _data(encoded), rows, settings, champion_dir=bad_adapter, data_version="v1"
    )
    assert list(report.variants) == ["base", "champion", "candidate"]
    assert report.data_version == "v1" and report.to_dict()["data_version"] == "v1"
    assert report.generation_split == "test" and len(report.questions) == settings.evaluation.max_examples

    # Each variant's numbers equal an independent evaluation of that model on the same examples.
    conversations = _conversations(splits, settings.evaluation.max_examples)
    for name, adapter in [("base", None), ("champion", bad_adapter), ("candidate", good_adapter)]:
        model, tokenizer = load_for_eval(str(tiny_model_dir), adapter)
        metrics = report.variants[name].metrics
        for split, prefix in (("valid", "val"), ("test", "test")):
            expected = evaluate_loss(model, _data(encoded)[split], 8)["loss"]
            assert metrics[f"{prefix}_loss"] == pytest.approx(expected, rel=1e-5)
        answers = generate_answers(model, tokenizer, conversations, settings.template, settings.evaluation.max_tokens)
        assert report.variants[name].answers == answers

    metrics = {name: v.metrics["val_loss"] for name, v in report.variants.items()}
    assert metrics["candidate"] < metrics["base"] < metrics["champion"]
    assert report.decision.promote, report.decision.reason
    stored = json.loads(json.dumps(report.to_dict()))
    assert EvalReport.from_dict(stored) == report
    # A champion published before reports named their data version still loads (with its per-variant hash).
    for variant in stored["variants"].values():
        variant["inputs_sha256"] = "0" * 64
    del stored["data_version"]
    legacy = EvalReport.from_dict(stored)
    assert legacy.data_version is None and legacy.variants["candidate"] == report.variants["candidate"]


def test_a_worse_candidate_is_not_promoted(tiny_model_dir, good_adapter, bad_adapter, encoded, splits, settings):
    report = evaluate_candidate(
        str(tiny_model_dir), bad_adapter, _data(encoded), {"test": splits.test}, settings, champion_dir=good_adapter
    )
    assert not report.decision.promote
    assert "val_loss" in report.decision.reason and "base model" in report.decision.reason


def test_first_candidate_is_judged_against_the_base(tiny_model_dir, good_adapter, encoded, splits, settings):
    data = {"valid": _data(encoded)["valid"], "train": encoded["train"][:4]}
    report = evaluate_candidate(str(tiny_model_dir), good_adapter, data, {"valid": splits.valid}, settings)
    assert list(report.variants) == ["base", "candidate"]
    assert "val_loss" in report.candidate.metrics and not any(m.startswith("train") for m in report.candidate.metrics)
    assert report.generation_split == "valid"
    assert report.decision.promote and "no champion" in report.decision.reason


# ---------------------------------------------------------------- Prefect: the evaluate stage's artifacts


def test_evaluate_stage_publishes_artifacts(
    prefect_api, tiny_model_dir, good_adapter, bad_adapter, encoded, splits, settings, tmp_path
):
    from prefect import flow
    from prefect.artifacts import Artifact
    from prefect.context import get_run_context

    from finetune.config import StorageConfig
    from tasks.artifacts import MISSING, artifact_key
    from tasks.evaluate import (
        BUNDLE_KEY,
        METRICS_KEY,
        PLOT_KEY,
        SAMPLES_KEY,
        evaluate_adapter,
        link_bundle,
        write_reports,
    )

    history = [{"step": 5, "train_loss": 6.0}, {"step": 10, "train_loss": 5.5, "val_loss": 5.6}]
    tokenized = write_tokenized(tmp_path / "tokens.safetensors", encoded)

    @flow
    def evaluate_stage() -> tuple[EvalReport, list[str], str]:
        report = evaluate_adapter(
            str(tiny_model_dir),
            str(good_adapter),
            str(tokenized),
            str(splits.directory),
            settings,
            run_id="run-7",
            champion_dir=str(bad_adapter),
        )
        paths = write_reports(
            report,
            history,
            str(tmp_path),
            base_model="builtin:tiny-llama",
            data_version="v1",
            hyperparameters={"lora": LORA},
            run_id="run-7",
        )
        store = tmp_path / "store"
        link_bundle(StorageConfig(uri=str(store)), f"{store}/runs/run-7", "run-7", report.decision.promote)
        return report, paths, str(get_run_context().flow_run.id)

    report, paths, flow_run_id = evaluate_stage()
    assert isinstance(report, EvalReport) and report.decision.promote
    assert report.data_version == "test"  # the tokenized file's version, not a re-hash of its rows
    assert sorted(Path(p).name for p in paths) == ["README.md", "loss_curve.png"]

    # Outside a deployment the keys say so; a deployment's name prefixes its own.
    assert artifact_key(METRICS_KEY) == "local-evaluation-metrics"
    table = Artifact.get(artifact_key(METRICS_KEY))
    assert table.type == "table" and str(table.flow_run_id) == flow_run_id
    assert "run-7" in table.description and "promoted" in table.description
    rows = {row["metric"]: row for row in json.loads(table.data)}
    loss_row = rows["validation loss *"]
    for name in ("base", "champion", "candidate"):
        assert loss_row[name] == f"{report.variants[name].metrics['val_loss']:.4f}"

    samples = Artifact.get(artifact_key(SAMPLES_KEY))
    assert samples.type == "markdown" and str(samples.flow_run_id) == flow_run_id
    assert report.decision.reason in samples.data
    for question, reference in list(zip(report.questions, report.references))[:5]:
        assert f"**Question:** {question}" in samples.data and f"**Reference:** {reference}" in samples.data

    assert all(MISSING not in row.values() or row["metric"] for row in rows.values())
    link = Artifact.get(artifact_key(BUNDLE_KEY))
    # A local store is no URL a browser opens: its path as text, not a broken link.
    assert link.type == "markdown" and f"`{tmp_path}/store/runs/run-7`" in link.data and "](" not in link.data
    assert "promoted to champion" in link.description
    plot = Artifact.get(artifact_key(PLOT_KEY))
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert plot.type == "markdown" and f"(data:image/png;base64,{base64.b64encode(png).decode()})" in plot.data
