"""The adapter bundle: what a run delivers, loadable by mlx-lm as an adapter path."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from finetune.fsutil import write_json_atomic
from finetune.layout import ADAPTER_FILES, BUNDLE_METRICS_FILE, CHAT_TEMPLATE_FILE, CONFIG_FILE


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
    write_json_atomic(out_dir / BUNDLE_METRICS_FILE, metrics)
    for path in extra_files:
        shutil.copy2(path, out_dir / path.name)
    return out_dir
