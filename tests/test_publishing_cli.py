"""The store commands, run through typer against a local store and moto's in-process S3."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import typer
from moto import mock_aws
from s3faults import make_bundle, raw_client
from typer.testing import CliRunner

from finetune.cli.store import parse_age, register
from finetune.config import StorageConfig
from finetune.publishing import promote_if_better, publish_run, read_champion
from finetune.store import open_store

FIELDS = {"evaluation": {"metric": "val_loss", "score": 1.5, "higher_is_better": False}}


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """finetune"""

    register(app)
    return app


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "store")
    else:
        with mock_aws():
            raw_client().create_bucket(Bucket="cli-bucket")
            yield "s3://cli-bucket/p"


def run(app, *args):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def populated(store_uri, tmp_path):
    store = open_store(StorageConfig(uri=store_uri, region="us-east-1"))
    publish_run(store, "run-a", make_bundle(tmp_path / "a", weights=b"a" * 64), FIELDS)
    publish_run(store, "run-b", make_bundle(tmp_path / "b", weights=b"b" * 64), FIELDS)
    promote_if_better(store, "run-a", 1.5, metric="val_loss", higher_is_better=False)
    store.put_bytes("runs/run-c/attempts/old/adapters.safetensors", b"x")
    return store


def test_runs_list_and_show(app, populated, store_uri):
    sets = ["--set", f"storage.uri={store_uri}", "--set", "storage.region=us-east-1"]
    listed = run(app, "runs", "list", *sets, "--json")
    assert listed.exit_code == 0, listed.output
    rows = {r["run_id"]: r for r in json.loads(listed.output)}
    assert rows["run-a"]["champion"] and rows["run-b"]["published"] and not rows["run-c"]["published"]
    table = run(app, "runs", "list", *sets)
    assert table.exit_code == 0 and "run-a" in table.output and "unpublished" in table.output
    shown = run(app, "runs", "show", "run-b", *sets)
    assert shown.exit_code == 0 and json.loads(shown.output)["run_id"] == "run-b"
    missing = run(app, "runs", "show", "run-c", *sets)
    assert missing.exit_code == 2 and "not published" in missing.output and "1 unpublished" in missing.output


def test_champion_promote_and_gc(app, populated, store_uri, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"storage:\n  uri: {store_uri}\n  region: us-east-1\n")
    shown = run(app, "champion", "-c", str(config))
    assert shown.exit_code == 0 and json.loads(shown.output)["run_id"] == "run-a"
    promoted = run(app, "promote", "run-b", "-c", str(config), "--reason", "better on review")
    assert promoted.exit_code == 0 and "champion: run-b (was run-a)" in promoted.output
    assert read_champion(populated)["reason"] == "better on review"
    refused = run(app, "promote", "run-c", "-c", str(config))
    assert refused.exit_code == 2 and "not published" in refused.output
    young = run(app, "gc", "-c", str(config), "--older-than", "1h")
    assert young.exit_code == 0 and "deleted 0 attempt(s)" in young.output
    dry = run(app, "gc", "-c", str(config), "--older-than", "0s", "--dry-run")
    assert "would delete attempt run-c/old" in dry.output and populated.exists(
        "runs/run-c/attempts/old/adapters.safetensors"
    )
    done = run(app, "gc", "-c", str(config), "--older-than", "0s")
    assert done.exit_code == 0 and "deleted 1 attempt(s), 1 object(s)" in done.output
    assert not populated.exists("runs/run-c/attempts/old/adapters.safetensors")


def test_empty_store_and_bad_input(app, tmp_path):
    sets = ["--set", f"storage.uri={tmp_path / 'empty'}"]
    assert "no champion yet" in run(app, "champion", *sets).output
    assert "no runs in" in run(app, "runs", "list", *sets).output
    bad = run(app, "gc", *sets, "--older-than", "soon")
    assert bad.exit_code != 0 and "expected a number" in bad.output
    unknown = run(app, "champion", "--set", "storage.nope=1")
    assert unknown.exit_code == 2 and "storage.nope" in unknown.output


def test_parse_age():
    assert parse_age("90s") == timedelta(seconds=90)
    assert parse_age("1.5h") == timedelta(minutes=90)
    assert parse_age("2w") == timedelta(days=14)
