"""Archives as dataset sources: extract regular files only, within caps, never outside the destination."""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from finetune.config import DatasetConfig
from finetune.errors import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: Path, dest: Path, cfg: DatasetConfig, label: str) -> Path:
    """Extract regular files only, refusing members that would land outside ``dest`` or exceed the caps."""
    dest.mkdir(parents=True)
    opener = _zip_members if archive.name.lower().endswith(".zip") else _tar_members
    count = total = 0
    try:
        for name, size, open_member in opener(archive, dest, label):
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


_TAR_REFUSALS = {
    tarfile.OutsideDestinationError: "would be extracted outside the destination",
    tarfile.AbsolutePathError: "has an absolute or non-portable path",
    tarfile.AbsoluteLinkError: "is a link; only regular files are extracted",
    tarfile.LinkOutsideDestinationError: "is a link; only regular files are extracted",
    tarfile.SpecialFileError: "is a special file; only regular files are extracted",
}


def _tar_members(archive: Path, dest: Path, label: str):
    """Members that pass the stdlib's ``data`` extraction filter, and are regular files."""
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if member.name.startswith("/"):
                # The data filter would strip the slash and extract it anyway; such an archive is hostile or broken.
                raise DataError(f"{label}: member {member.name!r} {_TAR_REFUSALS[tarfile.AbsolutePathError]}")
            try:
                safe = tarfile.data_filter(member, str(dest))
            except tarfile.FilterError as exc:
                refusal = _TAR_REFUSALS.get(type(exc), str(exc))
                raise DataError(f"{label}: member {member.name!r} {refusal}") from None
            if safe.isdir():
                continue
            if not safe.isfile():  # the filter allows links that stay inside dest; a dataset needs none
                raise DataError(f"{label}: member {member.name!r} {_TAR_REFUSALS[tarfile.AbsoluteLinkError]}")
            yield safe.name, safe.size, lambda m=member: tar.extractfile(m)


def _zip_members(archive: Path, dest: Path, label: str):
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            # Unix type bits, when present (many zip writers store permissions only).
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind and kind != stat.S_IFREG:
                raise DataError(
                    f"{label}: member {info.filename!r} is a link or special file; only regular files are extracted"
                )
            yield info.filename, info.file_size, lambda i=info: zf.open(i)


def _safe_member_path(name: str, label: str) -> PurePosixPath | None:
    """The member's relative path, ``None`` for metadata to skip; raises for escaping paths.

    zipfile has no refusing filter (``ZipFile.extract`` silently rewrites such names), hence this check.
    """
    if "\\" in name or "\0" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"{label}: member {name!r} has an absolute or non-portable path")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise DataError(f"{label}: member {name!r} would be extracted outside the destination")
    if not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return None
    return PurePosixPath(*parts)
