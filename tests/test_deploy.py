"""Deployments without a server: the retrain decisions, prefect.yaml, serve, provisioning and the launchd agent."""

from __future__ import annotations

import fnmatch
import json
import os
import plistlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from s3faults import make_bundle

from deployments.project import HEARTBEAT_ENV, PREFECT_YAML, REPO, load_project
from deployments.provision import MISSED_HEARTBEATS, render_plist, zombie_automation
from finetune.config import ModelConfig, Settings, load_settings
from finetune.publishing import publish_run
from finetune.publishing.retrain import (
    base_model_ref,
    compare_with,
    format_duration,
    last_published,
    lateness,
)
from finetune.store import LocalStore
from tasks.schedule import SKIPPED_STATE, nothing_changed, training_slot_name, use_local_clone

SETTINGS = Settings()
BASE = base_model_ref(SETTINGS.model)


def publish(store: LocalStore, tmp_path: Path, run_id: str, dataset_version: str = "d1", **fields) -> dict:
    manifest = {
        "dataset_version": dataset_version,
        "config_fingerprint": SETTINGS.fingerprint(),
        "base_model": BASE,
        "metrics": {"candidate": {"val_loss": 1.0}},
        **fields,
    }
    return publish_run(store, run_id, make_bundle(tmp_path / run_id, weights=run_id.encode()), manifest).manifest


def set_mtime(store: LocalStore, run_id: str, when: datetime) -> None:
    path = store.root / "runs" / run_id / "manifest.json"
    os.utime(path, (when.timestamp(), when.timestamp()))


# ---------------------------------------------------------------- "nothing changed"


def unchanged(store: LocalStore, dataset_version: str, settings: Settings = SETTINGS) -> dict | None:
    """The last published manifest when this dataset version, the settings and the base model all equal its own."""
    comparison = compare_with(last_published(store), dataset_version, settings.fingerprint(), BASE)
    return comparison.previous if comparison.unchanged else None


def test_an_operational_change_does_not_retrain_and_a_hyperparameter_does(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    publish(store, tmp_path, "run-a")
    operational = load_settings(None, ["training.retries=9", "storage.read_timeout=3", "training.use_openblas=off"])
    assert unchanged(store, "d1", operational)["run_id"] == "run-a"
    hyperparameter = load_settings(None, ["training.learning_rate=0.01"])
    assert unchanged(store, "d1", hyperparameter) is None
    changes = compare_with(last_published(store), "d1", hyperparameter.fingerprint(), BASE).changes
    assert len(changes) == 1 and changes[0].startswith("configuration")


def test_nothing_published_means_train(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    assert last_published(store) is None
    comparison = compare_with(None, "d1", SETTINGS.fingerprint(), BASE)
    assert not comparison.unchanged and comparison.changes == ["nothing published yet"]
    assert unchanged(store, "d1") is None


def test_unchanged_since_the_last_published_run(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    publish(store, tmp_path, "run-a")
    previous = unchanged(store, "d1")
    assert previous is not None and previous["run_id"] == "run-a"


@pytest.mark.parametrize(
    ("dataset_version", "settings", "changed"),
    [
        ("d2", SETTINGS, "dataset version"),
        ("d1", Settings(training={"iters": 7}), "configuration"),
        ("d1", Settings(model={"path": "mlx-community/other"}), "base model"),
    ],
)
def test_any_change_means_train(tmp_path: Path, dataset_version: str, settings: Settings, changed: str) -> None:
    store = LocalStore(tmp_path / "store")
    publish(store, tmp_path, "run-a")
    comparison = compare_with(
        last_published(store), dataset_version, settings.fingerprint(), base_model_ref(settings.model)
    )
    assert not comparison.unchanged
    assert len(comparison.changes) == 1 + (changed == "base model")  # a new base model is also a new config
    assert any(change.startswith(changed) for change in comparison.changes)


def test_a_base_model_revision_is_a_change() -> None:
    pinned = base_model_ref(ModelConfig(path="builtin:tiny-llama", revision="abc123"))
    comparison = compare_with(
        {"run_id": "a", "dataset_version": "d1", "base_model": BASE, "config_fingerprint": "f"}, "d1", "f", pinned
    )
    assert comparison.changes == ["base model builtin:tiny-llama -> builtin:tiny-llama@abc123"]


def test_only_the_most_recent_publication_counts(tmp_path: Path) -> None:
    """Unchanged since an older run but not since the last one: the data moved on, then back; train."""
    store = LocalStore(tmp_path / "store")
    now = datetime.now(UTC)
    publish(store, tmp_path, "run-old", dataset_version="d1")
    publish(store, tmp_path, "run-new", dataset_version="d2")
    set_mtime(store, "run-old", now - timedelta(hours=2))
    set_mtime(store, "run-new", now - timedelta(hours=1))
    assert last_published(store)["run_id"] == "run-new"
    assert unchanged(store, "d1") is None
    assert unchanged(store, "d2")["run_id"] == "run-new"


def test_same_second_publications_are_ordered_by_manifest_time(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    publish(store, tmp_path, "run-b", dataset_version="d1", note="first")
    publish(store, tmp_path, "run-a", dataset_version="d2", note="second")
    same = datetime.now(UTC).replace(microsecond=0)
    for run_id in ("run-a", "run-b"):
        set_mtime(store, run_id, same)
    manifests = {m: json.loads((store.root / "runs" / m / "manifest.json").read_text()) for m in ("run-a", "run-b")}
    expected = max(manifests.values(), key=lambda m: (m["created"], m["run_id"]))["run_id"]
    assert last_published(store)["run_id"] == expected


def test_unpublished_attempts_are_not_publications(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("runs/crashed/attempts/x/adapters.safetensors", b"partial")
    store.put_bytes("runs/crashed/attempts/x/manifest.json", b"{}")  # a bundle file of that name, not the commit point
    assert last_published(store) is None


def test_skipped_result_is_a_completed_state_that_names_the_published_run(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    previous = publish(store, tmp_path, "run-a")
    state = nothing_changed(previous, "s3://bucket/ft/")
    assert state.is_completed() and state.name == SKIPPED_STATE
    assert "nothing changed since run run-a" in state.message and "force=true" in state.message
    result = state.data
    assert result["skipped"] is True and result["bundle_uri"] == "s3://bucket/ft/runs/run-a"
    assert result["metrics"] == previous["metrics"] and result["dataset_version"] == "d1"


# ---------------------------------------------------------------- late starts


def test_lateness() -> None:
    scheduled = datetime(2026, 1, 1, 2, 30, tzinfo=UTC)
    grace = timedelta(minutes=1)
    assert lateness(scheduled, scheduled + timedelta(seconds=59), grace) is None
    assert lateness(scheduled, scheduled - timedelta(hours=1), grace) is None
    assert lateness(scheduled, scheduled + timedelta(hours=7, minutes=5), grace) == timedelta(hours=7, minutes=5)
    assert format_duration(timedelta(days=1, hours=7, minutes=5, seconds=3)) == "1d 7h 5m"
    assert format_duration(timedelta(seconds=42)) == "42s"


# ---------------------------------------------------------------- the pull step


def test_pull_step_finds_the_clone_the_package_was_installed_from(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FINETUNE_REPO", raising=False)
    assert use_local_clone() == {"directory": str(REPO)}
    assert Path.cwd() == REPO


def test_pull_step_prefers_the_configured_clone(tmp_path: Path, monkeypatch) -> None:
    clone = tmp_path / "clone"
    (clone / "flows").mkdir(parents=True)
    (clone / "flows" / "finetune.py").write_text("")
    (clone / "prefect.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINETUNE_REPO", str(clone))
    assert use_local_clone() == {"directory": str(clone)}
    monkeypatch.chdir(tmp_path)
    assert use_local_clone(str(REPO)) == {"directory": str(REPO)}


def test_a_wrong_clone_setting_is_an_error_not_another_clone(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINETUNE_REPO", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere: not a clone.*check FINETUNE_REPO"):
        use_local_clone()
    assert Path.cwd() == tmp_path


# ---------------------------------------------------------------- prefect.yaml and serve


def test_prefect_yaml_deployments() -> None:
    project = load_project()
    assert project.pool == "mac-mlx" and project.heartbeat_seconds >= 30
    names = {d["name"]: d for d in project.deployments}
    assert set(names) == {"finetune", "retrain-nightly", "sweep-trial", "sweep"}
    for name in ("finetune", "retrain-nightly"):
        assert names[name]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    # Trials run side by side across the pool; the sweep itself waits on a queue of its own.
    assert "concurrency_limit" not in names["sweep-trial"] and "concurrency_limit" not in names["sweep"]
    assert names["sweep"]["work_pool"]["work_queue_name"] == "sweeps"
    assert names["sweep-trial"]["work_pool"]["work_queue_name"] == "default"
    nightly = names["retrain-nightly"]
    assert nightly["schedules"][0]["cron"] and nightly["schedules"][0]["timezone"]
    trigger = nightly["triggers"][0]
    assert trigger["expect"] == ["finetune.dataset.updated"]
    assert trigger["match"]["prefect.resource.id"] == "finetune.dataset." + nightly["parameters"]["dataset"]["source"]
    assert trigger["name"] == "finetune: retrain-nightly when its dataset is updated"
    raw = yaml.safe_load(PREFECT_YAML.read_text())
    (clone, install) = raw["pull"]
    assert clone["prefect.deployments.steps.git_clone"]["commit_sha"] == "{{ commit.stdout }}"
    assert install["prefect.deployments.steps.pip_install_requirements"]["directory"] == "{{ clone.directory }}"


def test_entrypoints_are_modules_so_the_finetune_package_stays_importable() -> None:
    """A file entrypoint (flows/finetune.py:...) registers the flow file as module `finetune`,
    shadowing the package: `from finetune import __version__` then fails inside the run."""
    import sys

    from prefect.flows import load_flow_from_entrypoint

    for spec in load_project().deployments:
        assert ".py" not in spec["entrypoint"], spec["entrypoint"]
        flow = load_flow_from_entrypoint(spec["entrypoint"])
        assert flow.name == ("finetune-sweep" if spec["name"] == "sweep" else "finetune-pipeline")
    from finetune import __version__  # noqa: F401

    assert Path(sys.modules["finetune"].__file__).parent.name == "finetune"


def test_flow_form_has_force() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune_pipeline

    properties = parameter_schema(finetune_pipeline).properties
    assert properties["force"]["default"] is False and properties["force"]["type"] == "boolean"
    assert {"dataset", "model", "training", "storage", "run_id", "fresh"} <= set(properties)


def test_serve_builds_the_same_deployments() -> None:
    from deployments.serve import runner_deployments

    project = load_project()
    served = {d.name: d for d in runner_deployments(project)}
    assert set(served) == {d["name"] for d in project.deployments} - {"sweep"}
    nightly_spec = next(d for d in project.deployments if d["name"] == "retrain-nightly")
    nightly = served["retrain-nightly"]
    schedule = nightly.schedules[0]
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.slug) == (
        nightly_spec["schedules"][0]["cron"],
        nightly_spec["schedules"][0]["timezone"],
        "nightly",
    )
    assert nightly.parameters == nightly_spec["parameters"]
    assert nightly.triggers[0].expect == {"finetune.dataset.updated"}
    for deployment in served.values():
        assert deployment.entrypoint == "flows.finetune.finetune_pipeline"
        if deployment.name == "sweep-trial":
            assert deployment.concurrency_limit is None
            continue
        assert deployment.concurrency_limit == 1
        assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"


# ---------------------------------------------------------------- provisioning


def test_zombie_automation_waits_three_heartbeats() -> None:
    automation = zombie_automation(60)
    trigger = automation.trigger
    assert trigger.posture.value == "Proactive" and trigger.within == timedelta(seconds=MISSED_HEARTBEATS * 60)
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    # Every later event of the run is a sign of life, custom final state names included (Skipped).
    for event in ("heartbeat", "Completed", "Skipped", "TimedOut", "Cancelled", "Crashed", "Paused"):
        assert any(fnmatch.fnmatchcase(f"prefect.flow-run.{event}", pattern) for pattern in trigger.expect), event
    assert trigger.for_each == {"prefect.resource.id"}
    assert automation.actions[0].state.value == "CRASHED"


def test_launchd_agent(tmp_path: Path) -> None:
    repo = tmp_path / "R&D finetune"  # XML-special characters must be escaped, not break the plist
    plist = plistlib.loads(render_plist("http://prefect.local:4200/api", "mac-mlx", repo).encode())
    args = plist["ProgramArguments"]
    assert args[0] == f"{repo}/.venv/bin/prefect" and args[1:3] == ["worker", "start"]
    assert args[args.index("--pool") + 1] == "mac-mlx" and args[args.index("--limit") + 1] == "1"
    env = plist["EnvironmentVariables"]
    assert env["PREFECT_API_URL"] == "http://prefect.local:4200/api" and env["FINETUNE_REPO"] == str(repo)
    assert "FINETUNE_TRAINING_SLOT" not in env  # the deployments' job variables set it for every worker
    assert plist["WorkingDirectory"] == str(repo) and plist["KeepAlive"] is True and plist["RunAtLoad"] is True
    assert training_slot_name(host="Studio-2.local") == "mlx-training-studio-2"
    assert training_slot_name("gpu-pool", host="Studio-2.local") == "gpu-pool"


def test_every_deployment_run_names_this_machines_training_slot() -> None:
    """Job variables reach the flow run's environment on any process worker, not only the launchd agent."""
    for spec in load_project().deployments:
        slot = spec["work_pool"]["job_variables"]["env"]["FINETUNE_TRAINING_SLOT"]
        assert training_slot_name(slot, host="m1.local") == "mlx-training-m1"


def test_heartbeat_setting_is_in_prefect_yaml() -> None:
    for spec in load_project().deployments:
        assert spec["work_pool"]["job_variables"]["env"][HEARTBEAT_ENV] == str(load_project().heartbeat_seconds)


def test_artifact_tables_have_four_significant_digits_and_no_blank_cells() -> None:
    from tasks.artifacts import MISSING, table

    history = [
        {"step": 5, "train_loss": 6.123456789, "learning_rate": 0.0019999999, "tokens_per_second": 12345.678},
        {"step": 10, "train_loss": 5.5, "val_loss": 5.6000001, "learning_rate": 2e-4},
    ]
    rows = table(history)
    assert rows[0] == {
        "step": 5,
        "train_loss": 6.123,
        "learning_rate": 0.002,
        "tokens_per_second": 12350.0,
        "val_loss": MISSING,
    }
    assert rows[1]["val_loss"] == 5.6 and rows[1]["tokens_per_second"] == MISSING
    assert [list(r) for r in rows] == [list(rows[0])] * 2


def test_bundle_links_open_in_a_browser_and_carry_no_credential(tmp_path) -> None:
    import urllib.request

    from moto.server import ThreadedMotoServer

    from finetune.config import StorageConfig
    from finetune.store import open_store
    from tasks.artifacts import bundle_link

    aws = StorageConfig(uri="s3://team-bucket/ft", access_key_id="AKIALINKMARKER", secret_access_key="s-marker")
    url, markdown = bundle_link(aws, "s3://team-bucket/ft/runs/r1")
    assert url == "https://s3.console.aws.amazon.com/s3/buckets/team-bucket?prefix=ft/runs/r1/"
    url, markdown = bundle_link(StorageConfig(uri=str(tmp_path)), f"{tmp_path}/runs/r1")
    assert url is None and f"`{tmp_path}/runs/r1`" in markdown
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        cfg = StorageConfig(
            uri="s3://link-test-bucket/ft",
            endpoint_url=f"http://{host}:{port}",
            region="us-east-1",
            access_key_id="AKIALINKMARKER",
            secret_access_key="s-marker",
            addressing_style="path",
        )
        store = open_store(cfg)
        store.client.create_bucket(Bucket="link-test-bucket")
        store.client.put_object(  # a bucket the team may read from its browsers
            Bucket="link-test-bucket", Key="ft/runs/r1/manifest.json", Body=b'{"run_id": "r1"}', ACL="public-read"
        )
        url, markdown = bundle_link(cfg, "s3://link-test-bucket/ft/runs/r1")
        with urllib.request.urlopen(url, timeout=10) as response:  # no credentials needed: none in the URL
            assert response.read() == b'{"run_id": "r1"}'
        assert f"]({url})" in markdown and "MARKER" not in url + markdown and "marker" not in url + markdown
    finally:
        server.stop()
