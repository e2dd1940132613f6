"""Fault matrix, in-process: moto's mock_aws with faults injected by a botocore before-send hook.

Each test states the fault, the HTTP attempts it must cost (botocore's standard retries,
``max_attempts`` per call; a whole step re-run only for what botocore does not retry) and
what the store must hold afterwards.
"""

from __future__ import annotations

import os

import pytest
from moto import mock_aws
from s3faults import FaultPlan, install_hook, make_bundle, no_backoff, on, raw_client

from finetune.config import StorageConfig
from finetune.layout import CHAMPION_KEY
from finetune.publishing import (
    AlreadyPublished,
    manifest_key,
    promote,
    promote_if_better,
    publish_run,
    read_champion,
    read_manifest,
)
from finetune.store import UploadGaveUp, VerificationError, open_store

BUCKET = "finetune-faults"
PREFIX = "p"
MAX_ATTEMPTS = 3
STEP_ATTEMPTS = 2
FIELDS = {"evaluation": {"metric": "val_loss", "score": 2.0, "higher_is_better": False}}


@pytest.fixture
def s3(monkeypatch):
    no_backoff(monkeypatch)
    with mock_aws():
        client = raw_client()
        client.create_bucket(Bucket=BUCKET)
        client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        yield client


@pytest.fixture
def cfg(s3):
    return StorageConfig(
        uri=f"s3://{BUCKET}/{PREFIX}",
        region="us-east-1",
        addressing_style="path",
        max_attempts=MAX_ATTEMPTS,
        step_attempts=STEP_ATTEMPTS,
        step_retry_wait_seconds=0,
        multipart_threshold_mib=5,
        multipart_chunk_mib=5,
        max_concurrency=2,
    )


@pytest.fixture
def plan():
    return FaultPlan()


@pytest.fixture
def store(cfg, plan):
    store = open_store(cfg)
    install_hook(store.client, plan)
    return store


@pytest.fixture(scope="module")
def big_weights() -> bytes:
    return os.urandom(11 * 1024 * 1024)  # three parts of 5 MiB


def versions(s3, key: str) -> int:
    return len(s3.list_object_versions(Bucket=BUCKET, Prefix=f"{PREFIX}/{key}").get("Versions", []))


def pending_uploads(s3) -> list:
    return s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])


def test_transient_503s_cost_exactly_the_configured_attempts(store, plan, s3, tmp_path):
    plan.add(on("PutObject", "adapter_config.json"), "503", times=MAX_ATTEMPTS - 1)
    published = publish_run(store, "r", make_bundle(tmp_path / "b"), FIELDS)
    assert plan.attempts("PutObject", "adapter_config.json") == MAX_ATTEMPTS
    assert plan.attempts("PutObject", "manifest.json") == 1
    assert read_manifest(store, "r")["attempt_id"] == published.attempt_id


def test_reset_on_a_part_is_absorbed_by_one_retry(store, plan, s3, tmp_path, big_weights):
    plan.add(on("UploadPart", "adapters.safetensors", partNumber="2"), "reset")
    published = publish_run(store, "r", make_bundle(tmp_path / "b", weights=big_weights), FIELDS)
    assert plan.attempts("UploadPart", "adapters.safetensors", partNumber="2") == 2
    assert plan.attempts("UploadPart", "adapters.safetensors") == 4
    key = published.manifest["files"]["adapters.safetensors"]["key"]
    assert store.get_bytes(key) == big_weights
    assert store.head(key).metadata["sha256"] == published.manifest["files"]["adapters.safetensors"]["sha256"]


def test_persistent_503_gives_up_after_attempts_times_steps(store, plan, s3, tmp_path):
    plan.add(on("PutObject", "adapter_config.json"), "503", times=None)
    with pytest.raises(UploadGaveUp):
        publish_run(store, "r", make_bundle(tmp_path / "b"), FIELDS)
    assert plan.attempts("PutObject", "adapter_config.json") == MAX_ATTEMPTS * STEP_ATTEMPTS
    assert read_manifest(store, "r") is None


def test_a_part_that_always_fails_aborts_the_upload(store, plan, s3, tmp_path, big_weights):
    plan.add(on("UploadPart", "adapters.safetensors", partNumber="2"), "503", times=None)
    with pytest.raises(UploadGaveUp):
        publish_run(store, "r", make_bundle(tmp_path / "b", weights=big_weights), FIELDS)
    assert plan.attempts("UploadPart", "adapters.safetensors", partNumber="2") == MAX_ATTEMPTS * STEP_ATTEMPTS
    assert plan.attempts("AbortMultipartUpload", "adapters.safetensors") == STEP_ATTEMPTS
    assert pending_uploads(s3) == []
    assert [i.key for i in store.list("runs/") if i.key.endswith("adapters.safetensors")] == []
    assert not store.exists(manifest_key("r"))


def test_lost_response_on_manifest_put_is_our_success(store, plan, s3, tmp_path):
    plan.add(on("PutObject", "manifest.json"), "lost")
    published = publish_run(store, "r", make_bundle(tmp_path / "b"), FIELDS)
    assert plan.attempts("PutObject", "manifest.json") == 2  # botocore's retry met our own write: 412
    assert versions(s3, manifest_key("r")) == 1
    assert read_manifest(store, "r")["attempt_id"] == published.attempt_id and not published.reused


@pytest.mark.parametrize("existing_champion", [False, True], ids=["create", "replace"])
def test_lost_response_on_pointer_put_is_our_success(store, plan, s3, tmp_path, existing_champion):
    publish_run(store, "a", make_bundle(tmp_path / "a", weights=b"a" * 64), FIELDS)
    publish_run(store, "b", make_bundle(tmp_path / "b", weights=b"b" * 64), FIELDS)
    if existing_champion:
        promote_if_better(store, "a", 2.0, metric="val_loss", higher_is_better=False)
    before, puts_before = versions(s3, CHAMPION_KEY), plan.attempts("PutObject", CHAMPION_KEY)
    plan.add(on("PutObject", CHAMPION_KEY), "lost")
    decision = promote_if_better(store, "b", 1.0, metric="val_loss", higher_is_better=False)
    assert decision.promoted and read_champion(store)["run_id"] == "b"
    assert plan.attempts("PutObject", CHAMPION_KEY) == puts_before + 2
    assert versions(s3, CHAMPION_KEY) == before + 1


def test_409_conflict_reruns_the_step_once(store, plan, s3, tmp_path):
    plan.add(on("PutObject", "manifest.json"), "409")
    plan.add(on("PutObject", CHAMPION_KEY), "409")
    publish_run(store, "r", make_bundle(tmp_path / "b"), FIELDS)
    promote(store, "r")
    # botocore does not retry 409. In-process moto still applies a request whose response the hook
    # replaced, so the manifest's re-read finds our own write and reconciles it without a second PUT;
    # the champion step is re-run once and its 412 reconciled.
    assert plan.attempts("PutObject", "manifest.json") == 1
    assert plan.attempts("PutObject", CHAMPION_KEY) == 2
    assert versions(s3, manifest_key("r")) == 1 and versions(s3, CHAMPION_KEY) == 1


def test_stored_checksum_mismatch_is_caught_and_nothing_published(store, plan, s3, tmp_path):
    plan.add(on("HeadObject", "adapters.safetensors"), "bad_checksum", times=None)
    with pytest.raises(VerificationError, match="stored CRC32"):
        publish_run(store, "r", make_bundle(tmp_path / "b"), FIELDS)
    assert plan.attempts("PutObject", "adapters.safetensors") == STEP_ATTEMPTS
    assert not store.exists(manifest_key("r")) and read_champion(store) is None


def test_one_bad_verification_is_repaired_by_reuploading(store, plan, s3, tmp_path):
    plan.add(on("HeadObject", "adapters.safetensors"), "bad_checksum", times=1)
    publish_run(store, "r", make_bundle(tmp_path / "b"), FIELDS)
    assert plan.attempts("PutObject", "adapters.safetensors") == 2
    assert read_manifest(store, "r") is not None


def test_republishing_a_published_run_is_refused(store, plan, s3, tmp_path):
    publish_run(store, "r", make_bundle(tmp_path / "a", weights=b"a" * 64), FIELDS)
    with pytest.raises(AlreadyPublished):
        publish_run(store, "r", make_bundle(tmp_path / "b", weights=b"b" * 64), FIELDS)
    assert versions(s3, manifest_key("r")) == 1
    assert plan.attempts("PutObject", "manifest.json") == 1


@pytest.mark.parametrize(("ours", "theirs", "winner"), [(1.0, 1.5, "ours"), (1.5, 1.0, "theirs")])
def test_competing_pointer_write_between_read_and_write(store, cfg, s3, tmp_path, ours, theirs, winner):
    """Deterministic interleaving: the competitor promotes right before our conditional PUT is sent."""
    for run in ("champ", "ours", "theirs"):
        publish_run(store, run, make_bundle(tmp_path / run, weights=run.encode() * 8), FIELDS)
    promote_if_better(store, "champ", 2.0, metric="val_loss", higher_is_better=False)
    competitor = open_store(cfg)  # its own client, without the hook
    fired = []

    def interleave(request, **kwargs):
        if request.method == "PUT" and request.url.endswith(CHAMPION_KEY) and not fired:
            fired.append(True)
            assert promote_if_better(competitor, "theirs", theirs, metric="val_loss", higher_is_better=False).promoted

    store.client.meta.events.register_first("before-send.s3", interleave)
    decision = promote_if_better(store, "ours", ours, metric="val_loss", higher_is_better=False)
    assert fired
    champion = read_champion(store)
    assert champion["run_id"] == winner and champion["score"] == min(ours, theirs)
    assert decision.promoted == (winner == "ours")
    if winner == "ours":
        assert champion["previous"]["run_id"] == "theirs"  # decided again against the new champion
    assert versions(s3, CHAMPION_KEY) == (3 if winner == "ours" else 2)


def test_a_refused_upload_is_not_retried(store, plan, s3, tmp_path, cfg):
    """403 is not transient: neither botocore nor the step retries it, and the error names the cause."""
    from finetune.store import StorageError

    def deny(request, **kwargs):
        from botocore.awsrequest import AWSResponse
        from moto.core.botocore_stubber import MockRawResponse

        if request.method == "PUT":
            body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            return AWSResponse(request.url, 403, {}, MockRawResponse(body))

    store.client.meta.events.register_first("before-send.s3", deny)
    with pytest.raises(StorageError, match="access denied") as err:
        publish_run(store, "r", make_bundle(tmp_path / "b"), FIELDS)
    assert not isinstance(err.value, UploadGaveUp)
    assert plan.attempts("PutObject") == 1
