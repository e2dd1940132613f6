"""Sweeps as a user runs them: a real Prefect server, moto's S3 server, `prefect deploy`, two process workers
on one pool, and `finetune sweep -c sweep.yaml` in a terminal.

The first test runs a 4-trial sweep; the second kills a worker mid-trial and re-runs its sweep. The second
sweep's trials have the configurations of two of the first sweep's trials, so the first sweep's uninterrupted
runs are the reference for the resumed one's per-step losses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterTags,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Crashed
from prefect_server import PrefectServer, api_of, client, wait_for
from s3faults import bucket_endpoint, moto_server  # noqa: F401  (module-scoped fixture)
from worker_env import clean_worker_python, deploying_clone, git, process_worker, worker_environment

from finetune.config import StorageConfig
from finetune.layout import TRAIN_EVENTS_FILE, TRAIN_RESULT_FILE
from finetune.publishing import read_champion, read_manifest
from finetune.store import open_store
from finetune.train.outputs import read_history

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
BUCKET = "finetune-sweep-e2e"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIASWEEPTESTMARKER",
    "AWS_SECRET_ACCESS_KEY": "sweep-test-secret-marker",
    "AWS_DEFAULT_REGION": "us-east-1",
}
LEARNING_RATES = [1e-4, 3e-3]
TIMINGS: dict[str, float] = {}


def sweep_yaml(path: Path, name: str, work: Path, endpoint: str, grid: dict[str, list[Any]]) -> Path:
    config = {
        "work_dir": str(work),
        "dataset": {"source": "builtin:capitals"},
        "model": {"path": "builtin:tiny-llama"},
        "lora": {"rank": 4},
        "training": {"iters": 20, "steps_per_eval": 10, "steps_per_checkpoint": 5, "steps_per_report": 1},
        "evaluation": {"max_examples": 4, "max_tokens": 8, "primary_metric": "val_loss"},
        "storage": {"uri": f"s3://{BUCKET}/ft", "endpoint_url": endpoint, "region": "us-east-1"},
        "sweep": {"name": name, "grid": grid},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_sweep(server: PrefectServer, config: Path) -> tuple[subprocess.Popen, Path]:
    """`finetune sweep -c CONFIG` in the background, as a user runs it from a terminal."""
    log = config.with_suffix(f".{time.monotonic_ns()}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "finetune.cli", "sweep", "-c", str(config), "--poll-seconds", "1"],
            env=server.env(**CREDENTIALS),
            cwd=config.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log


def finish(proc_log, timeout: float = 400) -> tuple[int, str]:
    proc, log = proc_log
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, log.read_text(errors="replace")


def trial_runs(sweep_id: str) -> list[FlowRun]:
    with client() as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"sweep:{sweep_id}"])))
    return sorted(runs, key=lambda r: r.created)


def parent_flow_run(run: FlowRun) -> FlowRun:
    with client() as c:
        return c.read_flow_run(c.read_task_run(run.parent_task_run_id).flow_run_id)


def logs(run_id: UUID) -> list[str]:
    with client() as c:
        return [entry.message for entry in c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]


def task_names(run_ids: list[UUID]) -> list[str]:
    with client() as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
    return [t.name.rsplit("-", 1)[0] for t in runs]


def losses(work: Path, run_id: str) -> list[tuple[int, float | None, float | None]]:
    return [
        (h["step"], h["train_loss"], h["val_loss"]) for h in read_history(work / "runs" / run_id / TRAIN_EVENTS_FILE)
    ]


def ran_on(run: FlowRun, worker_log: Path) -> bool:
    # Both workers may try to submit a run; the one the server lets through logs this line.
    return f"Flow run '{run.name}' submitted to infrastructure" in worker_log.read_text(errors="replace")


def pids_of(pattern: str) -> list[tuple[int, int]]:
    """(pid, ppid) of live processes whose command line contains ``pattern``."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        pid, ppid, stat, args = line.strip().split(None, 3)
        if pattern in args and not stat.startswith("Z"):
            found.append((int(pid), int(ppid)))
    return found


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def reaper() -> Iterator[list[int]]:
    """Pids this test stopped or started: killed at the end even when an assertion failed midway."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module", autouse=True)
def report_timings() -> Iterator[None]:
    yield
    print("\n\nsweep end-to-end phases (s):")
    for phase, value in TIMINGS.items():
        print(f"  {phase:<52} {value:7.1f}")


@pytest.fixture(scope="module")
def api(prefect_server: PrefectServer) -> Iterator[PrefectServer]:
    with api_of(prefect_server) as server:
        yield server


@pytest.fixture(scope="module")
def endpoint(moto_server) -> Iterator[str]:  # noqa: F811
    with bucket_endpoint(moto_server, BUCKET, CREDENTIALS) as url:
        yield url


@pytest.fixture(scope="module")
def workers(api: PrefectServer, endpoint: str, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """provision, `prefect deploy --all` from a clone with a git origin, then two clean process workers on the pool.

    Two workers on one host stand for two Macs. A Mac's training slot is per host name, which both
    share here, so the deploying clone turns the slot off (an empty FINETUNE_TRAINING_SLOT) and
    each worker's --limit 1 is what keeps one trial per "Mac".
    """
    started = time.monotonic()
    clone, _ = deploying_clone(tmp_path_factory.mktemp("git"))
    spec = clone / "prefect.yaml"
    spec.write_text(
        spec.read_text().replace('FINETUNE_TRAINING_SLOT: "mlx-training-{host}"', 'FINETUNE_TRAINING_SLOT: ""')
    )
    git(clone, "commit", "-q", "-am", "one host stands for two Macs: no per-host training slot")
    git(clone, "push", "-q", "origin", "main")
    for cmd, cwd in (([sys.executable, "-m", "deployments.provision"], REPO), ([PREFECT, "deploy", "--all"], clone)):
        done = subprocess.run(cmd, env=api.env(), cwd=cwd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with client() as c:
        trial = c.read_deployment_by_name("finetune-pipeline/sweep-trial")
    assert trial.job_variables["env"]["FINETUNE_TRAINING_SLOT"] == ""
    TIMINGS["provision + prefect deploy --all"] = time.monotonic() - started
    procs: dict[str, subprocess.Popen] = {}
    logs_: dict[str, Path] = {}
    with contextlib.ExitStack() as stack:
        for name in ("mac-a", "mac-b"):
            root = tmp_path_factory.mktemp(name)
            python, logs_[name] = clean_worker_python(root), root / "worker.log"
            (root / "home").mkdir()
            env = worker_environment(api.env, root / "home", PREFECT_WORKER_QUERY_SECONDS="1", **CREDENTIALS)
            options = ("--name", name, "--work-queue", "default")
            procs[name] = stack.enter_context(process_worker(python, env, root / "home", logs_[name], *options))

        def online() -> bool:
            with client() as c:
                workers = c.read_workers_for_work_pool("mac-mlx")
                return {w.name for w in workers if w.status.value == "ONLINE"} >= set(procs)

        wait_for(online, 180, "both workers to come online", interval=0.5)
        TIMINGS["workers online"] = time.monotonic() - started
        yield {"procs": procs, "logs": logs_}


@pytest.fixture(scope="module")
def first_sweep(workers, api: PrefectServer, endpoint: str, tmp_path_factory) -> dict[str, Any]:
    """`finetune sweep -c sweep.yaml`: learning rate x rank, 4 trials on the two workers."""
    here = tmp_path_factory.mktemp("sweep1")
    config = sweep_yaml(
        here / "sweep.yaml",
        "lr-rank",
        here / "work",
        endpoint,
        {"training.learning_rate": LEARNING_RATES, "lora.rank": [4, 8]},
    )
    started = time.monotonic()
    rc, output = finish(run_sweep(api, config))
    TIMINGS["4-trial sweep on 2 workers (wall)"] = time.monotonic() - started
    assert rc == 0, output[-6000:]
    return {"work": here / "work", "output": output, "runs": trial_runs("lr-rank")}


def stores(endpoint: str, sweep_id: str):
    main = StorageConfig(uri=f"s3://{BUCKET}/ft", endpoint_url=endpoint, region="us-east-1")
    staging = main.model_copy(update={"uri": f"s3://{BUCKET}/ft/sweeps/{sweep_id}"})
    return open_store(main), open_store(staging)


# ---------------------------------------------------------------- tests


def test_sweep_runs_trials_on_both_workers_and_promotes_the_best_once(first_sweep, workers, endpoint) -> None:
    runs = first_sweep["runs"]
    assert len(runs) == 4 and all(r.state.type == StateType.COMPLETED for r in runs), [r.state for r in runs]
    by_worker = {name: {r.name for r in runs if ran_on(r, log)} for name, log in workers["logs"].items()}
    assert all(by_worker.values()), by_worker  # both Macs trained
    assert sum(map(len, by_worker.values())) == 4
    seconds = [(r.end_time - r.start_time).total_seconds() for r in runs]
    TIMINGS["sum of the 4 trials' flow-run times"] = sum(seconds)

    # The parent flow run links every trial (run_deployment's task run in the parent).
    parents = {parent_flow_run(r).id for r in runs}
    assert len(parents) == 1
    with client() as c:
        parent = c.read_flow_run(parents.pop())
        assert c.read_flow(parent.flow_id).name == "finetune-sweep"

    main, staging = stores(endpoint, "lr-rank")
    manifests = {r.name: read_manifest(staging, r.name) for r in runs}
    scores = {name: m["evaluation"]["score"] for name, m in manifests.items()}
    assert all(m["decision"]["promote"] for m in manifests.values())  # all beat the untrained base
    best = min(scores, key=scores.get)  # val_loss: lower is better
    assert len(set(scores.values())) == 4  # the swept parameters made a difference
    champion = read_champion(main)
    assert champion["run_id"] == best and champion["score"] == scores[best]
    # Only the winner left the staging area; and exactly one promotion happened, in the sweep, none in a trial.
    assert [name for name in scores if read_manifest(main, name)] == [best]
    assert task_names([r.id for r in runs]).count("promote") == 0
    assert task_names([parent.id]).count("promote") == 1
    assert f"winner {best}" in first_sweep["output"]

    # Data fetched and tokenized once, by the sweep: every trial reused the tokenized file.
    for r in runs:
        assert any(line.startswith("reusing cached tokenized dataset") for line in logs(r.id)), r.name

    with client() as c:
        artifacts = {
            a.key: a
            for a in c.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[parent.id]))
            )
        }
    table = artifacts["sweep-trials"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert len(rows) == 4
    assert set(rows[0]) >= {
        "run_id",
        "training.learning_rate",
        "lora.rank",
        "val_loss",
        "tokens_per_sec",
        "wall_seconds",
        "state",
        "winner",
    }
    assert [row["run_id"] for row in rows if row["winner"]] == [best]
    assert all(row["state"] == "Completed" and row["tokens_per_sec"] > 0 and row["wall_seconds"] > 0 for row in rows)
    assert {row["run_id"]: row["val_loss"] for row in rows} == {k: round(v, 4) for k, v in scores.items()}
    assert "data:image/png;base64," in artifacts["sweep-plot"].data
    print("\n" + "\n".join(json.dumps(row) for row in rows))


def test_killed_trial_resumes_from_its_checkpoint_and_finished_ones_are_not_retrained(
    first_sweep, workers, api: PrefectServer, endpoint: str, tmp_path, reaper
) -> None:
    work = tmp_path / "work"
    config = sweep_yaml(
        tmp_path / "sweep.yaml", "lr-resume", work, endpoint, {"training.learning_rate": LEARNING_RATES}
    )
    started = time.monotonic()
    parent = run_sweep(api, config)
    reaper.append(parent[0].pid)

    def a_trial_with_a_checkpoint() -> str | None:
        for run_dir in sorted((work / "runs").glob("lr-resume-*")):
            if list(run_dir.glob("checkpoints/step-*/state.json")) and not (run_dir / TRAIN_RESULT_FILE).exists():
                return run_dir.name
        return None

    victim = wait_for(a_trial_with_a_checkpoint, 300, "a trial's first checkpoint", interval=0.1)
    children = pids_of(f"{work}/runs/{victim}/")
    reaper.extend(pid for pid, _ in children)
    for pid, _ in children:
        os.kill(pid, signal.SIGSTOP)  # freeze it first: it must not finish while we find its worker
    (run,) = [r for r in trial_runs("lr-resume") if r.name == victim]
    flow_pid = int(run.infrastructure_pid.rsplit(":", 1)[-1])
    worker_name = next(n for n, log in workers["logs"].items() if ran_on(run, log))
    worker = workers["procs"][worker_name]
    # The Mac dies: its worker, the flow run's process and the training process, with no chance to clean up.
    os.killpg(worker.pid, signal.SIGKILL)
    for pid in [flow_pid, *(pid for pid, _ in children)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.wait()
    checkpoint_steps = sorted(
        int(p.name.removeprefix("step-")) for p in (work / "runs" / victim / "checkpoints").glob("step-*")
    )
    assert checkpoint_steps and max(checkpoint_steps) < 20

    # What the zombie automation does once 3 heartbeats are missed (3 x 60 s here; its rule is tested with a
    # 4 s heartbeat in test_deploy_server): the run becomes Crashed. The sweep then stops without promoting.
    with client() as c:
        assert c.read_flow_run(run.id).state.type == StateType.RUNNING
        c.set_flow_run_state(run.id, Crashed(message="no heartbeat: the worker or its machine stopped"), force=True)
    rc, output = finish(parent)
    assert rc == 1, output[-4000:]
    assert "1 of 2 trials did not finish" in output and "re-run the sweep to resume" in output
    main, staging = stores(endpoint, "lr-resume")
    assert read_manifest(main, victim) is None
    (other,) = [r for r in trial_runs("lr-resume") if r.name != victim]
    assert other.state.type == StateType.COMPLETED
    other_result = (work / "runs" / other.name / TRAIN_RESULT_FILE).stat().st_mtime_ns

    rc, output = finish(run_sweep(api, config))
    TIMINGS["kill + re-run sweep (wall)"] = time.monotonic() - started
    assert rc == 0, output[-6000:]
    runs = trial_runs("lr-resume")
    assert sorted(r.name for r in runs) == sorted([victim, f"{victim}.1", other.name])  # no new run for `other`
    resumed = next(r for r in runs if r.name == f"{victim}.1")
    assert resumed.state.type == StateType.COMPLETED
    assert (work / "runs" / other.name / TRAIN_RESULT_FILE).stat().st_mtime_ns == other_result
    result = json.loads((work / "runs" / victim / TRAIN_RESULT_FILE).read_text())
    assert result["resumed_from"] in checkpoint_steps and result["steps"] == 20
    assert any(f"resuming from step {result['resumed_from']}" in line for line in logs(resumed.id))

    # The resumed trial's per-step losses equal the uninterrupted run of the same configuration (first sweep).
    config_of = {r.name: read_manifest(stores(endpoint, "lr-rank")[1], r.name)["config"] for r in first_sweep["runs"]}
    victim_config = read_manifest(staging, victim)["config"]
    (reference,) = [
        name
        for name, cfg in config_of.items()
        if cfg["training"] == victim_config["training"] and cfg["lora"] == victim_config["lora"]
    ]
    assert [step for step, *_ in losses(work, victim)] == list(range(21))  # every step, resumed ones included
    assert losses(work, victim) == losses(first_sweep["work"], reference)
    # These trials repeat configurations of the first sweep: none strictly beats its winner, so nothing changes.
    champion = read_champion(main)
    assert champion["run_id"] in config_of, champion
    assert "none passed the gate, nothing promoted" in output or "not promoted" in output, output[-2000:]
