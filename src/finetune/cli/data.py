"""``finetune data check``: fetch, validate and template a dataset and print the data report, without training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from finetune.cli.options import ConfigOption, SetOption

app = typer.Typer(help="Inspect datasets.", no_args_is_help=True, add_completion=False)


@app.callback()
def data() -> None:
    """Inspect datasets."""


@app.command("check")
def check(
    source: Annotated[
        str, typer.Argument(help="Path, file://, s3://, https:// or hf: dataset (overrides dataset.source).")
    ],
    config: ConfigOption = None,
    overrides: SetOption = None,
    keep_going: Annotated[
        bool, typer.Option("--keep-going", help="List every bad row instead of stopping at the first.")
    ] = False,
    rows_only: Annotated[
        bool, typer.Option("--rows-only", help="Validate rows only; skip templating (no tokenizer needed).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of Markdown.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write data_report.md and data_report.json to this directory.")
    ] = None,
) -> None:
    """Validate every row and print the data report; exit 1 if rows had to be skipped, 2 on an error.

    The same stages as a run, into the same work_dir caches: a run on this data reuses what the check built.
    """
    from finetune.config import ConfigError, load_settings
    from finetune.data import DataError, Splits, read_tokenized
    from finetune.data.report import build_report, report_markdown, write_report
    from finetune.data.templating import TemplateError
    from finetune.pipeline import stages
    from finetune.store import StorageError

    try:
        settings = load_settings(config, [*(overrides or []), f"dataset.source={json.dumps(source)}"])
        if keep_going:
            settings.dataset.on_bad_row = "skip"
        fetched = stages.fetch_dataset(settings.dataset, settings.storage, settings.work_dir)
        data = None
        if not rows_only:
            on_bad_row = settings.dataset.on_bad_row
            tokens, data = stages.tokenize_dataset(
                fetched.directory, stages.model_dir(settings), settings.template, on_bad_row, settings.work_dir
            )
            data = data or read_tokenized(tokens.path)
        report = build_report(Splits.open(fetched.directory), data, settings.training.batch_size)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            write_report(report, out)
    except (ConfigError, DataError, TemplateError, StorageError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report, indent=2, ensure_ascii=False) if as_json else report_markdown(report))
    skipped = report["bad_rows_skipped"] + report.get("templating", {}).get("bad_rows_skipped", 0)
    if skipped:
        raise typer.Exit(1)
