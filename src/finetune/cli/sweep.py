"""``finetune sweep -c sweep.yaml``: queue a sweep's trials on the work pool and promote the winner."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from finetune.config import parse_overrides
from finetune.errors import ConfigError


def sweep(
    config: Annotated[Path, typer.Option("--config", "-c", help="Sweep YAML: config sections plus a sweep: section.")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a base config key: section.key=value (repeatable).")
    ] = None,
    work_dir: Annotated[
        str | None, typer.Option(help="Work directory on the workers (default: the file's work_dir, else .finetune).")
    ] = None,
    deployment: Annotated[
        str, typer.Option(help="The deployment each trial runs as.")
    ] = "finetune-pipeline/sweep-trial",
    poll_seconds: Annotated[float, typer.Option(help="How often to check the trials.")] = 5.0,
    dry_run: Annotated[bool, typer.Option(help="Print the trials and their run ids; queue nothing.")] = False,
) -> None:
    """Run a hyperparameter sweep on the work pool: one resumable trial per Mac, one winner promoted."""
    from finetune.sweep.space import build_sweep, sweep_mapping

    data = sweep_mapping(config, parse_overrides(overrides or []))
    swept = build_sweep(data, f"sweep file {config}")
    out = Console()
    out.print(f"sweep {swept.sweep_id}: {len(swept.trials)} trials", highlight=False)
    for trial in swept.trials:
        out.print(f"  {trial.run_id}  {trial.label()}", highlight=False)
    if dry_run:
        return
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "finetune sweep queues trials on a work pool: set PREFECT_API_URL to your Prefect server "
            "(README, 'Sweeps'); --dry-run lists the trials without one"
        )
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "finetune")
    from flows.sweep import finetune_sweep

    state = finetune_sweep(
        config=data,
        work_dir=work_dir or str(data.get("work_dir", ".finetune")),
        deployment=deployment,
        poll_seconds=poll_seconds,
        return_state=True,
    )
    result = state.result(raise_on_failure=False)
    print_table(out, result if isinstance(result, dict) else {})
    out.print(state.message or state.name, highlight=False, soft_wrap=True)
    if not state.is_completed():
        raise typer.Exit(1)


def print_table(out: Console, result: dict) -> None:
    trials = result.get("trials") or []
    if not trials:
        return
    table = Table(title=f"sweep {result.get('sweep_id')} ({result.get('metric')})")
    for column in ("run id", "parameters", "state", "score", ""):
        table.add_column(column)
    for t in trials:
        params = ", ".join(f"{k}={v}" for k, v in t["params"].items())
        score = "" if t["score"] is None else f"{t['score']:.4f}"
        table.add_row(t["run_id"], params, t["state"], score, "winner" if t["run_id"] == result.get("winner") else "")
    out.print(table)
