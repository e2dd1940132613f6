"""Pipeline stages callable without Prefect: the CLI's train, evaluate and generate."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.config import Settings, TemplateConfig
from finetune.data import (
    DataError,
    Splits,
    load_splits,
    save_tokenized,
    tokenize_splits,
)
from finetune.data.templating import load_tokenizer
from finetune.layout import CONFIG_FILE
from finetune.model.resolve import resolve_model

REMOTE_SCHEMES = ("s3://", "https://", "http://", "hf:", "builtin:")


def preflight(settings: Settings) -> None:
    """Cheap checks before a long run: a local dataset exists and the store answers."""
    from finetune.store import check_reachable, open_store

    source = settings.dataset.source
    if not source.startswith(REMOTE_SCHEMES):
        path = Path(source.removeprefix("file://"))
        if not path.exists():
            raise DataError(f"dataset.source {source!r}: no such file or directory")
    check_reachable(open_store(settings.storage))


def bundle_cache(settings: Settings) -> Path:
    return Path(settings.work_dir) / "cache" / "bundles"


def fetch_adapter(settings: Settings, ref: str) -> Path:
    from finetune.publishing import fetch_bundle

    return fetch_bundle(ref, bundle_cache(settings), settings.storage)


def trained_with(settings: Settings, adapter_dir: Path | None, model: str | None) -> tuple[str, TemplateConfig]:
    """Base model and template settings the adapter was trained with (so prompts match training)."""
    recorded = adapter_dir / CONFIG_FILE if adapter_dir is not None else None
    if recorded is None or not recorded.is_file():
        return model or settings.model.path, settings.template
    config = json.loads(recorded.read_text(encoding="utf-8"))
    return model or config["model"]["path"], TemplateConfig(**config["template"])


def prepare_data(settings: Settings, model_path: str, out: Path) -> tuple[Splits, Path]:
    """Fetch, validate and tokenize the configured dataset into ``out``."""
    splits = load_splits(settings.dataset, settings.storage, Path(settings.work_dir))
    data = tokenize_splits(splits, load_tokenizer(model_path), settings.template, settings.dataset.on_bad_row)
    return splits, save_tokenized(out, data)


def train_stage(settings: Settings, run_id: str | None, fresh: bool, log: Callable[[str], None]) -> Any:
    from finetune.train.child import run_training_child

    run_id = run_id or "train-" + settings.fingerprint()[:12]
    run_dir = Path(settings.work_dir) / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = str(
        resolve_model(settings.model.path, settings.model.revision, settings.work_dir, settings.model.dtype)
    )
    _, tokens = prepare_data(settings, model_path, run_dir / "tokens.safetensors")
    log(f"run {run_id} in {run_dir}")
    return run_training_child(settings, model_path, tokens, run_dir, log, fresh=fresh)


def evaluate_stage(settings: Settings, adapter: str, against_champion: bool) -> Any:
    from finetune.data import load_tokenized
    from finetune.evaluation.evaluate import evaluate_candidate
    from finetune.publishing import read_champion
    from finetune.store import open_store

    adapter_dir = fetch_adapter(settings, adapter)
    model_name, template = trained_with(settings, adapter_dir, None)
    settings = settings.model_copy(update={"template": template})
    model_path = str(resolve_model(model_name, settings.model.revision, settings.work_dir, settings.model.dtype))
    scratch = Path(settings.work_dir) / "cache" / "evaluate"
    scratch.mkdir(parents=True, exist_ok=True)
    splits, tokens = prepare_data(settings, model_path, scratch / "tokens.safetensors")
    champion_dir = None
    if against_champion and read_champion(open_store(settings.storage)) is not None:
        champion_dir = fetch_adapter(settings, f"{settings.storage.uri.rstrip('/')}/champion")
    rows = {name: list(splits.rows(name)) for name in ("valid", "test")}
    return evaluate_candidate(
        model_path, adapter_dir, load_tokenized(tokens), rows, settings, champion_dir=champion_dir
    )


def generate_text(
    settings: Settings,
    prompt: str,
    adapter: str | None,
    model: str | None,
    max_tokens: int,
    on_text: Callable[[str], None] | None = None,
) -> str:
    from finetune.evaluation.generate import generate_one, load_for_eval

    adapter_dir = fetch_adapter(settings, adapter) if adapter else None
    model_name, template = trained_with(settings, adapter_dir, model)
    model_path = str(resolve_model(model_name, settings.model.revision, settings.work_dir, settings.model.dtype))
    llm, tokenizer = load_for_eval(model_path, adapter_dir, trust_remote_code=settings.model.trust_remote_code)
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    return generate_one(llm, tokenizer, messages, template, max_tokens, on_text=on_text)


def export_stage(settings: Settings, bundle: str, fmt: str, out: Path, **options: Any) -> Any:
    """Fetch the bundle (a directory or a store reference) and export it, verified, to ``out``."""
    from finetune.export import export_bundle

    bundle_dir = fetch_adapter(settings, bundle)
    return export_bundle(bundle_dir, fmt, out, work_dir=settings.work_dir, storage=settings.storage, **options)
