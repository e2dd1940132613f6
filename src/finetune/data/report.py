"""The data report: what a training run is about to learn from, before it starts.

Rows per split, rows dropped and why, token-length histogram, truncation,
duplicates, train/valid overlap and an estimate of padding waste, as JSON
(for machines) and Markdown (for the run directory and the Prefect UI).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from finetune.data.splits import SPLITS, Splits
from finetune.data.tokenized import TokenizedData
from finetune.fsutil import write_bytes_atomic
from finetune.layout import DATA_REPORT_JSON, DATA_REPORT_MD

HIST_BINS = 8
REPORT_MD = DATA_REPORT_MD
REPORT_JSON = DATA_REPORT_JSON
TOKEN_COLUMNS = " tokens | supervised | mean | p95 | max | truncated | zero-target |"


def build_report(splits: Splits, data: TokenizedData | None = None, batch_size: int = 8) -> dict[str, Any]:
    """The report as a JSON-ready dict; token sections need ``data`` (the tokenized splits)."""
    report: dict[str, Any] = {
        "dataset_version": splits.version(),
        "sources": splits.sources,
        "schema": splits.schema,
        "rows": splits.counts(),
        "bad_rows_skipped": splits.bad_rows,
        "problems": list(splits.problems),
        **_row_overlaps(splits),
    }
    if data is not None:
        report["tokenized_version"] = data.version
        report["templating"] = _templating_stats(data)
        report["tokens"] = {name: _token_stats(data, name) for name in SPLITS}
        report["length_histogram"] = _histogram(data)
        report["padding_waste"] = _padding_waste(data.splits["train"].lengths().tolist(), batch_size)
    return report


def _row_overlaps(splits: Splits) -> dict[str, Any]:
    """Exact duplicate rows per split, and valid/test rows (or prompts) already in train."""
    rows: dict[str, set[bytes]] = {}
    prompts: dict[str, set[bytes]] = {}
    duplicates = {}
    for name in SPLITS:
        rows[name], prompts[name], duplicates[name] = set(), set(), 0
        for line in splits.lines(name):
            key = hashlib.blake2b(line, digest_size=12).digest()
            duplicates[name] += key in rows[name]
            rows[name].add(key)
            prompts[name].add(_prompt_key(line))
    overlap = {f"{name}_rows_in_train": len(rows[name] & rows["train"]) for name in ("valid", "test")} | {
        f"{name}_prompts_in_train": len(prompts[name] & prompts["train"]) for name in ("valid", "test")
    }
    return {"duplicates": duplicates, "overlap": overlap}


def _prompt_key(line: bytes) -> bytes:
    """A chat row's conversation before its final answer (a text row counts whole)."""
    row = json.loads(line)
    prompt = row["messages"][:-1] if "messages" in row else row
    return hashlib.blake2b(json.dumps(prompt, sort_keys=True).encode(), digest_size=12).digest()


def _templating_stats(data: TokenizedData) -> dict[str, Any]:
    per_split = {name: data.stats[name] for name in SPLITS}
    return {
        "max_seq_length": data.stats.get("max_seq_length"),
        "truncated": {name: s["truncated"] for name, s in per_split.items()},
        "dropped_too_long": {name: s["dropped_too_long"] for name, s in per_split.items()},
        "zero_supervised_tokens": {name: s["zero_target"] for name, s in per_split.items()},
        "template_errors": {name: s["template_errors"] for name, s in per_split.items()},
        "bad_rows_skipped": data.stats["bad_rows"],
        "problems": data.stats["problems"],
    }


def _token_stats(data: TokenizedData, name: str) -> dict[str, Any]:
    import numpy as np

    split = data.splits[name]
    lengths = split.lengths()
    if len(lengths) == 0:
        return {"rows": 0}
    return {
        "rows": int(len(lengths)),
        "tokens": int(lengths.sum()),
        "supervised_tokens": int(split.n_targets().sum()),
        "min": int(lengths.min()),
        "mean": round(float(lengths.mean()), 1),
        "p50": int(np.percentile(lengths, 50)),
        "p95": int(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
    }


def _histogram(data: TokenizedData) -> dict[str, Any]:
    import numpy as np

    top = data.stats.get("max_seq_length") or max(
        (int(s.lengths().max()) for s in data.splits.values() if len(s)), default=1
    )
    edges = np.linspace(0, top, HIST_BINS + 1).round().astype(int)
    edges[-1] = top + 1  # the last bin includes rows of exactly max_seq_length tokens
    counts = {name: np.histogram(data.splits[name].lengths(), bins=edges)[0].tolist() for name in SPLITS}
    return {"edges": [int(e) for e in edges[:-1]] + [int(top)], "counts": counts}


def _padding_waste(lengths: list[int], batch_size: int) -> dict[str, Any]:
    """Share of computed positions that would be padding, for rows batched in file order vs sorted by length."""

    def waste(order: list[int]) -> float:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        computed = sum(max(b) * len(b) for b in batches)
        return round(1 - sum(order) / computed, 4) if computed else 0.0

    return {"batch_size": batch_size, "file_order": waste(lengths), "length_sorted": waste(sorted(lengths))}


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Data report",
        "",
        f"- dataset version: `{report['dataset_version'][:16]}`"
        + (f", tokenized version: `{report['tokenized_version'][:16]}`" if "tokenized_version" in report else ""),
        f"- schema: {report['schema']}",
        *(f"- {split} source: {source}" for split, source in sorted(report["sources"].items())),
        f"- bad rows skipped while reading: {report['bad_rows_skipped']}",
        "",
        "| split | rows | duplicates |" + (TOKEN_COLUMNS if "tokens" in report else ""),
        "|---|---|---|" + ("---|" * TOKEN_COLUMNS.count("|") if "tokens" in report else ""),
    ]
    for name in SPLITS:
        row = f"| {name} | {report['rows'][name]} | {report['duplicates'][name]} |"
        if "tokens" in report:
            t, tpl = report["tokens"][name], report["templating"]
            row += (
                f" {t.get('tokens', 0)} | {t.get('supervised_tokens', 0)} | {t.get('mean', '-')} | {t.get('p95', '-')} "
                f"| {t.get('max', '-')} | {tpl['truncated'][name] + tpl['dropped_too_long'][name]} "
                f"| {tpl['zero_supervised_tokens'][name]} |"
            )
        lines.append(row)
    overlap = report["overlap"]
    lines += [
        "",
        f"Overlap with train: valid rows {overlap['valid_rows_in_train']} (prompts {overlap['valid_prompts_in_train']}), "
        f"test rows {overlap['test_rows_in_train']} (prompts {overlap['test_prompts_in_train']}).",
    ]
    if "tokens" in report:
        lines += _markdown_tokens(report)
    problems = report["problems"] + report.get("templating", {}).get("problems", [])
    if problems:
        lines += ["", "## Bad rows (first few)", "", *(f"- {p}" for p in problems)]
    return "\n".join(lines) + "\n"


def _markdown_tokens(report: dict[str, Any]) -> list[str]:
    tpl, pad, hist = report["templating"], report["padding_waste"], report["length_histogram"]
    lines = [
        "",
        f"max_seq_length {tpl['max_seq_length']}; truncated rows kept: {sum(tpl['truncated'].values())}, "
        f"dropped as too long: {sum(tpl['dropped_too_long'].values())}, rows with no supervised token: "
        f"{sum(tpl['zero_supervised_tokens'].values())}, bad rows skipped while templating: {tpl['bad_rows_skipped']}.",
        "",
        f"Estimated padding waste at batch size {pad['batch_size']}: {pad['file_order']:.1%} in file order, "
        f"{pad['length_sorted']:.1%} with length-sorted batches.",
        "",
        "## Token lengths (train)",
        "",
        "| tokens | rows | |",
        "|---|---|---|",
    ]
    counts, edges = hist["counts"]["train"], hist["edges"]
    peak = max(counts) or 1
    for i, count in enumerate(counts):
        lines.append(f"| {edges[i]}–{edges[i + 1]} | {count} | {'█' * round(20 * count / peak)} |")
    return lines


def write_report(report: dict[str, Any], directory: Path | str) -> tuple[Path, Path]:
    """Write ``data_report.md`` and ``data_report.json`` into ``directory`` (atomically)."""
    directory = Path(directory)
    md, js = directory / REPORT_MD, directory / REPORT_JSON
    write_bytes_atomic(js, json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    write_bytes_atomic(md, report_markdown(report).encode("utf-8"))
    return md, js
