"""The adapter bundle: what a run delivers, loadable by mlx-lm as an adapter path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "finetune_config.json"
METRICS_FILE = "metrics.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in a flat bundle directory."""
    return {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_bundle(
    out_dir: Path,
    adapter_dir: Path,
    chat_template: str,
    config: dict[str, Any],
    metrics: dict[str, Any],
    extra_files: list[Path] = (),
) -> Path:
    """Assemble the bundle directory from scratch (a rebuilt bundle never mixes attempts)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name in ADAPTER_FILES:
        source = adapter_dir / name
        if not source.is_file():
            raise FileNotFoundError(f"adapter {adapter_dir}: missing {name}")
        shutil.copy2(source, out_dir / name)
    (out_dir / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    write_json(out_dir / CONFIG_FILE, config)
    write_json(out_dir / METRICS_FILE, metrics)
    for path in extra_files:
        shutil.copy2(path, out_dir / path.name)
    return out_dir
