"""Fetch, validate and version datasets."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from finetune.config import DatasetConfig

SPLITS = ("train", "valid", "test")
BUILTIN_CAPITALS = "builtin:capitals"


class DataError(ValueError):
    """A dataset problem; the message names the file and line."""


@dataclass
class Splits:
    """Canonical chat rows per split, and the content hash of all of them."""

    train: list[dict[str, Any]]
    valid: list[dict[str, Any]]
    test: list[dict[str, Any]]
    sources: dict[str, str] = field(default_factory=dict)

    def version(self) -> str:
        h = hashlib.sha256()
        for name in SPLITS:
            for row in getattr(self, name):
                h.update(name.encode() + b"\0" + json.dumps(row, sort_keys=True).encode() + b"\n")
        return h.hexdigest()


def builtin_dir() -> Path:
    return Path(str(resources.files("finetune.demo_data")))


def load_splits(cfg: DatasetConfig) -> Splits:
    source = builtin_dir() if cfg.source == BUILTIN_CAPITALS else Path(cfg.source.removeprefix("file://"))
    if not source.exists():
        raise DataError(f"dataset.source {cfg.source!r}: no such file or directory")
    if source.is_dir():
        files = {name: source / f"{name}.jsonl" for name in SPLITS if (source / f"{name}.jsonl").is_file()}
        if "train" not in files:
            raise DataError(f"dataset.source {cfg.source!r}: directory has no train.jsonl")
        rows = {name: read_jsonl(path) for name, path in files.items()}
        splits = Splits(rows["train"], rows.get("valid", []), rows.get("test", []), {k: str(v) for k, v in files.items()})
    else:
        splits = split_rows(read_jsonl(source), cfg)
        splits.sources = {"all": str(source)}
    if not splits.valid:
        raise DataError(f"dataset.source {cfg.source!r}: the validation split is empty")
    return splits


def split_rows(rows: list[dict[str, Any]], cfg: DatasetConfig) -> Splits:
    order = list(range(len(rows)))
    random.Random(cfg.split_seed).shuffle(order)
    n_valid = max(1, round(len(rows) * cfg.valid_fraction))
    n_test = round(len(rows) * cfg.test_fraction)
    pick = lambda idx: [rows[i] for i in idx]  # noqa: E731
    return Splits(
        train=pick(order[n_valid + n_test :]),
        valid=pick(order[:n_valid]),
        test=pick(order[n_valid : n_valid + n_test]),
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(f"{where}: not valid UTF-8 JSON ({exc})") from None
            rows.append(validate_chat_row(row, where))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def validate_chat_row(row: Any, where: str) -> dict[str, Any]:
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected an object with a non-empty 'messages' list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: messages[{i}] needs a role of system, user or assistant")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(f"{where}: the last message must be a non-empty assistant answer")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
