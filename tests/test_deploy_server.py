"""Deployments as a user runs them: a real Prefect server, moto's S3 server, `prefect deploy`, a process worker.

Tests run in file order and share one deployment and one worker. The worker starts
only after the event test, whose automation-created run must never execute (its
default parameters point at the checkout). `prefect deploy` runs in a clone of this
working tree whose origin is a local bare repository; the worker is a clean one: a
fresh virtual environment without finetune, in an empty directory, so every run
clones the deployed commit and installs it (prefect.yaml's pull steps).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import boto3
import pytest
from prefect import flow
from prefect.blocks.system import Secret
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.concurrency.sync import concurrency
from prefect.events import Event
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.states import Scheduled
from prefect_server import PrefectServer, api_of, client, drain_prefect_workers, wait_for  # noqa: E402
from s3faults import bucket_endpoint, moto_server  # noqa: F401  (module-scoped fixture)
from worker_env import clean_worker_python, deploying_clone, git, process_worker, worker_environment

from finetune.config import StorageConfig, load_settings  # noqa: E402
from finetune.publishing import fetch_bundle, read_manifest  # noqa: E402
from finetune.store import open_store  # noqa: E402
from tasks.schedule import MACHINE_SLOT, TRAINING_SLOT_ENV, training_slot, training_slot_name  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
BUCKET = "finetune-deploy-e2e"
PREFIX = "ft"
# Marker credentials: moto accepts anything, and a leak would be easy to spot.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIADEPLOYTESTMARKER",
    "AWS_SECRET_ACCESS_KEY": "deploy-test-secret-marker",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# The first run takes its credentials from a Prefect Secret block (storage.credentials_block).
BLOCK = "finetune-e2e-s3"
BLOCK_CREDENTIALS = {"access_key_id": "AKIABLOCKTESTMARKER", "secret_access_key": "block-test-secret-marker"}
# What a user might type into a parameter: refused, and stored nowhere.
PARAMETER_MARKER = "param-test-secret-marker"
MARKERS = [*CREDENTIALS.values()][:2] + [*BLOCK_CREDENTIALS.values(), PARAMETER_MARKER]
TIMINGS: dict[str, float] = {}


# ---------------------------------------------------------------- helpers


def read_run(run_id: UUID) -> FlowRun:
    with client() as c:
        return c.read_flow_run(run_id)


def wait_final(run_id: UUID, timeout: float) -> FlowRun:
    return wait_for(lambda: (run := read_run(run_id)).state.is_final() and run, timeout, f"flow run {run_id} to end")


def run_cli(server: PrefectServer, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PREFECT, *args],
        env=server.env(**env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def param_args(parameters: dict[str, Any]) -> list[str]:
    args = []
    for key, value in parameters.items():
        args += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return args


def storage(endpoint: str) -> dict[str, Any]:
    return {"uri": f"s3://{BUCKET}/{PREFIX}", "endpoint_url": endpoint, "region": "us-east-1"}


def parameters(work: Path, run_id: str, endpoint: str, **training: Any) -> dict[str, Any]:
    """Every section the run depends on, so that two deployments given these compute the same fingerprint."""
    return {
        "work_dir": str(work),
        "run_id": run_id,
        "dataset": {"source": "builtin:capitals"},
        "model": {"path": "builtin:tiny-llama"},
        "storage": storage(endpoint),
        "training": {"iters": 10, "steps_per_eval": 5, "steps_per_checkpoint": 5, "steps_per_report": 5, **training},
        "evaluation": {"max_examples": 4, "max_tokens": 8, "primary_metric": "val_loss"},
    }


def training_processes(request_file: Path) -> list[int]:
    """Pids of live training children for this run (by command line; `ps` exists on Linux and macOS)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    pids = []
    for line in out.splitlines():
        pid, stat, args = line.strip().split(None, 2)
        if "finetune.train.child" in args and str(request_file) in args and not stat.startswith("Z"):
            pids.append(int(pid))
    return pids


def alive(pid: int) -> bool:
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(out) and not out.startswith("Z")


def run_logs(run_id: UUID) -> list[str]:
    with client() as c:
        return [entry.message for entry in c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]


def logged(run_id: UUID, predicate: Callable[[str], bool], what: str, timeout: float = 30) -> str:
    """The first log line of the run that matches; logs and task runs reach the API in batches, after the state."""
    return wait_for(lambda: next(filter(predicate, run_logs(run_id)), None), timeout, what)


def seconds(start: datetime | None, end: datetime | None) -> float:
    return (end - start).total_seconds() if start and end else float("nan")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def report_timings() -> Iterator[None]:
    yield
    print("\n\ndeployment end-to-end phases (s):")
    for phase, value in TIMINGS.items():
        print(f"  {phase:<44} {value:7.1f}")


@pytest.fixture(scope="module", autouse=True)
def api(prefect_server: PrefectServer) -> Iterator[PrefectServer]:
    """This module's Prefect client calls go to the session's real server (module fixtures included)."""
    with api_of(prefect_server) as server:
        yield server


@pytest.fixture(scope="module")
def s3_endpoint(moto_server) -> Iterator[str]:  # noqa: F811
    with bucket_endpoint(moto_server, BUCKET, CREDENTIALS) as url:
        yield url


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> dict[str, Any]:
    """The clone `prefect deploy` runs in, its bare origin, and the commit it deploys."""
    clone, bare = deploying_clone(tmp_path_factory.mktemp("git"))
    return {"clone": clone, "origin": bare, "commit": git(clone, "rev-parse", "HEAD")}


@pytest.fixture(scope="module")
def deployed(prefect_server: PrefectServer, origin: dict[str, Any]) -> dict[str, UUID]:
    """`python -m deployments.provision` (creates the pool) then `prefect deploy --all`, from a clone."""
    TIMINGS["server start (fresh database)"] = prefect_server.startup_seconds
    started = time.monotonic()
    provision = subprocess.run(
        [sys.executable, "-m", "deployments.provision"],
        env=prefect_server.env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert provision.returncode == 0, provision.stdout + provision.stderr
    assert "work pool mac-mlx: created (process)" in provision.stdout
    TIMINGS["provision (pool, slot, automation)"] = time.monotonic() - started
    started = time.monotonic()
    clone = origin["clone"]
    deploy = subprocess.run(
        [PREFECT, "deploy", "--all"], env=prefect_server.env(), cwd=clone, capture_output=True, text=True, timeout=300
    )
    assert deploy.returncode == 0, deploy.stdout[-4000:] + deploy.stderr[-4000:]
    TIMINGS["prefect deploy --all"] = time.monotonic() - started
    # Pushed after the deployment: workers must keep running the deployed commit, not the branch's tip.
    (clone / "flows" / "finetune.py").write_text('raise RuntimeError("a later commit, never deployed")\n')
    git(clone, "commit", "-q", "-am", "a later commit, never deployed")
    git(clone, "push", "-q", "origin", "main")
    with client() as c:
        return {
            name: c.read_deployment_by_name(f"finetune-pipeline/{name}").id for name in ("finetune", "retrain-nightly")
        }


@pytest.fixture(scope="module")
def worker(deployed, prefect_server: PrefectServer, s3_endpoint: str, tmp_path_factory) -> Iterator[Path]:
    """`prefect worker start` on the pool, from a clean virtual environment in an empty directory; yields it."""
    root = tmp_path_factory.mktemp("worker")
    python = clean_worker_python(root)
    home = root / "home"
    home.mkdir()
    log = root / "worker.log"
    env = worker_environment(prefect_server.env, home, PREFECT_WORKER_QUERY_SECONDS="2", **CREDENTIALS)
    started = time.monotonic()

    def online() -> bool:
        with client() as c:
            return any(w.status.value == "ONLINE" for w in c.read_workers_for_work_pool("mac-mlx"))

    with process_worker(python, env, home, log) as process:
        wait_for(lambda: process.poll() is not None or online(), 180, "the worker to come online")
        assert process.poll() is None, log.read_text()[-4000:]
        TIMINGS["worker start until online"] = time.monotonic() - started
        yield root
    print(f"\nworker log tail:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def first_run(worker, prefect_server: PrefectServer, s3_endpoint: str, tmp_path_factory) -> dict[str, Any]:
    """`prefect deployment run 'finetune-pipeline/finetune' --param … --watch`, as a user types it."""
    work = tmp_path_factory.mktemp("work")
    params = parameters(work, "e2e-first", s3_endpoint)
    Secret(value=BLOCK_CREDENTIALS).save(BLOCK, overwrite=True)
    params["storage"]["credentials_block"] = BLOCK
    started = time.monotonic()
    run = run_cli(
        prefect_server, "deployment", "run", "finetune-pipeline/finetune", *param_args(params), "--watch", timeout=900
    )
    TIMINGS["deployment run --watch (wall)"] = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    flow_run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1))
    return {"id": flow_run_id, "params": params, "work": work, "stdout": run.stdout}


# ---------------------------------------------------------------- tests (file order matters: no worker yet)


def test_dataset_updated_event_creates_a_retrain_run(deployed, api: PrefectServer) -> None:
    nightly = deployed["retrain-nightly"]

    def runs() -> list[FlowRun]:
        with client() as c:
            return c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly])))

    assert runs() == []
    other = Event(
        event="finetune.dataset.updated", resource={"prefect.resource.id": "finetune.dataset.s3://other/x.jsonl"}
    )
    with client() as c:
        c.request("POST", "/events", json=[other.model_dump(mode="json")]).raise_for_status()
    started = time.monotonic()
    emit = run_cli(
        api, "event", "emit", "finetune.dataset.updated", "--resource-id", "finetune.dataset.builtin:capitals"
    )
    assert emit.returncode == 0, emit.stdout + emit.stderr
    try:
        created = wait_for(runs, 60, "the automation to create a retrain-nightly run", interval=0.5)
        TIMINGS["event emitted until run created"] = time.monotonic() - started
        time.sleep(2)  # the event for another dataset, sent first, must not have created one too
        created = runs()
        assert len(created) == 1, [r.name for r in created]
        run = created[0]
        assert run.created_by is not None and run.created_by.type == "AUTOMATION"
        assert run.parameters["dataset"] == {"source": "builtin:capitals"}
        assert run.state.type == StateType.SCHEDULED
    finally:
        with client() as c:  # never let a worker run it: its defaults write into the checkout
            for run in runs():
                c.delete_flow_run(run.id)


def test_deployments_are_stored_as_written(deployed, origin, api: PrefectServer) -> None:
    with client() as c:
        nightly = c.read_deployment(deployed["retrain-nightly"])
        on_demand = c.read_deployment(deployed["finetune"])
        automations = c.read_automations()
    (schedule,) = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.slug, schedule.active) == (
        "30 2 * * *",
        "Europe/Berlin",
        "nightly",
        True,
    )
    assert on_demand.schedules == []
    for deployment in (nightly, on_demand):
        assert deployment.work_pool_name == "mac-mlx"
        assert deployment.entrypoint == "flows.finetune.finetune_pipeline"
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
        clone, install = deployment.pull_steps
        assert clone["prefect.deployments.steps.git_clone"] == {
            "id": "clone",
            "repository": str(origin["origin"]),
            "commit_sha": origin["commit"],
        }
        assert install["prefect.deployments.steps.pip_install_requirements"]["directory"] == "{{ clone.directory }}"
        assert deployment.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60"
    assert nightly.parameters["dataset"] == {"source": "builtin:capitals"}
    assert on_demand.parameter_openapi_schema["properties"]["force"]["default"] is False
    names = {a.name: a for a in automations}
    assert "finetune: mark flow runs without heartbeats Crashed" in names
    trigger = names["finetune: retrain-nightly when its dataset is updated"].trigger
    assert trigger.expect == {"finetune.dataset.updated"}
    assert trigger.match.model_dump() == {"prefect.resource.id": "finetune.dataset.builtin:capitals"}


def test_deployment_run_publishes_a_verified_bundle(first_run, worker, api, s3_endpoint, tmp_path) -> None:
    run = read_run(first_run["id"])
    assert run.state.type == StateType.COMPLETED and run.state.name == "Completed"
    # The clean worker ran the deployed commit (not the later one on the branch), installed by the pull step.
    assert list(worker.glob("worker-venv/lib/python*/site-packages/finetune-*.dist-info"))
    # Relative paths resolve in the worker's directory (prefect.yaml's FINETUNE_WORKER_DIR), which outlives the run.
    assert (worker / "home" / "finetune-worker").is_dir()
    TIMINGS["worker pickup (created -> running)"] = seconds(run.created, run.start_time)
    TIMINGS["flow run (running -> completed)"] = seconds(run.start_time, run.end_time)

    cfg = StorageConfig(**storage(s3_endpoint))
    manifest = read_manifest(open_store(cfg), "e2e-first")
    assert manifest is not None
    # fetch_bundle checks every file against the manifest's sha256 before the directory appears.
    bundle = fetch_bundle(f"s3://{BUCKET}/{PREFIX}/runs/e2e-first", tmp_path / "cache", cfg)
    assert (bundle / "adapters.safetensors").is_file() and (bundle / "adapter_config.json").is_file()
    params = first_run["params"]
    sections = {k: v for k, v in params.items() if isinstance(v, dict)}
    expected = load_settings(overrides={"work_dir": params["work_dir"], **sections})
    assert manifest["config_fingerprint"] == expected.fingerprint()
    assert manifest["base_model"] == {"path": "builtin:tiny-llama", "revision": None}
    assert len(manifest["dataset_version"]) == 64
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in json.dumps(manifest)

    with client() as c:
        artifacts = c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[first_run["id"]]))
        )
    # The training child's progress reaches the run's log (what the UI shows), not just the worker's stdout.
    logged(first_run["id"], lambda line: line.startswith("training 10 steps"), "the training start in the run's log")
    logged(first_run["id"], lambda line: line.startswith("step 10: validation loss"), "validation progress in the log")
    # Keys carry the deployment's name: on-demand and nightly runs keep separate histories.
    by_key = {a.key.removeprefix("finetune-"): a for a in artifacts if a.key.startswith("finetune-")}
    assert by_key["evaluation-metrics"].type == "table"
    assert by_key["training-progress"].type == "progress" and float(by_key["training-progress"].data) == 100.0
    bundle = by_key["published-bundle"]
    assert f"s3://{BUCKET}/{PREFIX}/runs/e2e-first" in bundle.description
    assert f"{s3_endpoint}/{BUCKET}/{PREFIX}/runs/e2e-first/manifest.json" in bundle.data
    history = json.loads(by_key["training-history"].data)
    assert history and all(cell != "" and cell is not None for row in history for cell in row.values())
    assert all(len(repr(v)) <= 12 for row in history for v in row.values() if isinstance(v, float))
    plot = by_key["loss-curve"]
    assert plot.type == "markdown" and "(data:image/png;base64," in plot.data
    assert {"data-report", "evaluation-samples"} <= set(by_key)


def test_flow_run_sends_heartbeats(first_run, api) -> None:
    """What the zombie automation watches: the worker's flow process emits prefect.flow-run.heartbeat."""

    def heartbeats() -> int:
        with client() as c:
            page = c.read_events(
                EventFilter(
                    event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                    resource=EventResourceFilter(id=[f"prefect.flow-run.{first_run['id']}"]),
                ),
                limit=10,
            )  # the client's default (100) is above the server's maximum (50)
        return page.total

    assert wait_for(heartbeats, 30, "a heartbeat event of the first run") >= 1


def test_late_retrain_on_unchanged_data_is_skipped(first_run, deployed, api, s3_endpoint) -> None:
    """retrain-nightly, 3 h late (a Mac that slept), same data, model and config: Skipped, nothing trained."""
    params = {**first_run["params"], "run_id": "e2e-nightly"}
    scheduled = datetime.now(UTC) - timedelta(hours=3)
    with client() as c:
        run = c.create_flow_run_from_deployment(
            deployed["retrain-nightly"], parameters=params, state=Scheduled(scheduled_time=scheduled)
        )
    done = wait_final(run.id, 300)
    TIMINGS["skipped retrain: pickup (created -> running)"] = seconds(done.created, done.start_time)
    TIMINGS["skipped retrain: flow run"] = seconds(done.start_time, done.end_time)
    assert done.state.type == StateType.COMPLETED and done.state.name == "Skipped", done.state
    assert "nothing changed since run e2e-first" in done.state.message
    late = logged(run.id, lambda line: "after its scheduled time" in line, "the late-start warning")
    assert late.startswith("started 3h after its scheduled time"), late

    def task_names() -> set[str]:
        with client() as c:
            task_runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        return {t.name.rsplit("-", 1)[0] for t in task_runs}

    names = wait_for(lambda: "check-unchanged" in (names := task_names()) and names, 30, "the run's task runs")
    assert "fetch-dataset" in names and "train-adapter" not in names, names
    assert read_manifest(open_store(StorageConfig(**storage(s3_endpoint))), "e2e-nightly") is None


def test_cancelling_a_run_kills_its_training_process(worker, deployed, api, s3_endpoint, tmp_path) -> None:
    params = parameters(tmp_path, "e2e-cancel", s3_endpoint, iters=100_000)
    request_file = tmp_path / "runs" / "e2e-cancel" / "train-request.json"
    # Another training on this machine holds its slot (the name the worker's job variables give it):
    # the deployment run must wait for it, not train alongside.
    slot = training_slot_name(MACHINE_SLOT)
    with concurrency(slot, occupy=1, strict=True):
        with client() as c:
            run = c.create_flow_run_from_deployment(deployed["finetune"], parameters=params)
        logged(run.id, lambda line: line == f"waiting for training slot {slot}", "the run to wait for the slot", 300)
        time.sleep(5)
        assert training_processes(request_file) == [] and read_run(run.id).state.type == StateType.RUNNING
    pids = wait_for(lambda: training_processes(request_file), 120, "the training child to start once the slot is free")
    assert read_run(run.id).state.type == StateType.RUNNING
    cancelled_at = time.monotonic()
    cancel = run_cli(api, "flow-run", "cancel", str(run.id))
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    done = wait_final(run.id, 120)
    assert done.state.type == StateType.CANCELLED, done.state
    wait_for(lambda: not any(alive(pid) for pid in pids), 30, f"training processes {pids} to exit")
    TIMINGS["cancel until training process gone"] = time.monotonic() - cancelled_at
    assert training_processes(request_file) == []
    # Logged as what it is: a cancel, not "Crash detected!".
    logged(run.id, lambda line: line.startswith("Cancelled: "), "the cancel in the run's log")
    print("\ncancelled run's last log lines:\n  " + "\n  ".join(run_logs(run.id)[-6:]))
    assert not [line for line in run_logs(run.id) if "Crash detected" in line]


def test_on_demand_run_trains_even_if_nothing_changed(first_run, deployed, api) -> None:
    """The first run's exact configuration on the on-demand deployment: it goes on to train (it waits for
    the training slot, held here, which comes after the skip check); cancelled while it waits."""
    params = {**first_run["params"], "run_id": "e2e-on-demand"}
    with concurrency(training_slot_name(MACHINE_SLOT), occupy=1, strict=True):
        with client() as c:
            run = c.create_flow_run_from_deployment(deployed["finetune"], parameters=params)
        logged(run.id, lambda line: line.startswith("waiting for training slot"), "the run to go on to training", 300)
        cancel = run_cli(api, "flow-run", "cancel", str(run.id))
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        done = wait_final(run.id, 120)
    assert done.state.type == StateType.CANCELLED, done.state


def test_training_slot_is_this_machines_limit_created_on_first_use(deployed, api, monkeypatch) -> None:
    """prefect.yaml's slot template names this host's limit; a machine without one gets it on its first run."""
    slot = f"mlx-training-test-{uuid4().hex[:6]}-{{host}}"
    name = training_slot_name(slot)
    held: list[int] = []

    def active() -> int:
        with client() as c:
            return c.read_global_concurrency_limit_by_name(name).active_slots

    @flow(name="slot-probe")
    def probe() -> None:
        with training_slot():
            held.append(active())

    monkeypatch.setenv(TRAINING_SLOT_ENV, slot)
    probe()
    probe()
    assert held == [1, 1] and active() == 0
    with client() as c:
        assert c.read_global_concurrency_limit_by_name(name).limit == 1
        c.delete_global_concurrency_limit_by_name(name)


def test_credentials_are_not_flow_parameters(deployed, api, s3_endpoint) -> None:
    """No form field, and the server refuses a run whose parameters carry one (CLI and API alike)."""
    with client() as c:
        schema = c.read_deployment(deployed["finetune"]).parameter_openapi_schema
    storage_fields = set(schema["definitions"]["StorageOptions"]["properties"])
    assert "credentials_block" in storage_fields and not {"access_key_id", "secret_access_key"} & storage_fields
    for field in ("access_key_id", "secret_access_key", "session_token"):
        typed = {**storage(s3_endpoint), field: PARAMETER_MARKER}
        refused = run_cli(api, "deployment", "run", "finetune-pipeline/finetune", *param_args({"storage": typed}))
        assert refused.returncode != 0 and "Additional properties are not allowed" in refused.stdout + refused.stderr, (
            refused.stdout[-2000:]
        )
        with client() as c, pytest.raises(Exception, match="422|Validation"):
            c.create_flow_run_from_deployment(deployed["finetune"], parameters={"storage": typed})


def test_no_credential_reaches_the_server_or_the_store(first_run, api: PrefectServer, s3_endpoint) -> None:
    """Worker-environment, Secret-block and typed-in markers: none in the database, parameters, logs,
    artifacts or published objects (the block's value is stored encrypted)."""
    drain_prefect_workers()
    found: list[str] = []
    for path in api.home.rglob("*"):
        if path.is_file() and path.suffix != ".log":  # server.log is this test's own process output
            data = path.read_bytes()
            found += [f"{path.name}: {m}" for m in MARKERS if m.encode() in data]
    with client() as c:
        runs = c.read_flow_runs()
        artifacts = c.read_artifacts()
    texts = {
        "parameters": json.dumps([r.parameters for r in runs]),
        "logs": "\n".join(run_logs(first_run["id"])),
        "artifacts": json.dumps([(a.key, a.data, a.description) for a in artifacts], default=str),
    }
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for entry in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        texts[entry["Key"]] = s3.get_object(Bucket=BUCKET, Key=entry["Key"])["Body"].read().decode(errors="replace")
    found += [f"{where}: {m}" for where, text in texts.items() for m in MARKERS if m in text]
    assert len(texts) > 5 and len(texts["logs"]) > 1000 and found == []
    assert json.loads(texts["parameters"])  # the runs' parameters were read, the block's name among them
    assert BLOCK in texts["parameters"]
