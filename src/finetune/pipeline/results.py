"""What each stage returns: small typed records the flow passes on by attribute (and Prefect stores as JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DatasetVersion:
    """Validated canonical rows in a content-addressed directory."""

    version: str
    directory: Path
    counts: dict[str, int]
    bad_rows: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TokenizedDataset:
    """Every split tokenized once; ``version`` names rows, template and tokenizer (and is the data fingerprint)."""

    version: str
    dataset_version: str
    path: Path
    reused: bool = False


@dataclass(frozen=True)
class ChampionBundle:
    run_id: str
    path: Path


@dataclass(frozen=True)
class Published:
    uri: str  # <store>/runs/<run_id>: what --adapter and mlx_lm.load(adapter_path=...) take
    manifest_key: str
    files: int
    reused: bool = False


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    reason: str


@dataclass(frozen=True)
class RunOutcome:
    """What a pipeline run did, for the CLI summary and the flow's result."""

    run_id: str
    bundle_uri: str
    dataset_version: str | None
    metrics: dict[str, Any]
    promoted: bool | None  # None: nothing was evaluated (already published, or nothing changed)
    promotion_reason: str
    run_dir: str | None = None
    store: str | None = None
    model_path: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    reason: str | None = None
