"""A pipeline run from the command line: the full log in a file, the terminal without tracebacks.

On failure the terminal gets one line (the cause, the run id, the log's path); the
tracebacks Prefect's engines log go to the file and to the run's logs in Prefect.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from finetune.errors import USER_ERRORS, FinetuneError

FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Prefect's console handler (configured by Prefect on the root logger), told apart by name: no Prefect import here.
CONSOLE_HANDLER = "PrefectConsoleHandler"


class RunFailed(FinetuneError):
    """A pipeline run that failed, named with its run id and the path of its full log."""


class _WithoutTraceback(logging.Formatter):
    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def new_run_id() -> str:
    """A run id for a CLI run given none (deployment runs derive theirs from the flow run)."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"


def log_path(work_dir: Path, run_id: str) -> Path:
    return Path(work_dir) / "logs" / f"{run_id}.log"


@contextlib.contextmanager
def run_log(work_dir: Path, run_id: str) -> Iterator[Path]:
    """Log everything to ``work_dir/logs/<run_id>.log``; failures leave as one :class:`RunFailed` line."""
    path = log_path(work_dir, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
    root = logging.getLogger()
    consoles = [h for h in root.handlers if type(h).__name__ == CONSOLE_HANDLER]
    formatters = [h.formatter for h in consoles]
    for handler in consoles:
        handler.setFormatter(_WithoutTraceback(handler.formatter))
    root.addHandler(file_handler)
    try:
        yield path
    except USER_ERRORS as exc:
        _to_file(file_handler, exc)
        raise RunFailed(f"{exc} (run {run_id}; full log: {path})") from exc
    except Exception as exc:
        _to_file(file_handler, exc)
        raise RunFailed(f"unexpected {type(exc).__name__}: {exc} (run {run_id}; full log: {path})") from exc
    finally:
        root.removeHandler(file_handler)
        file_handler.close()
        for handler, formatter in zip(consoles, formatters):
            handler.setFormatter(formatter)


def _to_file(handler: logging.Handler, exc: BaseException) -> None:
    record = logging.LogRecord("finetune.cli", logging.ERROR, __file__, 0, "run failed: %s", (exc,), None)
    record.exc_info = (type(exc), exc, exc.__traceback__)
    handler.handle(record)
