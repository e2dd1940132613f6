"""Prefect task that assembles the run's adapter bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from finetune.config import TemplateConfig
from finetune.data.templating import chat_template_of, load_tokenizer
from finetune.publishing.bundle import build_bundle


@task(name="build-bundle", cache_policy=NO_CACHE, result_serializer="json")
def assemble_bundle(
    run_dir: str,
    adapter_dir: Path | str,
    model_path: str,
    template: TemplateConfig,
    config: dict[str, Any],
    metrics: dict[str, Any],
    extra_files: list[str],
) -> str:
    """Assemble ``<run_dir>/bundle``: adapter, the chat template used in training, config, metrics, reports."""
    chat_template = chat_template_of(load_tokenizer(model_path), template)
    out = build_bundle(
        Path(run_dir) / "bundle", Path(adapter_dir), chat_template, config, metrics, [Path(p) for p in extra_files]
    )
    return str(out)
