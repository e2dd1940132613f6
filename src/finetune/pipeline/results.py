"""What each stage returns: small typed records the flow passes on by attribute (and Prefect stores as JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
