"""What people read about a run: the comparison table, example generations, the loss plot, the model card."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.evaluation.metrics import higher_is_better
from finetune.fsutil import atomic_path
from finetune.layout import PLOT_FILE

if TYPE_CHECKING:
    from rich.table import Table

    from finetune.evaluation.evaluate import EvalReport
    from finetune.export import BundleExport

VARIANT_ORDER = ("base", "champion", "candidate")
METRIC_LABELS = {
    "val_loss": "validation loss",
    "val_ppl": "validation perplexity",
    "test_loss": "test loss",
    "test_ppl": "test perplexity",
    "exact_match": "exact match",
    "correct_fact": "correct fact",
    "contains": "contains reference",
    "token_f1": "token F1",
    "regex_pass": "regex check",
    "json_valid": "valid JSON",
}


def shown_metrics(report: EvalReport) -> list[str]:
    """Metrics in a stable reading order: losses first, then generation scores."""
    names = {m for v in report.variants.values() for m in v.metrics if not m.endswith("_tokens")}
    known = [m for m in METRIC_LABELS if m in names]
    return known + sorted(names - set(known))


def ordered_variants(report: EvalReport) -> list[str]:
    return [name for name in VARIANT_ORDER if name in report.variants]


def format_value(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}"


def comparison_rows(report: EvalReport) -> list[dict[str, Any]]:
    """One row per metric with a column per variant: the shape of the table artifact and the terminal table."""
    rows = []
    for metric in shown_metrics(report):
        row: dict[str, Any] = {
            "metric": METRIC_LABELS.get(metric, metric) + (" *" if metric == report.primary_metric else ""),
            "better": "higher" if higher_is_better(metric) else "lower",
        }
        for name in ordered_variants(report):
            row[name] = format_value(report.variants[name].metrics.get(metric))
        rows.append(row)
    return rows


def format_comparison_table(report: EvalReport) -> Table:
    """A rich Table: metrics side by side for base, champion and candidate, with the gate decision."""
    from rich.table import Table

    verdict = "[green]promote[/]" if report.decision.promote else "[yellow]do not promote[/]"
    table = Table(
        title="Evaluation (* primary metric)",
        caption=f"{verdict}: {report.decision.reason}",
        caption_justify="left",
    )
    table.add_column("metric")
    table.add_column("better")
    for name in ordered_variants(report):
        table.add_column(name, justify="right", style="bold" if name == "candidate" else None)
    for row in comparison_rows(report):
        table.add_row(*(str(v) for v in row.values()))
    return table


def examples_of(report: EvalReport) -> dict[str, Any]:
    """Held-out questions, references and each variant's answers."""
    return {
        "questions": list(report.questions),
        "references": list(report.references),
        "answers": {name: list(v.answers) for name, v in report.variants.items()},
    }


def samples_markdown(report: EvalReport, limit: int = 5) -> str:
    """Markdown: the gate decision, then a few questions with each variant's answer and the reference."""
    verdict = "**promoted**" if report.decision.promote else "**not promoted**"
    lines = ["# Evaluation", "", f"Decision: {verdict}: {report.decision.reason}", ""]
    lines.append(
        f"Primary metric: `{report.primary_metric}` ({'higher' if report.higher_is_better else 'lower'} is better)"
    )
    lines.append("")
    for i, (question, reference) in enumerate(list(zip(report.questions, report.references))[:limit], 1):
        lines += [
            f"## Example {i}",
            "",
            f"**Question:** {_md_inline(question)}",
            "",
            f"**Reference:** {_md_inline(reference)}",
            "",
        ]
        lines += ["| model | answer |", "|---|---|"]
        for name in ordered_variants(report):
            answer = report.variants[name].answers[i - 1]
            lines.append(f"| {name} | {_md_cell(answer)} |")
        lines.append("")
    return "\n".join(lines)


def _md_inline(text: str) -> str:
    return " ".join(text.split()) or "_(empty)_"


def _md_cell(text: str) -> str:
    return _md_inline(text).replace("|", "\\|")


# ---------------------------------------------------------------- files


def loss_figure(history: Sequence[Mapping[str, Any]]) -> Any:
    """Train and validation loss against step from ``[{"step", "train_loss"?, "val_loss"?}, …]``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(h["step"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if not train and not val:
        raise ValueError("training history has no train_loss or val_loss entries to plot")
    fig = Figure(figsize=(7, 4.2), dpi=120)
    # An explicit Agg canvas: no GUI backend, and no process-wide matplotlib.use() switch.
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.5)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="tab:orange", linewidth=2, marker="o", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy per supervised token)")
    ax.set_title("Training and validation loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def write_loss_plot(history: Sequence[Mapping[str, Any]], out_path: Path) -> Path:
    """The loss curve as a PNG (matplotlib's Agg renderer, no display needed)."""
    fig = loss_figure(history)
    return _atomic_write(out_path, lambda f: fig.savefig(f, format="png"))


def write_model_card(out_path: Path, report: EvalReport, **card: Any) -> Path:
    """README.md for the bundle (``card``: the keyword arguments of ``model_card_markdown``)."""
    text = model_card_markdown(report, **card)
    return _atomic_write(out_path, lambda f: f.write(text.encode("utf-8")))


def model_card_markdown(
    report: EvalReport,
    *,
    base_model: str,
    data_version: str,
    hyperparameters: Mapping[str, Any],
    run_id: str,
    bundle_uri: str | None = None,
    plot_file: str | None = PLOT_FILE,
) -> str:
    where = bundle_uri or "path/to/this/bundle"
    local = "://" not in where or where.startswith("file://")
    # mlx-lm knows nothing of finetune's builtin models: point it at the built directory instead.
    builtin = base_model.startswith("builtin:")
    load_model = "path/to/" + base_model.removeprefix("builtin:") if builtin else base_model
    variants = ordered_variants(report)
    lines = [
        f"# LoRA adapter for {base_model}",
        "",
        f"Trained by finetune, run `{run_id}`.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base_model}` |",
        f"| data version | `{data_version}` |",
        f"| promotion | {'promoted' if report.decision.promote else 'not promoted'}: {_md_cell(report.decision.reason)} |",
        "",
        "## Metrics",
        "",
        f"Primary metric `{report.primary_metric}` ({'higher' if report.higher_is_better else 'lower'} is better), "
        f"generation metrics on the {report.generation_split or 'no'} split.",
        "",
        "| metric | " + " | ".join(variants) + " |",
        "|---|" + "---:|" * len(variants),
    ]
    for row in comparison_rows(report):
        lines.append(f"| {row['metric']} | " + " | ".join(row[v] for v in variants) + " |")
    if plot_file:
        lines += ["", f"![training and validation loss]({plot_file})"]
    lines += ["", "## Hyperparameters", "", "| key | value |", "|---|---|"]
    lines += [f"| {key} | `{value}` |" for key, value in sorted(_flatten(hyperparameters).items())]
    lines += [
        "",
        "## Use it",
        "",
        "With mlx-lm (the adapter is applied on the base model, no fusing needed):",
        "",
        "```python",
        "from mlx_lm import load, generate",
        *([f"# {base_model}: build it with `finetune tiny-model {load_model}`"] if builtin else []),
        *([] if local else [f"# adapter_path: a verified local copy, made with `finetune pull {where} bundle`"]),
        f'model, tokenizer = load("{load_model}", adapter_path="{where.removeprefix("file://") if local else "bundle"}")',
        'messages = [{"role": "user", "content": "Your question"}]',
        "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)",
        "print(generate(model, tokenizer, prompt, max_tokens=64))",
        "```",
        "",
        "With finetune (same chat template as training):",
        "",
        "```",
        f'finetune generate --adapter {where} "Your question"',
        "```",
        "",
    ]
    return "\n".join(lines)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _atomic_write(path: Path, write: Any) -> Path:
    """Readers never see half a file: ``write`` fills a temp file that then replaces ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


_EXPORT_USE = {
    "fused": '`mlx_lm.load("{path}")` (an mlx-lm model directory, adapter merged)',
    "gguf": "`llama-cli -m {path}/<file>.gguf`, or an Ollama Modelfile `FROM ./{path}/<file>.gguf`",
    "peft": '`PeftModel.from_pretrained(base, "{path}")`, or vLLM `--enable-lora --lora-modules name={path}`',
}


def exports_markdown(exports: Sequence[BundleExport]) -> str:
    """The model card's "Exports" section: each file with its size and sha256, each check with its figures."""
    lines = ["## Exports", "", "Each export was checked against base + adapter before it was published.", ""]
    lines += ["| export | file | size | sha256 |", "|---|---|---:|---|"]
    for e in exports:
        for name, entry in e.files.items():
            lines.append(f"| {e.format} | `{name}` | {entry.size:,} B | `{entry.sha256[:16]}…` |")
    lines += ["", "| export | check | max abs error | tolerance |", "|---|---|---:|---:|"]
    for e in exports:
        for check, figures in e.verification.items():
            error = figures.get("max_abs_logit_error", figures.get("max_abs_error"))
            lines.append(f"| {e.format} | {check} | {error:.3g} | {figures['tolerance']:g} |")
            if "requantize_max_abs_logit_error" in figures:
                extra = figures["requantize_max_abs_logit_error"]
                lines.append(f"| {e.format} | re-quantization (reported) | {extra:.3g} | |")
    lines += ["", "Use:", ""]
    lines += [f"- {e.format}: " + _EXPORT_USE[e.format].format(path=e.path) for e in exports]
    return "\n".join(lines) + "\n"


def add_exports_to_card(card_path: Path, exports: Sequence[BundleExport]) -> Path:
    """Append the Exports section to the bundle's model card (written before the exports existed)."""
    text = Path(card_path).read_text(encoding="utf-8") if Path(card_path).is_file() else ""
    text = text.split("\n## Exports\n", 1)[0].rstrip("\n") + "\n\n" + exports_markdown(exports)
    return _atomic_write(card_path, lambda f: f.write(text.encode("utf-8")))
