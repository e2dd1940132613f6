"""Prefect tasks for the data stages: fetch + validate, template once (cached by version), report.

Results are the library's typed records (``finetune.pipeline.results``), stored with
Prefect's JSON serializer (never pickles); the training child reads the tokenized file by path.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.logging.loggers import task_run_logger
from prefect.states import State

from finetune.config import DatasetConfig, StorageConfig, TemplateConfig
from finetune.data import Splits, read_tokenized
from finetune.data.report import build_report, report_markdown, write_report
from finetune.errors import FetchError
from finetune.layout import BUILD_ID_FILE, TOKENIZED_FILE
from finetune.pipeline import stages
from finetune.pipeline.results import DataReport, DatasetVersion, TokenizedDataset
from tasks.artifacts import artifact_key

__all__ = ["TOKENIZED_FILE", "fetch_dataset", "report_dataset", "template_dataset"]
REPORT_KEY = "data-report"
CACHE_DAYS = 30
# Part of the cache key: records of an earlier result format (plain dicts) are then never read back.
RESULT_FORMAT = "typed"


def _retry_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry network and storage hiccups; a bad row or a missing file fails the same way again."""
    from finetune.store import NotFoundError, StorageError, UnsafeKeyError

    try:
        state.result()
    except FetchError:
        return True
    except (NotFoundError, UnsafeKeyError):
        return False
    except (StorageError, OSError):
        return True
    except BaseException:
        return False
    return False


@task(
    name="fetch-dataset",
    cache_policy=NO_CACHE,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_retry_transient,
)
def fetch_dataset(dataset: DatasetConfig, storage: StorageConfig | None, work_dir: str) -> DatasetVersion:
    """Fetch and validate every row into its content-addressed directory.

    Always runs: whether the data changed is only known after reading it.
    """
    logger = get_run_logger()
    fetched = stages.fetch_dataset(dataset, storage, work_dir)
    rows = ", ".join(f"{k} {v} rows" for k, v in fetched.counts.items())
    logger.info("dataset version %s: %s", fetched.version[:16], rows)
    if fetched.bad_rows:
        logger.warning(
            "skipped %d bad rows (dataset.on_bad_row=skip); first: %s", fetched.bad_rows, fetched.problems[0]
        )
    return fetched


def _tokenized_cache_key(context: TaskRunContext | None, parameters: dict[str, Any]) -> str:
    """The tokenized version plus the id of the build that wrote its file.

    A new build id is drawn whenever the file is missing, so a Prefect cache
    record can never hand out the path of a deleted file.
    """
    version, path = stages.tokenized_target(
        parameters["dataset_dir"],
        parameters["model_path"],
        parameters["template"],
        parameters["on_bad_row"],
        parameters["work_dir"],
    )
    build_id = path.with_name(BUILD_ID_FILE)
    if not (path.is_file() and build_id.is_file()):
        build_id.parent.mkdir(parents=True, exist_ok=True)
        build_id.write_text(uuid.uuid4().hex, encoding="utf-8")
    return f"tokenized-{version}-{build_id.read_text(encoding='utf-8').strip()}-{RESULT_FORMAT}"


def _log_reuse(task: Task, task_run: TaskRun, state: State) -> None:
    if state.name == "Cached":
        task_run_logger(task_run, task).info("reusing cached tokenized dataset %s", state.result().version)


@task(
    name="template-dataset",
    cache_key_fn=_tokenized_cache_key,
    cache_expiration=timedelta(days=CACHE_DAYS),
    persist_result=True,
    result_serializer="json",
    on_completion=[_log_reuse],
)
def template_dataset(
    dataset_dir: Path | str, model_path: str, template: TemplateConfig, on_bad_row: str, work_dir: str
) -> TokenizedDataset:
    """Tokenize every split once per version (a cached result is read back as the same record).

    ``model_path`` is a local model directory (or a Hugging Face id mlx-lm can fetch).
    """
    logger = get_run_logger()
    tokens, data = stages.tokenize_dataset(dataset_dir, model_path, template, on_bad_row, work_dir)
    if data is None:
        logger.info("reusing cached tokenized dataset %s", tokens.version)
        return tokens
    version = tokens.version
    rows = ", ".join(f"{name} {len(split)}" for name, split in data.splits.items())
    logger.info("tokenized dataset %s: %s rows", version, rows)
    if data.stats["bad_rows"]:
        logger.warning("skipped %d rows while templating; first: %s", data.stats["bad_rows"], data.stats["problems"][0])
    return tokens


@task(name="report-dataset", cache_policy=NO_CACHE, result_serializer="json")
def report_dataset(dataset_dir: Path | str, tokenized_path: Path | str, run_dir: str, batch_size: int) -> DataReport:
    """Write data_report.md/.json into the run directory and publish the Markdown as an artifact."""
    report = build_report(Splits.open(dataset_dir), read_tokenized(tokenized_path), batch_size)
    md, js = write_report(report, run_dir)
    create_markdown_artifact(
        markdown=report_markdown(report),
        key=artifact_key(REPORT_KEY),
        description=f"run {Path(run_dir).name}: data version {report['dataset_version'][:16]}",
    )
    return DataReport(Path(md), Path(js))
