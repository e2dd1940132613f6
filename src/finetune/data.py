"""Fetch, validate, split and version datasets.

Every row is read as a stream (bounded line size), mapped to a canonical row
(``{"messages": [...]}`` or ``{"text": ...}``), validated, and written to a
content-addressed directory of canonical JSONL files, one per split. Memory
stays bounded by the largest row, not the dataset: :class:`Splits` reads rows
back from those files on demand. The dataset version is the sha256 of the
canonical rows, so a scheduled retrain can tell whether the data changed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import re
import shutil
import ssl
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import weakref
import zipfile
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from finetune.config import DatasetConfig, StorageConfig, TemplateConfig
from finetune.fsutil import atomic_path, fsync_dir, write_bytes_atomic
from finetune.templating import (
    Encoded,
    TemplateError,
    chat_template_of,
    encode_row,
    template_fingerprint,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
BUILTIN_CAPITALS = "builtin:capitals"
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid", "test": "test"}
MAX_JSON_DOCUMENT_BYTES = 512 << 20  # a .json document is parsed whole; bigger data belongs in JSONL
MAX_PROBLEMS_KEPT = 20
BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A dataset problem; the message names the file and line (or the config key)."""


class FetchError(DataError):
    """A source could not be fetched for a reason that may pass (network, 5xx): worth a retry."""


# ---------------------------------------------------------------------------- canonical rows


def canonical_line(row: Mapping[str, Any]) -> bytes:
    """The one serialization of a canonical row: what is hashed, stored and read back."""
    return json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


class RowFile(Sequence[dict[str, Any]]):
    """The rows of one canonical JSONL file, read on demand (only line offsets stay in memory)."""

    def __init__(self, path: Path, owner: object | None = None) -> None:
        self.path = path
        self._owner = owner  # keeps a temporary directory alive while rows are readable
        self._offsets: array | None = None

    @property
    def offsets(self) -> array:
        if self._offsets is None:  # indexed on first use: opening a dataset for its version stays cheap
            self._offsets, position = array("q"), 0
            with open(self.path, "rb") as f:
                for line in f:
                    self._offsets.append(position)
                    position += len(line)
        return self._offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (json.loads(line) for line in self.lines())

    def lines(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            for line in f:
                yield line.rstrip(b"\n")

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        with open(self.path, "rb") as f:
            f.seek(self.offsets[index])
            return json.loads(f.readline())


@dataclass
class Splits:
    """Canonical rows per split (lists, or :class:`RowFile` for fetched data) and where they came from."""

    train: Sequence[dict[str, Any]]
    valid: Sequence[dict[str, Any]]
    test: Sequence[dict[str, Any]]
    sources: dict[str, str] = field(default_factory=dict)
    schema: str | None = None
    bad_rows: int = 0
    problems: list[str] = field(default_factory=list)
    directory: Path | None = None
    content_version: str | None = field(default=None, repr=False)

    def version(self) -> str:
        """sha256 of the canonical rows of every split (split membership and row order included)."""
        if self.content_version is not None:  # computed while the rows were written
            return self.content_version
        digests = {}
        for name in SPLITS:
            h = hashlib.sha256()
            for line in self.lines(name):
                h.update(line + b"\n")
            digests[name] = h.hexdigest()
        return _version_of(digests)

    def rows(self, split: str) -> Sequence[dict[str, Any]]:
        return getattr(self, split)

    def counts(self) -> dict[str, int]:
        return {name: len(self.rows(name)) for name in SPLITS}

    def lines(self, split: str) -> Iterator[bytes]:
        rows = self.rows(split)
        return rows.lines() if isinstance(rows, RowFile) else (canonical_line(row) for row in rows)

    def origins(self, split: str) -> Iterator[str]:
        """Where each row of ``split`` came from (``file:line``), in row order."""
        rows = self.rows(split)
        path = rows.path.with_suffix(".origins") if isinstance(rows, RowFile) else None
        if path is not None and path.is_file():
            with open(path, encoding="utf-8") as f:
                yield from (line.rstrip("\n") for line in f)
        else:
            yield from (f"{split} row {i + 1}" for i in range(len(rows)))

    @classmethod
    def open(cls, directory: Path | str, owner: object | None = None) -> Splits:
        """The splits stored by :func:`load_splits` in ``directory``."""
        directory = Path(directory)
        try:
            manifest = json.loads((directory / "splits.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{directory}: not a canonical dataset directory ({exc})") from None
        files = {name: RowFile(directory / f"{name}.jsonl", owner) for name in SPLITS}
        return cls(
            files["train"],
            files["valid"],
            files["test"],
            sources=manifest["sources"],
            schema=manifest["schema"],
            bad_rows=manifest["bad_rows"],
            problems=manifest["problems"],
            directory=directory,
            content_version=manifest["version"],
        )


def _version_of(split_digests: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in SPLITS:
        h.update(f"{name}\0{split_digests[name]}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- entry point


def builtin_dir() -> Path:
    return Path(str(resources.files("finetune.demo_data")))


def load_splits(cfg: DatasetConfig, storage: StorageConfig | None = None, work_dir: Path | None = None) -> Splits:
    """Fetch ``cfg.source``, validate every row, split, and store canonical rows.

    With ``work_dir`` the rows land in ``<work_dir>/datasets/<version>-<origins>/`` (reused by
    later runs and by :meth:`Splits.open`); without it, in a temporary directory
    removed when the returned :class:`Splits` is garbage-collected.
    """
    if work_dir is not None:
        out_root = Path(work_dir).resolve() / "datasets"
        out_root.mkdir(parents=True, exist_ok=True)
        scratch_parent, owner = out_root, None
    else:
        out_root = Path(tempfile.mkdtemp(prefix="finetune-data-"))
        scratch_parent, owner = None, _TempDir(out_root)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=scratch_parent) as scratch:
        local, label = fetch_source(cfg, storage, Path(scratch))
        files = discover_files(local, label, cfg, Path(scratch))
        directory = _write_splits(files, cfg, out_root)
    return Splits.open(directory, owner)


class _TempDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        weakref.finalize(self, shutil.rmtree, path, True)


# ---------------------------------------------------------------------------- sources


def fetch_source(cfg: DatasetConfig, storage: StorageConfig | None, scratch: Path) -> tuple[Path, str]:
    """A local file or directory holding the data, and the label errors should show for it."""
    source = cfg.source.strip()
    if source == BUILTIN_CAPITALS:
        return builtin_dir(), source
    if source.startswith("hf:"):
        return _fetch_hf(source, scratch), source
    if source.startswith("s3://"):
        from finetune.storage import download_uri

        (scratch / "s3").mkdir()
        return download_uri(storage or StorageConfig(), source, scratch / "s3"), source
    if source.startswith("https://"):
        return _fetch_https(source, scratch, cfg), display_url(source)
    if source.startswith("file://"):
        parts = urlsplit(source)
        path = Path(unquote(parts.path if parts.netloc in ("", "localhost") else f"//{parts.netloc}{parts.path}"))
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
        raise DataError(
            f"dataset.source {display_url(source)}: unsupported scheme (use a path, file://, s3://, https:// or hf:)"
        )
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"dataset.source {source!r}: no such file or directory")
    return path, str(path)


def display_url(url: str) -> str:
    """A URL without user info or query string (presigned URLs carry credentials there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def _fetch_https(url: str, scratch: Path, cfg: DatasetConfig) -> Path:
    """Stream ``url`` to a file: size-capped, sha256-checked when ``dataset.sha256`` is set."""
    shown = display_url(url)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", PurePosixPath(unquote(urlsplit(url).path)).name).lstrip(".") or "download"
    target = scratch / "https" / name
    target.parent.mkdir()
    request = urllib.request.Request(url, headers={"User-Agent": "finetune"})
    digest = hashlib.sha256()
    size = 0
    try:
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ssl.create_default_context()), _HttpsOnlyRedirects()
        )
        with opener.open(request, timeout=cfg.timeout_seconds) as resp:
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > cfg.max_download_bytes:
                raise DataError(f"{shown}: {declared} bytes, over dataset.max_download_bytes={cfg.max_download_bytes}")
            with open(target, "wb") as out:
                while chunk := resp.read(1 << 20):
                    size += len(chunk)
                    if size > cfg.max_download_bytes:
                        raise DataError(f"{shown}: more than dataset.max_download_bytes={cfg.max_download_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
    except urllib.error.HTTPError as exc:
        kind = FetchError if exc.code >= 500 or exc.code == 429 else DataError
        raise kind(f"{shown}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise DataError(f"{shown}: TLS certificate not trusted ({exc.reason.verify_message})") from None
        raise FetchError(f"{shown}: cannot connect ({exc.reason})") from None
    except (TimeoutError, ConnectionError, ssl.SSLError) as exc:
        raise FetchError(f"{shown}: download interrupted after {size} bytes ({type(exc).__name__}: {exc})") from None
    if cfg.sha256 and digest.hexdigest() != cfg.sha256.lower():
        raise DataError(f"{shown}: sha256 {digest.hexdigest()} does not match dataset.sha256 {cfg.sha256.lower()}")
    return target


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        if not newurl.lower().startswith("https://"):
            raise DataError(f"{display_url(req.full_url)}: redirected to a non-https URL ({display_url(newurl)})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_hf(source: str, scratch: Path) -> Path:
    """Export a Hugging Face dataset's train/valid/test splits to JSONL files (needs the hf extra)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset.source {source}: needs the datasets library: pip install 'finetune[hf]'") from None
    name, _, revision = source.removeprefix("hf:").partition("@")
    try:
        loaded = datasets.load_dataset(name, revision=revision or None)
    except Exception as exc:  # the hub client raises many types; the message is what the user needs
        raise FetchError(f"dataset.source {source}: {type(exc).__name__}: {exc}") from None
    out = scratch / "hf"
    out.mkdir()
    known = [split for split in loaded if split in SPLIT_NAMES]
    if not any(SPLIT_NAMES[split] == "train" for split in known):
        raise DataError(f"dataset.source {source}: no train split (splits: {', '.join(loaded)})")
    for split in known:
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in loaded[split]:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return out


# ---------------------------------------------------------------------------- archives


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: Path, dest: Path, cfg: DatasetConfig, label: str) -> Path:
    """Extract regular files only, refusing members that would land outside ``dest`` or exceed the caps."""
    dest.mkdir(parents=True)
    opener = _zip_members if archive.name.lower().endswith(".zip") else _tar_members
    count = total = 0
    try:
        for name, size, open_member in opener(archive, label):
            relative = _safe_member_path(name, label)
            if relative is None:
                continue
            count += 1
            total += size
            if count > cfg.max_archive_members:
                raise DataError(f"{label}: more than dataset.max_archive_members={cfg.max_archive_members} files")
            if total > cfg.max_archive_bytes:
                raise DataError(f"{label}: more than dataset.max_archive_bytes={cfg.max_archive_bytes} bytes unpacked")
            target = dest.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open_member() as src, open(target, "xb") as out:
                _copy_capped(src, out, size, f"{label}!{name}")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{label}: not a readable archive ({exc})") from None
    except FileExistsError:
        raise DataError(f"{label}: member {name!r} appears twice") from None
    return dest


def _copy_capped(src: BinaryIO, out: BinaryIO, size: int, where: str) -> None:
    # The header's size is what the caps were checked against; a member must not grow past it.
    written = 0
    while chunk := src.read(1 << 20):
        written += len(chunk)
        if written > size:
            raise DataError(f"{where}: member is larger than its header says")
        out.write(chunk)


def _tar_members(archive: Path, label: str):
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if member.isdir():
                continue
            if not member.isfile():
                kind = "link" if member.issym() or member.islnk() else "special file"
                raise DataError(f"{label}: member {member.name!r} is a {kind}; only regular files are extracted")
            yield member.name, member.size, lambda m=member: tar.extractfile(m)


def _zip_members(archive: Path, label: str):
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            # Unix type bits, when present (many zip writers store permissions only).
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind and kind != stat.S_IFREG:
                raise DataError(f"{label}: member {info.filename!r} is a link or special file; only regular files are extracted")
            yield info.filename, info.file_size, lambda i=info: zf.open(i)


def _safe_member_path(name: str, label: str) -> PurePosixPath | None:
    """The member's relative path, ``None`` for metadata to skip; raises for escaping paths."""
    if "\\" in name or "\0" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"{label}: member {name!r} has an absolute or non-portable path")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise DataError(f"{label}: member {name!r} would be extracted outside the destination")
    if not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return None
    return PurePosixPath(*parts)


# ---------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class SourceFile:
    path: Path
    label: str
    format: str


def discover_files(local: Path, label: str, cfg: DatasetConfig, scratch: Path) -> dict[str, list[SourceFile]]:
    """Data files per split; ``train`` alone means valid/test are carved from it by ratio."""
    if is_archive(local):
        local = extract_archive(local, scratch / "extracted", cfg, label)
        label = f"{label}!"
    if local.is_file():
        return {"train": [SourceFile(local, label, format_of(local, cfg))]}
    join = (lambda rel: f"{label}{rel}") if label.endswith("!") else (lambda rel: f"{label.rstrip('/')}/{rel}")
    data_files = [
        p
        for p in sorted(local.rglob("*"))
        if p.is_file()
        and p.suffix.lower() in FORMATS
        and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(local).parts)
    ]
    if not data_files:
        raise DataError(f"dataset.source {label.rstrip('!')}: no data files ({', '.join(sorted(set(FORMATS)))})")
    by_split: dict[str, list[SourceFile]] = {}
    unnamed = []
    for path in data_files:
        rel = path.relative_to(local).as_posix()
        split = _split_of(path.stem)
        item = SourceFile(path, join(rel), format_of(path, cfg))
        if split is None:
            unnamed.append(item)
        else:
            by_split.setdefault(split, []).append(item)
    if not by_split:
        return {"train": unnamed}  # shards of one pool, split by ratio
    if unnamed:
        raise DataError(
            f"{unnamed[0].label}: cannot tell which split this file belongs to; "
            "name files train.*, valid.* (or validation.*, val.*, dev.*) and test.*"
        )
    if "train" not in by_split:
        raise DataError(f"dataset.source {label.rstrip('!')}: no train file (found: {', '.join(sorted(by_split))})")
    return by_split


def _split_of(stem: str) -> str | None:
    match = re.match(r"^([a-z]+)(?:[-_.]|$)", stem.lower())
    return SPLIT_NAMES.get(match.group(1)) if match else None


def format_of(path: Path, cfg: DatasetConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown file format; set dataset.format (jsonl, json, csv or parquet)")
    if fmt == "json" and _looks_like_jsonl(path):
        return "jsonl"
    return fmt


def _looks_like_jsonl(path: Path) -> bool:
    """A .json file whose first line is a complete JSON object, followed by more lines, is JSON Lines."""
    with open(path, "rb") as f:
        first = f.readline(1 << 20).removeprefix(BOM).strip()
        more = bool(f.read(1 << 12).strip())
    if not (first.startswith(b"{") and more):
        return False
    try:
        json.loads(first)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class BadRow:
    """A row-level problem a reader found; the loader fails or skips per ``dataset.on_bad_row``."""

    where: str
    message: str


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
    """A JSON array of rows (or an object holding one list of rows), with line numbers."""
    size = src.path.stat().st_size
    if size > MAX_JSON_DOCUMENT_BYTES:
        raise DataError(f"{src.label}: {size} bytes is too large for a .json document; use JSON Lines")
    data = src.path.read_bytes().removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{src.label}:{line}: invalid UTF-8") from None
    start = len(text) - len(text.lstrip())
    if text[start : start + 1] == "[":
        yield from _json_array_items(text, start + 1, src.label)
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{src.label}:{exc.lineno}: invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise DataError(f"{src.label}: JSON nested too deeply") from None
    lists = [(k, v) for k, v in document.items() if isinstance(v, list)] if isinstance(document, dict) else []
    if len(lists) != 1:
        raise DataError(f"{src.label}: expected a JSON array of rows, or an object holding exactly one list of rows")
    key, items = lists[0]
    for i, item in enumerate(items):
        yield f"{src.label}: {key}[{i}]", item


def _json_array_items(text: str, pos: int, label: str) -> Iterator[Record]:
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def where(at: int) -> str:
        nonlocal line, counted
        line += text.count("\n", counted, at)
        counted = at
        return f"{label}:{line}"

    expect_item = True
    while True:
        pos = _skip_ws(text, pos)
        if pos >= len(text):
            raise DataError(f"{where(pos)}: the JSON array is not closed (truncated file?)")
        if text[pos] == "]" and (expect_item is False or text[pos - 1] != ","):
            if text[_skip_ws(text, pos + 1) :].strip():
                raise DataError(f"{where(pos)}: unexpected data after the JSON array")
            return
        if not expect_item:
            raise DataError(f"{where(pos)}: expected ',' or ']' between rows")
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{label}:{exc.lineno}: invalid JSON: {exc.msg} at column {exc.colno}") from None
        except RecursionError:
            raise DataError(f"{where(pos)}: JSON nested too deeply") from None
        yield where(pos), item
        pos = _skip_ws(text, end)
        expect_item = text[pos : pos + 1] == ","
        pos += int(expect_item)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


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


# ---------------------------------------------------------------------------- schemas


class Canonicalizer:
    """Maps source records to canonical rows, detecting the schema from the first good row."""

    def __init__(self, cfg: DatasetConfig) -> None:
        self.cfg = cfg
        self.schema: str | None = None if cfg.row_schema == "auto" else cfg.row_schema
        self.detected_at = "dataset.row_schema"
        self.templates = {name: _compile_template(name, text) for name, text in cfg.templates.items()}

    def __call__(self, record: Any, where: str) -> dict[str, Any]:
        if not isinstance(record, dict):
            raise _bad(where, f"expected a JSON object, got {_type_name(record)}")
        schema = self.schema or self._detect(record, where)
        row = {"chat": self._chat, "prompt_completion": self._prompt_completion, "text": self._text}[schema](record, where)
        self.schema = schema
        return row

    def _available(self, record: dict[str, Any], name: str) -> bool:
        return name in self.templates or self.cfg.field_map.get(name, name) in record

    def _detect(self, record: dict[str, Any], where: str) -> str:
        for schema, needs in (("chat", ("messages",)), ("prompt_completion", ("prompt", "completion")), ("text", ("text",))):
            if all(self._available(record, name) for name in needs):
                self.detected_at = where
                return schema
        raise _bad(
            where,
            f"cannot tell the row schema from the keys {sorted(record)}: expected messages, prompt+completion or "
            "text; map other columns with dataset.field_map or dataset.templates",
        )

    def _get(self, record: dict[str, Any], name: str, where: str, required: bool = True) -> Any:
        if name in self.templates:
            try:
                return self.templates[name].render({**record, "row": record})
            except Exception as exc:  # jinja2 undefined/security/type errors: a problem with this row
                raise _bad(where, f"dataset.templates.{name}: {exc}") from None
        column = self.cfg.field_map.get(name, name)
        if column not in record and required:
            mapped = f" (column {column!r})" if column != name else ""
            raise _bad(
                where, f"missing field {name!r}{mapped} for schema {self.schema or '?'} (detected at {self.detected_at})"
            )
        return record.get(column)

    def _chat(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        messages = self._get(record, "messages", where)
        if isinstance(messages, str):  # e.g. a CSV column holding JSON
            try:
                messages = json.loads(messages)
            except (ValueError, RecursionError):
                raise _bad(where, "messages is a string that is not a JSON list") from None
        row: dict[str, Any] = {"messages": _check_messages(messages, where)}
        tools = record.get(self.cfg.field_map.get("tools", "tools"))
        if tools is not None:
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise _bad(where, f"tools must be a list of objects, got {_type_name(tools)}")
            row["tools"] = tools
        return row

    def _prompt_completion(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        prompt = _string(self._get(record, "prompt", where), "prompt", where)
        completion = _string(self._get(record, "completion", where), "completion", where)
        if not completion.strip():
            raise _bad(where, "empty completion: nothing to train on")
        system = self._get(record, "system", where, required=False)
        messages = [{"role": "system", "content": _string(system, "system", where)}] if system else []
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return {"messages": messages}

    def _text(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        text = _string(self._get(record, "text", where), "text", where)
        if not text.strip():
            raise _bad(where, "empty text")
        return {"text": text}


def _compile_template(name: str, text: str) -> Any:
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)
    try:
        return env.from_string(text)
    except TemplateSyntaxError as exc:
        raise DataError(f"dataset.templates.{name}: invalid Jinja2 template ({exc.message}, line {exc.lineno})") from None


def _check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _bad(where, f"messages must be a non-empty list, got {_type_name(messages) if messages != [] else 'an empty list'}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(where, f"messages[{i}] must be an object, got {_type_name(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(where, f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if not (isinstance(content, str) or (content is None and role == "assistant" and tool_calls)):
            raise _bad(where, f"messages[{i}].content must be a string, got {_type_name(content)}")
        if role == "assistant" and not ((content or "").strip() or tool_calls):
            raise _bad(where, f"messages[{i}] is an empty assistant answer")
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise _bad(where, f"messages[{i}].tool_calls must be a list, got {_type_name(tool_calls)}")
        out.append({key: message[key] for key in MESSAGE_KEYS if message.get(key) is not None})
    if out[-1]["role"] != "assistant":
        raise _bad(where, f"the last message must be the assistant's answer, not {out[-1]['role']!r}")
    return out


def _string(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, f"{name} must be a string, got {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


class _BadRowError(Exception):
    def __init__(self, bad: BadRow) -> None:
        self.bad = bad


def _bad(where: str, message: str) -> _BadRowError:
    return _BadRowError(BadRow(where, message))


# ---------------------------------------------------------------------------- validation and splitting


class BadRows:
    """Applies ``dataset.on_bad_row``: raise on the first bad row, or count and keep a few examples."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.count = 0
        self.examples: list[str] = []

    def add(self, bad: BadRow) -> None:
        message = f"{bad.where}: {bad.message}"
        if self.policy == "fail":
            raise DataError(f"{message} (set dataset.on_bad_row=skip to drop bad rows)")
        self.count += 1
        if len(self.examples) < MAX_PROBLEMS_KEPT:
            self.examples.append(message)
            log.warning("skipping bad row: %s", message)


class _SplitWriter:
    """Appends canonical lines (and where each came from) to ``<split>.jsonl``/``.origins``, hashing as it goes."""

    def __init__(self, directory: Path, name: str) -> None:
        self.rows = open(directory / f"{name}.jsonl", "wb")
        self.origins = open(directory / f"{name}.origins", "w", encoding="utf-8", errors="backslashreplace", newline="\n")
        self.digest = hashlib.sha256()
        self.origin_digest = hashlib.sha256()
        self.count = 0

    def add(self, line: bytes, where: str) -> None:
        self.rows.write(line + b"\n")
        where = where.replace("\n", "\\n") + "\n"
        self.origins.write(where)
        self.digest.update(line + b"\n")
        self.origin_digest.update(where.encode("utf-8", "backslashreplace"))
        self.count += 1

    def close(self) -> None:
        if self.rows.closed:
            return
        for f in (self.rows, self.origins):
            f.flush()
            os.fsync(f.fileno())
            f.close()


def iter_canonical(
    files: Iterable[SourceFile], cfg: DatasetConfig, canon: Canonicalizer, bad_rows: BadRows
) -> Iterator[tuple[bytes, str]]:
    """(canonical line, where) for every good row of ``files``; each file must yield at least one."""
    for src in files:
        good = 0
        for where, record in read_records(src, cfg):
            try:
                if isinstance(record, BadRow):
                    raise _BadRowError(record)
                line = _encode_line(canon(record, where), where, cfg)
            except _BadRowError as exc:
                bad_rows.add(exc.bad)
                continue
            good += 1
            yield line, where
        if good == 0:
            detail = f" ({bad_rows.count} bad rows skipped)" if bad_rows.count else ""
            raise DataError(f"{src.label}: no usable rows{detail}")


def _encode_line(row: dict[str, Any], where: str, cfg: DatasetConfig) -> bytes:
    try:
        line = canonical_line(row)
    except UnicodeEncodeError:
        raise _bad(where, "text contains an unpaired UTF-16 surrogate (not valid Unicode)") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise _bad(where, f"row cannot be stored as JSON ({exc})") from None
    if len(line) > cfg.max_line_bytes:
        raise _bad(where, f"row is {len(line)} bytes, over dataset.max_line_bytes={cfg.max_line_bytes}")
    return line


def _write_splits(files: Mapping[str, list[SourceFile]], cfg: DatasetConfig, out_root: Path) -> Path:
    """Validate and write every split into ``out_root/<version>-<origins digest>/``; returns that directory."""
    canon, bad_rows = Canonicalizer(cfg), BadRows(cfg.on_bad_row)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_root))
    writers = {name: _SplitWriter(tmp, name) for name in (*SPLITS, "pool")}
    try:
        for line, where in iter_canonical(files["train"], cfg, canon, bad_rows):
            writers["pool"].add(line, where)
        for name in ("valid", "test"):
            for line, where in iter_canonical(files.get(name, []), cfg, canon, bad_rows):
                writers[name].add(line, where)
        writers["pool"].close()
        _carve(tmp, writers, [name for name in ("valid", "test") if name not in files], cfg)
        for writer in writers.values():
            writer.close()
        if bad_rows.count:
            log.warning("skipped %d bad rows (dataset.on_bad_row=skip)", bad_rows.count)
        version = _version_of({name: writers[name].digest.hexdigest() for name in SPLITS})
        manifest = {
            "version": version,
            "counts": {name: writers[name].count for name in SPLITS},
            "sources": {
                name: ", ".join(f.label for f in files[name]) if name in files else f"carved from train (seed {cfg.split_seed})"
                for name in SPLITS
            },
            "schema": canon.schema,
            "bad_rows": bad_rows.count,
            "problems": bad_rows.examples,
        }
        for name in ("pool.jsonl", "pool.origins"):
            (tmp / name).unlink()
        write_bytes_atomic(tmp / "splits.json", json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False).encode())
        # The rows decide the version; the directory also pins where they came from (origins, skips).
        described = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
        for name in SPLITS:
            described.update(writers[name].origin_digest.digest())
        return _publish_dir(tmp, out_root / f"{version}-{described.hexdigest()[:16]}")
    finally:
        for writer in writers.values():
            writer.rows.close()
            writer.origins.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _carve(tmp: Path, writers: dict[str, _SplitWriter], missing: list[str], cfg: DatasetConfig) -> None:
    """Distribute the pool to train and the missing splits: seeded shuffle, exact ratios, file order kept."""
    n = writers["pool"].count
    fractions = {"valid": cfg.valid_fraction, "test": cfg.test_fraction}
    sizes = {name: round(n * fractions[name]) for name in missing}
    if "valid" in sizes:
        sizes["valid"] = max(1, sizes["valid"])
    if n - sum(sizes.values()) < 1:
        raise DataError(f"only {n} usable rows: too few to carve {', '.join(missing)} from train")
    assignment = bytearray(n)  # 0 train, 1 valid, 2 test
    order = list(range(n))
    random.Random(cfg.split_seed).shuffle(order)
    cursor = 0
    for code, name in ((1, "valid"), (2, "test")):
        for i in order[cursor : cursor + sizes.get(name, 0)]:
            assignment[i] = code
        cursor += sizes.get(name, 0)
    targets = [writers["train"], writers["valid"], writers["test"]]
    with open(tmp / "pool.jsonl", "rb") as rows, open(tmp / "pool.origins", encoding="utf-8") as origins:
        for i, (line, where) in enumerate(zip(rows, origins)):
            targets[assignment[i]].add(line.rstrip(b"\n"), where.rstrip("\n"))


def _publish_dir(tmp: Path, target: Path) -> Path:
    """Move a finished directory into place; an existing one has identical contents (same name)."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / "splits.json").is_file():
            raise
    fsync_dir(target.parent)
    return target


# ---------------------------------------------------------------------------- tokenized data

TOKENIZED_FORMAT = "finetune-tokenized-1"


@dataclass
class TokenizedSplit:
    """One split's encoded rows, packed: all token ids back to back, row ``i`` at ``offsets[i]:offsets[i+1]``."""

    input_ids: Any  # np.ndarray int32
    loss_mask: Any  # np.ndarray uint8
    offsets: Any  # np.ndarray int64, len(rows) + 1
    truncated: Any  # np.ndarray uint8 per row

    @classmethod
    def from_encoded(cls, rows: Sequence[Encoded]) -> TokenizedSplit:
        """Pack encoded rows (e.g. built by hand in a test) into the stored layout."""
        import numpy as np

        return cls(
            np.asarray([t for row in rows for t in row.input_ids], np.int32),
            np.asarray([m for row in rows for m in row.loss_mask], np.uint8),
            np.cumsum([0, *(len(row.input_ids) for row in rows)], dtype=np.int64),
            np.asarray([row.truncated for row in rows], np.uint8),
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> Any:
        return self.offsets[1:] - self.offsets[:-1]

    def n_targets(self) -> Any:
        import numpy as np

        sums = np.concatenate([[0], np.cumsum(self.loss_mask, dtype=np.int64)])
        return sums[self.offsets[1:]] - sums[self.offsets[:-1]]

    def encoded(self) -> list[Encoded]:
        ids, mask, bounds = self.input_ids.tolist(), self.loss_mask.tolist(), self.offsets.tolist()
        return [
            Encoded(ids[a:b], mask[a:b], bool(t)) for a, b, t in zip(bounds[:-1], bounds[1:], self.truncated.tolist())
        ]


@dataclass
class TokenizedData:
    """Every split encoded once, under a version naming the rows, the template and the tokenizer."""

    version: str
    dataset_version: str
    chat_template: str
    splits: dict[str, TokenizedSplit]
    stats: dict[str, Any]

    def encoded(self) -> dict[str, list[Encoded]]:
        return {name: split.encoded() for name, split in self.splits.items()}


def tokenized_version(dataset_version: str, template_fp: str, on_bad_row: str) -> str:
    parts = {"format": TOKENIZED_FORMAT, "data": dataset_version, "template": template_fp, "on_bad_row": on_bad_row}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def tokenize_splits(splits: Splits, tokenizer: Any, cfg: TemplateConfig, on_bad_row: str = "fail") -> TokenizedData:
    """Encode every row of every split, applying ``cfg.truncation`` and rejecting rows with no target.

    A row the template cannot render, or left without a supervised token (a prompt
    that fills ``max_seq_length``), is a bad row: it fails the run, or with
    ``on_bad_row="skip"`` is dropped and counted.
    """
    bad_rows = BadRows(on_bad_row)
    packed, stats = {}, {}
    for name in SPLITS:
        packed[name], stats[name] = _tokenize_split(splits, name, tokenizer, cfg, bad_rows)
    for name in ("train", "valid"):
        if len(packed[name]) == 0:
            raise DataError(f"the {name} split has no usable rows after templating")
    stats |= {"bad_rows": bad_rows.count, "problems": bad_rows.examples, "max_seq_length": cfg.max_seq_length}
    return TokenizedData(
        version=tokenized_version(splits.version(), template_fingerprint(tokenizer, cfg), on_bad_row),
        dataset_version=splits.version(),
        chat_template=chat_template_of(tokenizer, cfg),
        splits=packed,
        stats=stats,
    )


def _tokenize_split(
    splits: Splits, name: str, tokenizer: Any, cfg: TemplateConfig, bad_rows: BadRows
) -> tuple[TokenizedSplit, dict[str, int]]:
    import numpy as np

    ids, mask, offsets, truncated = array("i"), array("B"), array("q", [0]), array("B")
    stats = {"rows_in": 0, "truncated": 0, "dropped_too_long": 0, "zero_target": 0, "template_errors": 0}
    for row, where in zip(splits.rows(name), splits.origins(name)):
        stats["rows_in"] += 1
        try:
            enc = encode_row(tokenizer, row, cfg)
        except TemplateError as exc:
            stats["template_errors"] += 1
            bad_rows.add(BadRow(where, str(exc)))
            continue
        if enc.truncated:
            if cfg.truncation == "fail":
                raise DataError(
                    f"{where}: longer than template.max_seq_length={cfg.max_seq_length} tokens (template.truncation=fail)"
                )
            if cfg.truncation == "drop":
                stats["dropped_too_long"] += 1
                continue
        if enc.n_targets == 0:
            stats["zero_target"] += 1
            bad_rows.add(
                BadRow(where, f"no supervised tokens within template.max_seq_length={cfg.max_seq_length} (the prompt fills it)")
            )
            continue
        stats["truncated"] += int(enc.truncated)
        ids.extend(enc.input_ids)
        mask.extend(enc.loss_mask)
        offsets.append(len(ids))
        truncated.append(int(enc.truncated))
    packed = TokenizedSplit(
        np.asarray(ids, np.int32),
        np.asarray(mask, np.uint8),
        np.asarray(offsets, np.int64),
        np.asarray(truncated, np.uint8),
    )
    return packed, stats


def save_tokenized(path: Path | str, data: TokenizedData) -> Path:
    """Write a safetensors file of int arrays (never a pickle) atomically: temp file, fsync, rename."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {}
    for name, split in data.splits.items():
        for key in ("input_ids", "loss_mask", "offsets", "truncated"):
            tensors[f"{name}.{key}"] = getattr(split, key)
    metadata = {
        "format": TOKENIZED_FORMAT,
        "version": data.version,
        "dataset_version": data.dataset_version,
        "chat_template": data.chat_template,
        "stats": json.dumps(data.stats, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_tokenized(path: Path | str) -> TokenizedData:
    path = Path(path)
    metadata, tensors = _open_tokenized(path, with_tensors=True)
    splits = {
        name: TokenizedSplit(*(tensors[f"{name}.{key}"] for key in ("input_ids", "loss_mask", "offsets", "truncated")))
        for name in SPLITS
    }
    return TokenizedData(
        metadata["version"], metadata["dataset_version"], metadata["chat_template"], splits, json.loads(metadata["stats"])
    )


def tokenized_metadata(path: Path | str) -> dict[str, Any]:
    """version, dataset_version, chat_template and stats of a tokenized file, without reading its arrays."""
    metadata, _ = _open_tokenized(Path(path), with_tensors=False)
    return {**metadata, "stats": json.loads(metadata["stats"])}


def _open_tokenized(path: Path, with_tensors: bool) -> tuple[dict[str, str], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != TOKENIZED_FORMAT:
                raise DataError(f"{path}: not a tokenized dataset (format {metadata.get('format')!r})")
            tensors = {key: f.get_tensor(key) for key in f.keys()} if with_tensors else {}
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{path}: cannot read tokenized dataset ({exc})") from None
    return metadata, tensors


def load_tokenized(path: Path | str) -> dict[str, list[Encoded]]:
    """The encoded rows per split (train/valid/test) from a file written by :func:`save_tokenized`."""
    return read_tokenized(path).encoded()


