"""Readers per file format: stream records with where each came from, bounded by the line size."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from finetune.config import DatasetConfig
from finetune.data.schema import BadRow
from finetune.data.sources import BOM, SourceFile
from finetune.errors import DataError

MAX_JSON_DOCUMENT_BYTES = 512 << 20  # a .json document is parsed whole; bigger data belongs in JSONL

Record = tuple[str, Any]  # (where, parsed record) or (where, BadRow)


def read_records(src: SourceFile, cfg: DatasetConfig) -> Iterator[Record]:
    readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}
    try:
        yield from readers[src.format](src, cfg)
    except OSError as exc:
        raise DataError(f"{src.label}: cannot read ({exc.strerror or exc})") from None


def _bounded_lines(f: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None, bool]]:
    """(line number, bytes or None when longer than ``limit``, has newline), without ever holding a long line."""
    lineno = 0
    while raw := f.readline(limit + 1):
        lineno += 1
        if len(raw) > limit and not (raw.endswith(b"\n") and len(raw) == limit + 1):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield lineno, None, True
            continue
        if lineno == 1:
            raw = raw.removeprefix(BOM)
        yield lineno, raw, raw.endswith(b"\n")


def _read_jsonl(src: SourceFile, cfg: DatasetConfig) -> Iterator[Record]:
    with open(src.path, "rb") as f:
        for lineno, raw, has_newline in _bounded_lines(f, cfg.max_line_bytes):
            where = f"{src.label}:{lineno}"
            if raw is None:
                yield where, BadRow(where, f"line longer than dataset.max_line_bytes={cfg.max_line_bytes}")
            elif raw.strip():
                yield where, _parse_json_line(raw, where, has_newline)


def _parse_json_line(raw: bytes, where: str, has_newline: bool) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRow(where, f"invalid UTF-8 at byte {exc.start + 1} of the line")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (the file ends mid-row: truncated?)" if not has_newline else ""
        return BadRow(where, f"invalid JSON: {exc.msg} at column {exc.colno}{hint}")
    except RecursionError:
        return BadRow(where, "JSON nested too deeply")


def _read_json(src: SourceFile, cfg: DatasetConfig) -> Iterator[Record]:
    """A JSON array of rows, or an object holding exactly one list of rows; each row named by its index."""
    size = src.path.stat().st_size
    if size > MAX_JSON_DOCUMENT_BYTES:
        raise DataError(f"{src.label}: {size} bytes is too large for a .json document; use JSON Lines")
    data = src.path.read_bytes().removeprefix(BOM)
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{src.label}:{line}: invalid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{src.label}:{exc.lineno}: invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise DataError(f"{src.label}: JSON nested too deeply") from None
    if isinstance(document, list):
        key, items = "", document
    else:
        lists = [(k, v) for k, v in document.items() if isinstance(v, list)] if isinstance(document, dict) else []
        if len(lists) != 1:
            raise DataError(
                f"{src.label}: expected a JSON array of rows, or an object holding exactly one list of rows"
            )
        key, items = lists[0]
    for i, item in enumerate(items):
        yield f"{src.label}: {key}[{i}]", item


def _read_csv(src: SourceFile, cfg: DatasetConfig) -> Iterator[Record]:
    """CSV/TSV with a header row; a quoted field may span lines, so encoding errors stop the file."""
    delimiter = "\t" if src.path.suffix.lower() == ".tsv" else ","
    with open(src.path, "rb") as f, _csv_field_limit(cfg.max_line_bytes):
        reader = csv.reader(_csv_lines(f, src.label, cfg.max_line_bytes), delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{src.label}: empty file (no header row)")
            if len(set(header)) != len(header) or not all(h.strip() for h in header):
                raise DataError(f"{src.label}:1: the header has empty or repeated column names: {header}")
            for values in reader:
                where = f"{src.label}:{reader.line_num}"
                if not values:
                    continue
                if len(values) != len(header):
                    yield where, BadRow(where, f"expected {len(header)} columns, found {len(values)}")
                else:
                    yield where, dict(zip(header, values))
        except csv.Error as exc:
            raise DataError(f"{src.label}:{reader.line_num}: malformed CSV ({exc})") from None


def _csv_lines(f: BinaryIO, label: str, limit: int) -> Iterator[str]:
    for lineno, raw, _ in _bounded_lines(f, limit):
        if raw is None:
            raise DataError(f"{label}:{lineno}: line longer than dataset.max_line_bytes={limit}")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{label}:{lineno}: invalid UTF-8 at byte {exc.start + 1} of the line") from None


@contextmanager
def _csv_field_limit(limit: int):
    # The csv module's field limit is process-wide; restore it for other readers.
    previous = csv.field_size_limit(max(limit, csv.field_size_limit()))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_parquet(src: SourceFile, cfg: DatasetConfig) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{src.label}: reading Parquet needs pyarrow: pip install 'finetune[parquet]'") from None
    try:
        parquet = pq.ParquetFile(src.path)
        n = 0
        for batch in parquet.iter_batches(batch_size=256):
            for record in batch.to_pylist():
                n += 1
                yield f"{src.label}: row {n}", record
    except (OSError, ValueError) as exc:  # pyarrow.ArrowException subclasses both
        raise DataError(f"{src.label}: cannot read Parquet ({exc})") from None
