"""Canonical rows per split in a content-addressed directory: validated, carved by ratio, versioned.

Every row is read as a stream (bounded line size), mapped to a canonical row
(``{"messages": [...]}`` or ``{"text": ...}``), validated, and written to a
content-addressed directory of canonical JSONL files, one per split. Memory
stays bounded by the largest row, not the dataset: :class:`Splits` reads rows
back from those files on demand. The dataset version is the sha256 of the
canonical rows, so a scheduled retrain can tell whether the data changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import weakref
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import DatasetConfig, StorageConfig
from finetune.data.readers import read_records
from finetune.data.schema import BadRow, BadRowError, Canonicalizer, bad_row, canonical_line
from finetune.data.sources import SPLITS, SourceFile, discover_files, fetch_source
from finetune.errors import DataError
from finetune.fsutil import install_dir, write_bytes_atomic
from finetune.layout import datasets_dir

log = logging.getLogger(__name__)

MAX_PROBLEMS_KEPT = 20


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


def load_splits(cfg: DatasetConfig, storage: StorageConfig | None = None, work_dir: Path | None = None) -> Splits:
    """Fetch ``cfg.source``, validate every row, split, and store canonical rows.

    With ``work_dir`` the rows land in ``<work_dir>/datasets/<version>-<origins>/`` (reused by
    later runs and by :meth:`Splits.open`); without it, in a temporary directory
    removed when the returned :class:`Splits` is garbage-collected.
    """
    if work_dir is not None:
        out_root = datasets_dir(Path(work_dir).resolve())
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
        self.origins = open(
            directory / f"{name}.origins", "w", encoding="utf-8", errors="backslashreplace", newline="\n"
        )
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
                    raise BadRowError(record)
                line = _encode_line(canon(record, where), where, cfg)
            except BadRowError as exc:
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
        raise bad_row(where, "text contains an unpaired UTF-16 surrogate (not valid Unicode)") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise bad_row(where, f"row cannot be stored as JSON ({exc})") from None
    if len(line) > cfg.max_line_bytes:
        raise bad_row(where, f"row is {len(line)} bytes, over dataset.max_line_bytes={cfg.max_line_bytes}")
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
                name: ", ".join(f.label for f in files[name])
                if name in files
                else f"carved from train (seed {cfg.split_seed})"
                for name in SPLITS
            },
            "schema": canon.schema,
            "bad_rows": bad_rows.count,
            "problems": bad_rows.examples,
        }
        for name in ("pool.jsonl", "pool.origins"):
            (tmp / name).unlink()
        write_bytes_atomic(
            tmp / "splits.json", json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False).encode()
        )
        # The rows decide the version; the directory also pins where they came from (origins, skips).
        described = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
        for name in SPLITS:
            described.update(writers[name].origin_digest.digest())
        # The name is the content, so an existing directory of that name is already complete.
        return install_dir(tmp, out_root / f"{version}-{described.hexdigest()[:16]}", replace=False)
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
