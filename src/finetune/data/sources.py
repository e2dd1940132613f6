"""Where the data comes from: fetch a source to a local path, then find its data files per split."""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from finetune.config import DatasetConfig, StorageConfig
from finetune.data.archives import extract_archive, is_archive
from finetune.errors import DataError, FetchError

SPLITS = ("train", "valid", "test")
BUILTIN_CAPITALS = "builtin:capitals"
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
SPLIT_NAMES = {
    "train": "train",
    "valid": "valid",
    "validation": "valid",
    "val": "valid",
    "dev": "valid",
    "test": "test",
}
BOM = b"\xef\xbb\xbf"


def builtin_dir() -> Path:
    return Path(str(resources.files("finetune.demo_data")))


def fetch_source(cfg: DatasetConfig, storage: StorageConfig | None, scratch: Path) -> tuple[Path, str]:
    """A local file or directory holding the data, and the label errors should show for it."""
    source = cfg.source.strip()
    if source == BUILTIN_CAPITALS:
        return builtin_dir(), source
    if source.startswith("hf:"):
        return _fetch_hf(source, scratch), source
    if source.startswith("s3://"):
        from finetune.store import download_uri

        (scratch / "s3").mkdir()
        return download_uri(storage or StorageConfig(), source, scratch / "s3"), source
    if source.startswith("https://"):
        return _fetch_https(source, scratch, cfg), display_url(source)
    path = check_source(cfg)
    assert path is not None  # every remote kind was handled above
    return path, str(path)


def check_source(cfg: DatasetConfig) -> Path | None:
    """What can be checked without fetching: a local source's path (which must exist); None for remote sources."""
    source = cfg.source.strip()
    if source == BUILTIN_CAPITALS or source.startswith(("hf:", "s3://", "https://")):
        return None
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
    return path


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
