"""The ``finetune`` command line."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console

from finetune.config import ConfigError, Settings, load_settings

app = typer.Typer(
    help="Scheduled, orchestrated LoRA fine-tuning of open LLMs with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config key: section.key=value (repeatable)."),
]


def user_errors(fn: Callable) -> Callable:
    """Turn the errors a user can fix into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from finetune.errors import USER_ERRORS

        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def settings_from(config: Path | None, overrides: list[str] | None) -> Settings:
    return load_settings(config, overrides or [])


@app.command("tiny-model")
@user_errors
def tiny_model(out: Annotated[Path, typer.Argument(help="Directory to write the model to.")]) -> None:
    """Build the tiny random-init Llama used by the demo and the tests."""
    from finetune.tiny_model import build_tiny_model

    path = build_tiny_model(out)
    typer.echo(f"tiny model written to {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
