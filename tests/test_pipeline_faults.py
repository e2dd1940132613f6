"""The pipeline as a user runs it (`finetune run`), publishing through a fault proxy in front of moto's server.

A champion write that keeps failing: the run fails with one terminal line (cause, run id,
log path) and exit code 2, and no traceback on the terminal; the bundle is published. The
re-run of that run id trains nothing and goes on to decide the promotion.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3faults import FaultPlan, FaultProxy, moto_server, no_backoff, on, raw_client  # noqa: F401 (a fixture)

from finetune.cli import app
from finetune.config import StorageConfig
from finetune.layout import CHAMPION_KEY
from finetune.publishing import read_champion, read_manifest
from finetune.store import open_store

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def terminal() -> Iterator[io.StringIO]:
    """What the user's terminal would show: our output and Prefect's console handler (pointed here meanwhile).

    Not capfd: Prefect's console handler keeps the stream it first saw, and pytest closes its capture files.
    """
    import flows.finetune  # noqa: F401  (Prefect configures its logging on import)

    out = io.StringIO()
    consoles = [h for h in logging.getLogger().handlers if type(h).__name__ == "PrefectConsoleHandler"]
    assert consoles, "Prefect's console handler is not configured"
    saved = [h.console.file for h in consoles]
    for handler in consoles:
        handler.console.file = out
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield out
    finally:
        for handler, file in zip(consoles, saved):
            handler.console.file = file


def invoke(*args: str) -> tuple[int, str]:
    with terminal() as out:
        code = app(list(args), standalone_mode=False)
    return code or 0, out.getvalue()


def test_failed_promotion_is_one_line_and_the_rerun_promotes(moto_server, tmp_path, monkeypatch):  # noqa: F811
    no_backoff(monkeypatch)
    bucket = f"ft-{uuid.uuid4().hex[:12]}"
    raw_client(f"http://{moto_server[0]}:{moto_server[1]}", key="testing").create_bucket(Bucket=bucket)
    plan = FaultPlan().add(on("PutObject", CHAMPION_KEY), "503", times=None)
    with FaultProxy(moto_server, plan) as proxy:
        storage = {
            "uri": f"s3://{bucket}/ft",
            "endpoint_url": proxy.url,
            "region": "us-east-1",
            "addressing_style": "path",
            "step_retry_wait_seconds": 0,
        }
        config = tmp_path / "config.yaml"
        config.write_text(
            f"work_dir: {tmp_path / 'work'}\n"
            "training:\n  iters: 10\n  steps_per_eval: 10\n  steps_per_checkpoint: 10\n  steps_per_report: 10\n"
            "evaluation:\n  primary_metric: val_loss\n  max_examples: 4\n  max_tokens: 4\n"
            "storage:\n"
            + "".join(f"  {k}: {v}\n" for k, v in storage.items())
            + "  access_key_id: testing\n  secret_access_key: testing\n"
        )
        code, terminal = invoke("run", "-c", str(config), "--run-id", "faulty")
        assert code == 2, terminal[-3000:]
        errors = [line for line in terminal.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, terminal[-3000:]
        assert "Traceback" not in terminal, terminal[-3000:]
        match = re.search(r"\(run faulty; full log: (\S+)\)$", errors[0])
        assert match and "champion.json" in errors[0], errors[0]
        log = Path(match.group(1)).read_text()
        assert "Traceback" in log and "champion.json" in log
        store = open_store(StorageConfig(**storage, access_key_id="testing", secret_access_key="testing"))
        assert read_manifest(store, "faulty") is not None and read_champion(store) is None

        plan.rules.clear()
        code, terminal = invoke("run", "-c", str(config), "--run-id", "faulty")
        assert code == 0, terminal[-3000:]
    assert read_champion(store)["run_id"] == "faulty"
    assert "champion: promoted to champion" in terminal and "training 10 steps" not in terminal, terminal[-3000:]
