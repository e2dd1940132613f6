"""Run logs that say what happened: a cancelled run is logged as cancelled, not as a crash."""

from __future__ import annotations

import logging

CRASH_PREFIX = "Crash detected! "
ENGINE_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


def _flow_run_is_cancelling() -> bool:
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return False
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run.id).state
    except Exception:  # the API is unreachable: say nothing rather than guess
        return False
    return state is not None and state.type.value in ("CANCELLING", "CANCELLED")


class CancelIsNotACrash(logging.Filter):
    """Prefect's engines log the SIGTERM with which a worker cancels a run as ``ERROR Crash detected!``.

    When the run is in fact being cancelled, the record becomes an INFO line that says so.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno >= logging.ERROR and message.startswith(CRASH_PREFIX) and _flow_run_is_cancelling():
            record.msg, record.args = f"Cancelled: {message.removeprefix(CRASH_PREFIX)}", ()
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def log_cancels_as_cancels() -> None:
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, CancelIsNotACrash) for f in logger.filters):
            logger.addFilter(CancelIsNotACrash())
