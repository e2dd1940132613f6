"""The pipeline's stages as plain functions: the Prefect tasks and the CLI call these same functions.

One parsing of the dataset source (``finetune.data``), one layout of run directories and
caches (``finetune.layout``), whether a run goes through the flow or ``finetune train``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.config import DatasetConfig, Settings, StorageConfig, TemplateConfig
from finetune.data.sources import check_source
from finetune.data.splits import Splits, load_splits
from finetune.data.templating import load_tokenizer, template_fingerprint
from finetune.data.tokenized import TokenizedData, read_tokenized, save_tokenized, tokenize_splits, tokenized_version
from finetune.evaluation.evaluate import EvalReport, evaluate_candidate
from finetune.layout import CONFIG_FILE, bundle_cache, champion_ref, run_dir, tokenized_path
from finetune.model.resolve import resolve_model
from finetune.pipeline.results import DatasetVersion, TokenizedDataset
from finetune.publishing import fetch_bundle, read_champion
from finetune.store import check_reachable, open_store
from finetune.train.outputs import TrainResult

EVAL_SPLITS = ("valid", "test")


def preflight(settings: Settings) -> str:
    """Cheap checks before a long run: a local dataset exists and the store answers; returns the store's URI."""
    check_source(settings.dataset)
    store = open_store(settings.storage)
    check_reachable(store)
    return store.uri


def model_dir(settings: Settings, ref: str | None = None) -> Path:
    model = settings.model
    return resolve_model(ref or model.path, model.revision, settings.work_dir, model.dtype)


def fetch_dataset(dataset: DatasetConfig, storage: StorageConfig | None, work_dir: Path | str) -> DatasetVersion:
    """Fetch and validate every row into ``<work_dir>/datasets/``."""
    splits = load_splits(dataset, storage, Path(work_dir))
    return DatasetVersion(splits.version(), Path(splits.directory), splits.counts(), splits.bad_rows, splits.problems)


@functools.lru_cache(maxsize=2)
def tokenizer_of(model_path: str) -> Any:
    return load_tokenizer(model_path)


def tokenized_target(
    dataset_dir: Path | str, model_path: Path | str, template: TemplateConfig, on_bad_row: str, work_dir: Path | str
) -> tuple[str, Path]:
    """The tokenized version of this dataset, template and tokenizer, and where its file lives."""
    fingerprint = template_fingerprint(tokenizer_of(str(model_path)), template)
    version = tokenized_version(Splits.open(dataset_dir).version(), fingerprint, on_bad_row)
    return version, tokenized_path(work_dir, version)


def tokenize_dataset(
    dataset_dir: Path | str, model_path: Path | str, template: TemplateConfig, on_bad_row: str, work_dir: Path | str
) -> tuple[TokenizedDataset, TokenizedData | None]:
    """Tokenize every split once per version (an existing file is reused: the data is then None)."""
    version, path = tokenized_target(dataset_dir, model_path, template, on_bad_row, work_dir)
    dataset_version = Splits.open(dataset_dir).version()
    if path.is_file():
        return TokenizedDataset(version, dataset_version, path, reused=True), None
    data = tokenize_splits(Splits.open(dataset_dir), tokenizer_of(str(model_path)), template, on_bad_row)
    save_tokenized(path, data)
    return TokenizedDataset(version, dataset_version, path), data


def prepare_data(settings: Settings, model_path: Path) -> tuple[DatasetVersion, TokenizedDataset]:
    """Fetch and tokenize the configured dataset, as the flow's data tasks do."""
    fetched = fetch_dataset(settings.dataset, settings.storage, settings.work_dir)
    template, on_bad_row = settings.template, settings.dataset.on_bad_row
    tokens, _ = tokenize_dataset(fetched.directory, model_path, template, on_bad_row, settings.work_dir)
    return fetched, tokens


def evaluate_run(
    model_path: Path | str,
    adapter_dir: Path | str,
    tokens_path: Path | str,
    dataset_dir: Path | str,
    settings: Settings,
    champion_dir: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Base, champion and candidate on the valid/test splits only (the training split stays on disk)."""
    tokenized, splits = read_tokenized(tokens_path), Splits.open(dataset_dir)
    data = {name: tokenized.splits[name].encoded() for name in EVAL_SPLITS}
    rows = {name: splits.rows(name) for name in EVAL_SPLITS}
    return evaluate_candidate(
        str(model_path),
        Path(adapter_dir),
        data,
        rows,
        settings,
        champion_dir=champion_dir,
        progress=progress,
        data_version=tokenized.version,
    )


def fetch_adapter(settings: Settings, ref: str) -> Path:
    return fetch_bundle(ref, bundle_cache(settings.work_dir), settings.storage)


def trained_with(settings: Settings, adapter_dir: Path | None, model: str | None) -> tuple[str, TemplateConfig]:
    """Base model and template settings the adapter was trained with (so prompts match training)."""
    recorded = adapter_dir / CONFIG_FILE if adapter_dir is not None else None
    if recorded is None or not recorded.is_file():
        return model or settings.model.path, settings.template
    config = json.loads(recorded.read_text(encoding="utf-8"))
    return model or config["model"]["path"], TemplateConfig(**config["template"])


# ---------------------------------------------------------------- the CLI's stages, on the flow's functions


def train_stage(settings: Settings, run_id: str | None, fresh: bool, log: Callable[[str], None]) -> TrainResult:
    """Fetch, template and train, without Prefect, in the run directory the flow would use."""
    from finetune.train.child import run_training_child

    run_id = run_id or "train-" + settings.fingerprint()[:12]
    directory = run_dir(settings.work_dir, run_id)
    model = model_dir(settings)
    fetched, tokens = prepare_data(settings, model)
    log(f"run {run_id} in {directory}: dataset {fetched.version[:16]}, tokenized {tokens.version[:16]}")
    return run_training_child(settings, str(model), tokens.path, directory, log, fresh=fresh)


def evaluate_stage(settings: Settings, adapter: str, against_champion: bool) -> EvalReport:
    adapter_dir = fetch_adapter(settings, adapter)
    model_name, template = trained_with(settings, adapter_dir, None)
    settings = settings.model_copy(update={"template": template})
    model = model_dir(settings, model_name)
    fetched, tokens = prepare_data(settings, model)
    champion_dir = None
    if against_champion and read_champion(open_store(settings.storage)) is not None:
        champion_dir = fetch_adapter(settings, champion_ref(settings.storage.uri))
    return evaluate_run(model, adapter_dir, tokens.path, fetched.directory, settings, champion_dir)


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
    llm, tokenizer = load_for_eval(
        str(model_dir(settings, model_name)), adapter_dir, trust_remote_code=settings.model.trust_remote_code
    )
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    return generate_one(llm, tokenizer, messages, template, max_tokens, on_text=on_text)


def export_stage(settings: Settings, bundle: str, fmt: str, out: Path, **options: Any) -> Any:
    """Fetch the bundle (a directory or a store reference) and export it, verified, to ``out``."""
    from finetune.export import export_bundle

    bundle_dir = fetch_adapter(settings, bundle)
    return export_bundle(bundle_dir, fmt, out, work_dir=settings.work_dir, storage=settings.storage, **options)
