"""Reports people read: the loss plot, the model card, the comparison table and the samples markdown."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from matplotlib.image import imread
from rich.console import Console

from finetune.evaluation.evaluate import EvalReport, VariantEval
from finetune.evaluation.gate import Decision
from finetune.evaluation.report import (
    comparison_rows,
    format_comparison_table,
    loss_figure,
    model_card_markdown,
    samples_markdown,
    write_loss_plot,
    write_model_card,
)


def make_report(promote: bool = True, champion: bool = True) -> EvalReport:
    def variant(name: str, loss: float, em: float, answers: list[str]) -> VariantEval:
        metrics = {"val_loss": loss, "val_ppl": math.exp(loss), "val_tokens": 354.0, "exact_match": em, "token_f1": em}
        return VariantEval(name, None if name == "base" else f"/runs/{name}", metrics, answers)

    variants = {"base": variant("base", 6.5, 0.0, ["zzz", "qq | x"])}
    if champion:
        variants["champion"] = variant("champion", 2.0, 0.5, ["Paris", "Rome?"])
    variants["candidate"] = variant("candidate", 1.5 if promote else 2.5, 1.0, ["Paris.", "Madrid"])
    return EvalReport(
        primary_metric="val_loss",
        higher_is_better=False,
        generation_split="test",
        questions=["Capital of France?", "Capital of Spain?"],
        references=["Paris", "Madrid"],
        variants=variants,
        decision=Decision(promote, "val_loss 1.5000 beats champion 2.0000 by +0.5000" if promote else "worse"),
    )


HISTORY = [{"step": s, "train_loss": 6.0 - s / 50} for s in range(1, 101)] + [
    {"step": s, "val_loss": 6.2 - s / 60} for s in (0, 50, 100)
]


def test_loss_figure_has_labelled_axes_and_both_curves() -> None:
    fig = loss_figure(HISTORY)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "step" and "loss" in ax.get_ylabel()
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"train loss", "validation loss"}
    assert list(lines["validation loss"].get_xdata()) == [0, 50, 100]
    assert list(lines["train loss"].get_ydata())[:2] == [6.0 - 1 / 50, 6.0 - 2 / 50]


def test_loss_plot_is_a_png(tmp_path: Path) -> None:
    path = write_loss_plot(HISTORY, tmp_path / "plots" / "loss_curve.png")
    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp file left behind"


def test_loss_plot_with_only_train_loss_and_without_losses(tmp_path: Path) -> None:
    fig = loss_figure([{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.0, "val_loss": None}])
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["train loss"]
    with pytest.raises(ValueError, match="no train_loss or val_loss"):
        write_loss_plot([{"step": 1}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_comparison_rows_are_side_by_side_in_reading_order() -> None:
    rows = comparison_rows(make_report())
    assert [r["metric"] for r in rows] == ["validation loss *", "validation perplexity", "exact match", "token F1"]
    assert rows[0] == {
        "metric": "validation loss *",
        "better": "lower",
        "base": "6.5000",
        "champion": "2.0000",
        "candidate": "1.5000",
    }
    assert list(rows[0]) == ["metric", "better", "base", "champion", "candidate"]


def test_non_finite_values_are_shown_not_hidden() -> None:
    report = make_report()
    report.variants["candidate"].metrics["val_loss"] = math.nan
    assert comparison_rows(report)[0]["candidate"] == "NaN"
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["metrics"]["candidate"]["val_loss"] is None


def test_terminal_table_shows_every_variant_and_the_decision() -> None:
    console = Console(record=True, width=120)
    console.print(format_comparison_table(make_report(promote=False)))
    text = console.export_text()
    for word in ("base", "champion", "candidate", "validation loss *", "6.5000", "2.5000", "do not promote: worse"):
        assert word in text


def test_samples_markdown_pairs_answers_with_references() -> None:
    text = samples_markdown(make_report(), limit=1)
    assert "Decision: **promoted**" in text
    assert "**Question:** Capital of France?" in text and "**Reference:** Paris" in text
    assert "| candidate | Paris. |" in text and "| champion | Paris |" in text
    assert "Spain" not in text  # limited to one example
    assert "qq \\| x" in samples_markdown(make_report(), limit=2)  # pipes escaped inside table cells


def test_model_card(tmp_path: Path) -> None:
    hyper = {"lora": {"rank": 8, "scale": 20.0}, "training": {"iters": 200}}
    path = write_model_card(
        tmp_path / "README.md",
        make_report(champion=False),
        base_model="mlx-community/Qwen2.5-0.5B-Instruct-4bit",
        data_version="abc123",
        hyperparameters=hyper,
        run_id="run-7",
        bundle_uri="s3://bucket/runs/run-7",
    )
    card = path.read_text()
    assert card.startswith("# LoRA adapter for mlx-community/Qwen2.5-0.5B-Instruct-4bit")
    for expected in (
        "| data version | `abc123` |",
        "| lora.rank | `8` |",
        "| training.iters | `200` |",
        "| validation loss * | 6.5000 | 1.5000 |",
        "![training and validation loss](loss_curve.png)",
        "# adapter_path: a verified local copy, made with `finetune pull s3://bucket/runs/run-7 bundle`",
        'load("mlx-community/Qwen2.5-0.5B-Instruct-4bit", adapter_path="bundle")',
        'finetune generate --adapter s3://bucket/runs/run-7 "Your question"',
        "promoted",
    ):
        assert expected in card, expected
    assert "| metric | base | candidate |" in card  # no champion column without a champion
    no_plot = model_card_markdown(
        make_report(),
        base_model="builtin:tiny-llama",
        data_version="d",
        hyperparameters={},
        run_id="r",
        plot_file=None,
        bundle_uri="/tmp/bundle",
    )
    assert "loss_curve.png" not in no_plot
    assert "finetune tiny-model path/to/tiny-llama" in no_plot
    assert 'load("path/to/tiny-llama", adapter_path="/tmp/bundle")' in no_plot
