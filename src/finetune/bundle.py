"""The adapter bundle: what a run delivers, loadable by mlx-lm as an adapter path."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "finetune_config.json"
METRICS_FILE = "metrics.json"
from finetune.fsutil import sha256_file, write_json_atomic


def file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in a flat bundle directory."""
    return {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


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
    write_json_atomic(out_dir / CONFIG_FILE, config)
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    for path in extra_files:
        shutil.copy2(path, out_dir / path.name)
    return out_dir
