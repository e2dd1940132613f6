"""Options every command shares, and how commands print sizes, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: section.key=value (repeatable).")
]
RunIdOption = Annotated[str | None, typer.Option(help="Stable run id: re-running it resumes from its checkpoints.")]
FreshOption = Annotated[bool, typer.Option(help="Discard this run id's checkpoints and start over.")]


def human_size(n: float) -> str:
    """Bytes in binary units, as the commands print file and bundle sizes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
