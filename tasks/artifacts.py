"""What a run shows in Prefect's UI: artifact keys per deployment, readable tables, the loss plot, a bundle link."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from prefect.runtime import deployment

from finetune.config import StorageConfig
from finetune.store.base import redact_url

SIGNIFICANT_DIGITS = 4
MISSING = "–"  # a cell with no value, rather than a blank one


def artifact_key(name: str) -> str:
    """``name`` prefixed with the deployment (on-demand and nightly runs keep separate histories).

    Prefect keys allow lowercase letters, digits and dashes only.
    """
    prefix = deployment.name or "local"
    return re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{name}".lower()).strip("-")


def cell(value: Any) -> Any:
    """A table cell: numbers to 4 significant digits, nothing as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, int) and abs(value) < 10**SIGNIFICANT_DIGITS:
        return value
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else str(value)


def table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the same columns each (in first-seen order) and readable cells."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return [{column: cell(row.get(column)) for column in columns} for row in rows]


def image_markdown(png: Path, title: str) -> str:
    """Markdown showing ``png`` inline (a data URI): the browser opens it without access to the worker or store."""
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return f"### {title}\n\n![{title}](data:image/png;base64,{data})\n"


def bundle_link(storage: StorageConfig, run_prefix: str) -> tuple[str | None, str]:
    """(URL a browser opens, markdown) for a published run; no credential in either.

    AWS: the S3 console at the run's prefix (opens for anyone signed in to the account).
    Another S3-compatible endpoint: the manifest's path-style URL on it (opens where the
    bucket allows reads; its own console otherwise). A local store: the path as text.
    Not a presigned URL: it would carry the access key id into the UI.
    """
    if not run_prefix.startswith("s3://"):
        return None, (
            f"Bundle published to the local store: `{run_prefix}`\n\nNot reachable from a browser: "
            f"`finetune runs show {Path(run_prefix).name}` or `finetune generate --adapter {run_prefix}` reads it."
        )
    bucket, _, key = run_prefix.removeprefix("s3://").partition("/")
    if storage.endpoint_url:
        url = f"{redact_url(storage.endpoint_url).rstrip('/')}/{bucket}/{quote(key)}/manifest.json"
    else:
        url = f"https://s3.console.aws.amazon.com/s3/buckets/{bucket}?prefix={quote(key)}/"
    return url, f"Bundle `{run_prefix}`: [open]({url})"
