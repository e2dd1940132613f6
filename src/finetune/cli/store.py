"""Store commands: ``finetune runs list|show``, ``champion``, ``promote``, ``gc`` and ``pull``.

Register on the main app with :func:`register`. Every command reads the store from the
configuration (``-c CONFIG``, ``--set storage.uri=…``, ``FINETUNE_STORAGE__*``).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from finetune.cli.options import ConfigOption, SetOption, human_size

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

runs_app = typer.Typer(help="Published runs in the store.", no_args_is_help=True, add_completion=False)

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """``90s``, ``30m``, ``12h``, ``7d`` or ``2w``."""
    match = _AGE.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r}: expected a number and a unit s, m, h, d or w (e.g. 7d)")
    return timedelta(**{_UNITS[match[2]]: float(match[1])})


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Errors a user can fix become one line on stderr and exit code 2."""
    from finetune.errors import USER_ERRORS

    try:
        yield
    except USER_ERRORS as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _store(config: Path | None, overrides: list[str] | None) -> Any:
    from finetune.config import load_settings
    from finetune.store import open_store

    return open_store(load_settings(config, overrides or []).storage)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@runs_app.callback()
def runs() -> None:
    """Published runs in the store."""


@runs_app.command("list")
def runs_list(config: ConfigOption = None, overrides: SetOption = None, as_json: JsonOption = False) -> None:
    """Every run in the store, oldest first; * marks the champion."""
    from rich.console import Console
    from rich.table import Table

    from finetune.publishing import list_runs

    with _user_errors():
        store = _store(config, overrides)
        summaries = list_runs(store)
    if as_json:
        _print_json([asdict(s) for s in summaries])
        return
    if not summaries:
        typer.echo(f"no runs in {store.uri}")
        return
    table = Table(title=f"runs in {store.uri}", title_justify="left")
    for column in ("", "run", "created", "state", "metric", "score", "size", "attempts"):
        table.add_column(column)
    for s in summaries:
        table.add_row(
            "*" if s.champion else "",
            s.run_id,
            s.created or "",
            "published" if s.published else "unpublished",
            s.metric or "",
            "" if s.score is None else f"{s.score:.4g}",
            human_size(s.size),
            str(s.attempts),
        )
    Console(soft_wrap=True).print(table)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="The run id.")],
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """The run's manifest: files with sha256 and size, base model, dataset version, config, metrics."""
    from finetune.publishing import list_runs, read_manifest
    from finetune.store import StorageError

    with _user_errors():
        store = _store(config, overrides)
        manifest = read_manifest(store, run_id)
        if manifest is None:
            attempts = next((s.attempts for s in list_runs(store) if s.run_id == run_id), 0)
            detail = f"{attempts} unpublished staging attempt(s)" if attempts else "no such run"
            raise StorageError(f"run {run_id} is not published in {store.uri} ({detail})")
    _print_json(manifest)


def champion(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Show the champion pointer: run id, metric and score, and why it was promoted."""
    from finetune.publishing import read_champion

    with _user_errors():
        store = _store(config, overrides)
        pointer = read_champion(store)
    if pointer is None:
        typer.echo(f"no champion yet in {store.uri}")
        return
    _print_json(pointer)


def promote(
    run_id: Annotated[str, typer.Argument(help="A published run id.")],
    reason: Annotated[str, typer.Option(help="Recorded in the champion pointer.")] = "manual promotion",
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Make a published run the champion, whatever its score (same compare-and-swap as automatic promotion)."""
    from finetune.publishing import promote as promote_run

    with _user_errors():
        decision = promote_run(_store(config, overrides), run_id, reason)
    previous = decision.previous["run_id"] if decision.previous else "none"
    typer.echo(f"champion: {run_id} (was {previous})")


def gc(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Minimum age of an attempt to delete, e.g. 7d, 12h.")
    ] = "7d",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be deleted; delete nothing.")] = False,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Delete staging attempts that no manifest references (failed or superseded uploads); never a published bundle."""
    from finetune.publishing import gc as collect

    age = parse_age(older_than)
    with _user_errors():
        report = collect(_store(config, overrides), age, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for attempt in report.deleted_attempts:
        typer.echo(f"{verb} attempt {attempt}")
    typer.echo(
        f"{verb} {len(report.deleted_attempts)} attempt(s), {report.deleted_objects} object(s); "
        f"kept {report.kept_attempts}; aborted {report.aborted_uploads} incomplete upload(s)"
    )


def pull(
    ref: Annotated[
        str, typer.Argument(help="<store>/runs/<run_id> or <store>/champion (s3://…, file://… or a directory).")
    ],
    out: Annotated[
        Path, typer.Argument(help="Directory to create: the bundle's files, verified, ready for mlx_lm.load.")
    ],
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Download a published bundle into a plain directory, each file checked against the manifest's sha256."""
    from finetune.config import load_settings
    from finetune.publishing import pull_bundle

    with _user_errors():
        path = pull_bundle(ref, out, load_settings(config, overrides or []).storage)
    typer.echo(f"bundle in {path}")


def register(app: typer.Typer) -> None:
    """Add ``runs list|show``, ``champion``, ``promote`` and ``gc`` to the main CLI."""
    app.add_typer(runs_app, name="runs")
    app.command("champion")(champion)
    app.command("promote")(promote)
    app.command("gc")(gc)
    app.command("pull")(pull)
