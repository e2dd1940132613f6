"""Against moto's HTTP server on 127.0.0.1, through a fault-injecting proxy: real sockets, real resets."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import pytest
from s3faults import FaultPlan, FaultProxy, make_bundle, moto_server, no_backoff, on, raw_client  # noqa: F401 (a fixture)

from finetune.config import StorageConfig
from finetune.layout import CHAMPION_KEY
from finetune.publishing import (
    fetch_bundle,
    gc,
    list_runs,
    manifest_key,
    promote_if_better,
    publish_run,
    read_champion,
    read_manifest,
)
from finetune.store import StorageError, VerificationError, check_reachable, open_store

MAX_ATTEMPTS = 3
STEP_ATTEMPTS = 2
FIELDS = {"evaluation": {"metric": "val_loss", "score": 2.0, "higher_is_better": False}}


@pytest.fixture
def bucket(moto_server):
    name = f"ft-{uuid.uuid4().hex[:12]}"
    client = raw_client(f"http://{moto_server[0]}:{moto_server[1]}", key="direct")
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name, client


@pytest.fixture
def plan():
    return FaultPlan()


@pytest.fixture
def proxy(moto_server, plan, monkeypatch):
    no_backoff(monkeypatch)
    with FaultProxy(moto_server, plan) as proxy:
        yield proxy


def make_cfg(proxy: FaultProxy, bucket: str, **kw) -> StorageConfig:
    base = dict(
        uri=f"s3://{bucket}/team",
        endpoint_url=proxy.url,
        region="us-east-1",
        addressing_style="path",
        access_key_id="testing",
        secret_access_key="testing",
        max_attempts=MAX_ATTEMPTS,
        step_attempts=STEP_ATTEMPTS,
        step_retry_wait_seconds=0,
        multipart_threshold_mib=5,
        multipart_chunk_mib=5,
        max_concurrency=2,
    )
    return StorageConfig(**{**base, **kw})


def versions(client, bucket: str, key: str) -> int:
    return len(client.list_object_versions(Bucket=bucket, Prefix=f"team/{key}").get("Versions", []))


@pytest.fixture(scope="module")
def big_weights() -> bytes:
    return os.urandom(11 * 1024 * 1024)


def test_503_reset_and_delay_cost_exact_attempts(proxy, plan, bucket, tmp_path, big_weights):
    name, client = bucket
    plan.add(on("PutObject", "adapter_config.json"), "503", times=MAX_ATTEMPTS - 1)
    plan.add(on("UploadPart", "adapters.safetensors", partNumber="1"), "reset", times=1)
    plan.add(on("UploadPart", "adapters.safetensors", partNumber="3"), "delay", times=1, delay=0.3)
    store = open_store(make_cfg(proxy, name))
    published = publish_run(store, "r", make_bundle(tmp_path / "b", weights=big_weights), FIELDS)
    assert plan.attempts("PutObject", "adapter_config.json") == MAX_ATTEMPTS
    assert plan.attempts("UploadPart", "adapters.safetensors", partNumber="1") == 2
    assert plan.attempts("UploadPart", "adapters.safetensors", partNumber="3") == 1
    assert plan.attempts("PutObject", "manifest.json") == 1
    key = "team/" + published.manifest["files"]["adapters.safetensors"]["key"]
    assert client.get_object(Bucket=name, Key=key)["Body"].read() == big_weights


def test_reset_after_commit_on_manifest_and_pointer(proxy, plan, bucket, tmp_path):
    name, client = bucket
    plan.add(on("PutObject", "manifest.json"), "lost")
    plan.add(on("PutObject", CHAMPION_KEY), "lost")
    store = open_store(make_cfg(proxy, name))
    published = publish_run(store, "r", make_bundle(tmp_path / "b"), FIELDS)
    decision = promote_if_better(store, "r", 1.0, metric="val_loss", higher_is_better=False)
    assert decision.promoted and read_champion(store)["run_id"] == "r"
    assert read_manifest(store, "r")["attempt_id"] == published.attempt_id
    assert plan.attempts("PutObject", "manifest.json") == 2
    assert plan.attempts("PutObject", CHAMPION_KEY) == 2
    assert versions(client, name, manifest_key("r")) == 1
    assert versions(client, name, CHAMPION_KEY) == 1


@pytest.mark.parametrize("first_champion", [False, True])
def test_reset_after_commit_on_every_attempt_of_manifest_and_pointer(proxy, plan, bucket, tmp_path, first_champion):
    """Every PUT commits and every response is lost: botocore gives up with a connection error (not a 412),
    and the re-read finds our manifest and our pointer, so publishing and promotion succeed."""
    name, client = bucket
    store = open_store(make_cfg(proxy, name))
    if not first_champion:  # an If-Match swap of an existing champion, not the first If-None-Match write
        publish_run(store, "old", make_bundle(tmp_path / "old", weights=b"old"), FIELDS)
        assert promote_if_better(store, "old", 2.0, metric="val_loss", higher_is_better=False).promoted
    plan.add(on("PutObject", "manifest.json"), "lost", times=None)
    plan.add(on("PutObject", CHAMPION_KEY), "lost", times=None)
    published = publish_run(store, "r", make_bundle(tmp_path / "b"), FIELDS)
    decision = promote_if_better(store, "r", 1.0, metric="val_loss", higher_is_better=False)
    assert decision.promoted and read_champion(store)["run_id"] == "r"
    assert read_manifest(store, "r")["attempt_id"] == published.attempt_id
    assert plan.attempts("PutObject", "runs/r/manifest.json") == MAX_ATTEMPTS  # botocore gave up on all of them
    assert plan.attempts("PutObject", CHAMPION_KEY) == MAX_ATTEMPTS + (not first_champion)
    assert versions(client, name, manifest_key("r")) == 1
    assert versions(client, name, CHAMPION_KEY) == (1 if first_champion else 2)


def test_an_error_with_nothing_written_still_fails(proxy, plan, bucket, tmp_path):
    name, _ = bucket
    plan.add(on("PutObject", "manifest.json"), "reset", times=None)  # reset before forwarding: never committed
    store = open_store(make_cfg(proxy, name))
    with pytest.raises(StorageError):
        publish_run(store, "r", make_bundle(tmp_path / "b"), FIELDS)
    assert read_manifest(store, "r") is None


def test_response_slower_than_read_timeout(proxy, plan, bucket, tmp_path):
    """The first manifest PUT reaches the server after the client gave up on it; still one manifest."""
    name, client = bucket
    plan.add(on("PutObject", "manifest.json"), "delay", times=1, delay=1.5)
    store = open_store(make_cfg(proxy, name, read_timeout=1))
    published = publish_run(store, "r", make_bundle(tmp_path / "b"), FIELDS)
    time.sleep(1.0)  # let the delayed request land
    assert plan.attempts("PutObject", "manifest.json") == 2
    assert versions(client, name, manifest_key("r")) == 1
    assert read_manifest(store, "r")["attempt_id"] == published.attempt_id


def test_corrupted_part_is_caught_by_read_back_and_reuploaded(proxy, plan, bucket, tmp_path, big_weights):
    # moto stores the client's checksum without checking it (real S3 would answer BadDigest),
    # so only reading the object back can see the flipped byte.
    name, client = bucket
    plan.add(on("UploadPart", "adapters.safetensors", partNumber="2"), "corrupt", times=1)
    store = open_store(make_cfg(proxy, name, verify_read_back=True))
    published = publish_run(store, "r", make_bundle(tmp_path / "b", weights=big_weights), FIELDS)
    assert plan.attempts("UploadPart", "adapters.safetensors", partNumber="2") == 2  # one per step
    key = "team/" + published.manifest["files"]["adapters.safetensors"]["key"]
    assert client.get_object(Bucket=name, Key=key)["Body"].read() == big_weights


def test_corruption_that_persists_publishes_nothing(proxy, plan, bucket, tmp_path):
    name, client = bucket
    plan.add(on("PutObject", "adapters.safetensors"), "corrupt", times=None)
    store = open_store(make_cfg(proxy, name, verify_read_back=True))
    with pytest.raises(VerificationError, match="does not match"):
        publish_run(store, "r", make_bundle(tmp_path / "b"), FIELDS)
    assert read_manifest(store, "r") is None


def test_stored_checksum_mismatch_via_proxy(proxy, plan, bucket, tmp_path):
    name, _ = bucket
    plan.add(on("HeadObject", "adapters.safetensors"), "bad_checksum", times=None)
    store = open_store(make_cfg(proxy, name))
    with pytest.raises(VerificationError, match="stored CRC32"):
        publish_run(store, "r", make_bundle(tmp_path / "b"), FIELDS)
    assert read_manifest(store, "r") is None


def test_no_secret_in_logs_output_or_objects(proxy, plan, bucket, tmp_path, capfd):
    """Marker credentials travel to the server (checked) but appear in no log line, output or object."""
    name, client = bucket
    key_id, secret, token = "AKIAMARKERKEYID00001", "MARKER/secret+value/0001", "MARKERSESSIONTOKEN0001"
    cfg = make_cfg(proxy, name, access_key_id=key_id, secret_access_key=secret, session_token=token)
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect(level=logging.INFO)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s %(exc_text)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # the project's log level, botocore and boto3 included
    errors: list[str] = []
    try:
        plan.add(on("PutObject", "adapter_config.json"), "503", times=1)  # retry paths log too
        store = open_store(cfg)
        check_reachable(store)
        publish_run(store, "r", make_bundle(tmp_path / "b"), {**FIELDS, "config": {"storage": {"uri": cfg.uri}}})
        promote_if_better(store, "r", 1.0, metric="val_loss", higher_is_better=False)
        list_runs(store)
        fetch_bundle(f"{store.uri}/champion", tmp_path / "cache", cfg)
        gc(store, older_than=__import__("datetime").timedelta(0))
        for bad in (
            lambda: check_reachable(open_store(cfg, "s3://no-such-bucket-here")),
            lambda: fetch_bundle("s3://no-such-bucket-here/runs/x", tmp_path / "c2", cfg),
        ):
            try:
                bad()
            except StorageError as exc:
                errors.append(str(exc))
                logging.getLogger("finetune").exception("expected failure")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    out, err = capfd.readouterr()

    sent = [req.headers.get("authorization", "") + req.headers.get("x-amz-security-token", "") for req, _ in plan.seen]
    assert any(key_id in s for s in sent) and any(token in s for s in sent)  # the markers were really used
    assert len(errors) == 2 and records
    stored = []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=name):
        for v in page.get("Versions", []):
            obj = client.get_object(Bucket=name, Key=v["Key"], VersionId=v["VersionId"])
            stored.append(obj["Body"].read().decode("latin-1") + json.dumps(obj["Metadata"]))
    cached = [p.read_bytes().decode("latin-1") for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    haystacks = {
        "logs": records,
        "stdout": [out],
        "stderr": [err],
        "errors": errors,
        "objects": stored,
        "cache": cached,
    }
    for where, texts in haystacks.items():
        for text in texts:
            for marker in (key_id, secret, token, "MARKER"):
                assert marker not in text, f"{marker} leaked into {where}: {text[:200]}"


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter with non-zero weights for the tiny model, in mlx-lm's on-disk format."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_dir))
    model.freeze()
    params = {"rank": 4, "scale": 20.0, "dropout": 0.0}
    linear_to_lora_layers(model, 2, params)
    mx.random.seed(0)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params})
    )
    return out


def test_published_bundle_loads_and_generates_from_a_clean_cache(moto_server, bucket, tiny_model_dir, tmp_path):
    from mlx_lm import generate, load

    name, _ = bucket
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    cfg = StorageConfig(
        uri=f"s3://{name}/team",
        endpoint_url=f"http://{moto_server[0]}:{moto_server[1]}",
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    )
    store = open_store(cfg)
    publish_run(store, "tiny-run", adapter, {"base_model": {"id": str(tiny_model_dir)}})
    fetched = fetch_bundle(f"s3://{name}/team/runs/tiny-run", tmp_path / "clean-cache", cfg)
    assert fetched.is_relative_to(tmp_path / "clean-cache")

    prompt = "What is the capital of France?"
    outputs = []
    for adapter_path in (adapter, fetched):
        model, tokenizer = load(str(tiny_model_dir), adapter_path=str(adapter_path))
        outputs.append(generate(model, tokenizer, prompt, max_tokens=12))
    base_model, tokenizer = load(str(tiny_model_dir))
    base = generate(base_model, tokenizer, prompt, max_tokens=12)
    assert outputs[0] == outputs[1]
    assert outputs[1] != base  # the adapter really is applied


def test_finetune_generate_with_an_s3_adapter(moto_server, bucket, tiny_model_dir, tmp_path, monkeypatch):
    """``finetune generate --adapter s3://…/runs/<id>`` from a clean work dir equals generating from the local adapter."""
    from typer.testing import CliRunner

    from finetune.cli import app
    from finetune.config import load_settings
    from finetune.pipeline.stages import generate_text

    name, _ = bucket
    endpoint = f"http://{moto_server[0]}:{moto_server[1]}"
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    env = {
        "FINETUNE_STORAGE__ENDPOINT_URL": endpoint,
        "FINETUNE_STORAGE__REGION": "us-east-1",
        "FINETUNE_STORAGE__ACCESS_KEY_ID": "testing",
        "FINETUNE_STORAGE__SECRET_ACCESS_KEY": "testing",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(overrides=[f"work_dir={tmp_path / 'local-work'}"])
    publish_run(open_store(settings.storage, f"s3://{name}/team"), "cli-run", adapter, {})
    prompt = "What is the capital of Peru?"
    expected = generate_text(settings, prompt, str(adapter), str(tiny_model_dir), 12)
    assert expected.strip()  # something to compare

    clean = tmp_path / "clean-work"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--adapter",
            f"s3://{name}/team/runs/cli-run",
            "--model",
            str(tiny_model_dir),
            "--max-tokens",
            "12",
            "--set",
            f"work_dir={clean}",
            prompt,
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == expected.strip()
    assert list((clean / "cache" / "bundles").rglob("adapters.safetensors"))
