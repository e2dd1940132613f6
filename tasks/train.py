"""Prefect task for the train stage: training in a child process, retried and resumed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import State

from finetune.config import Settings
from finetune.errors import TrainingError
from finetune.train.child import run_training_child
from finetune.train.outputs import TrainResult
from tasks.artifacts import artifact_key, table

PROGRESS_KEY = "training-progress"
HISTORY_KEY = "training-history"


def _retry_unless_user_error(task: Task, task_run: TaskRun, state: State) -> bool:
    """A crash or kill resumes on retry; bad input, data or a fingerprint mismatch fails the same way again."""
    try:
        state.result()
    except TrainingError:
        return False
    except BaseException:
        return True
    return True


@task(
    name="train-adapter", cache_policy=NO_CACHE, result_serializer="json", retry_condition_fn=_retry_unless_user_error
)
def train_adapter(
    settings: Settings,
    model_path: str,
    data_path: Path | str,
    run_dir: str,
    fresh: bool = False,
) -> TrainResult:
    """Train (or resume) the run's adapter in a child process.

    ``fresh`` discards existing checkpoints on the first attempt only: a retry
    must resume from what the crashed attempt saved.
    """
    logger = get_run_logger()
    ctx = TaskRunContext.get()
    attempt = ctx.task_run.run_count if ctx and ctx.task_run else 1
    if attempt > 1:
        logger.info("attempt %d: resuming from the last valid checkpoint in %s", attempt, run_dir)
    run_id = Path(run_dir).name
    artifact = create_progress_artifact(0.0, key=artifact_key(PROGRESS_KEY), description=f"training run {run_id}")

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "train":
            update_progress_artifact(artifact, 100.0 * event["step"] / event["total_steps"])

    result = run_training_child(
        settings,
        model_path,
        Path(data_path),
        Path(run_dir),
        logger.info,
        fresh=fresh and attempt == 1,
        on_event=on_event,
    )
    update_progress_artifact(artifact, 100.0)
    create_table_artifact(
        table=table(result.history),
        key=artifact_key(HISTORY_KEY),
        description=f"training run {run_id}: loss, learning rate and throughput per reported step",
    )
    return result


def train_with_retries(
    settings: Settings, model_path: str, data_path: Path | str, run_dir: str, fresh: bool = False
) -> TrainResult:
    """Run ``train_adapter`` with the retry count and backoff of ``settings.training`` (operational settings)."""
    retrying = train_adapter.with_options(
        retries=settings.training.retries, retry_delay_seconds=settings.training.retry_delay_seconds
    )
    return retrying(settings, model_path, data_path, run_dir, fresh=fresh)
