"""Publishing protocol on both backends: staging, write-once manifest, champion CAS, fetch, gc."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from moto import mock_aws
from s3faults import make_bundle, raw_client

from finetune.config import StorageConfig
from finetune.publishing import (
    AlreadyPublished,
    BundleError,
    PublishError,
    fetch_bundle,
    gc,
    list_runs,
    manifest_key,
    promote,
    promote_if_better,
    publish_run,
    read_champion,
    read_manifest,
    split_ref,
)
from finetune.store import LocalStore, file_digest, open_store

BUCKET = "finetune-test"
FIELDS = {
    "base_model": {"id": "tiny", "revision": None},
    "dataset_version": "abc",
    "evaluation": {"metric": "val_loss", "score": 2.0, "higher_is_better": False},
}


@pytest.fixture(params=["local", "s3"])
def cfg(request, tmp_path):
    if request.param == "local":
        yield StorageConfig(uri=str(tmp_path / "store"), step_retry_wait_seconds=0)
    else:
        with mock_aws():
            raw_client().create_bucket(Bucket=BUCKET)
            yield StorageConfig(uri=f"s3://{BUCKET}/team", region="us-east-1", step_retry_wait_seconds=0)


@pytest.fixture
def store(cfg):
    return open_store(cfg)


def test_publish_writes_staging_then_manifest(store, tmp_path):
    bundle = make_bundle(tmp_path / "b", extra={"plots/loss.png": b"png"})
    published = publish_run(store, "run-1", bundle, FIELDS)
    manifest = read_manifest(store, "run-1")
    assert manifest == published.manifest
    assert manifest["run_id"] == "run-1" and manifest["base_model"] == {"id": "tiny", "revision": None}
    assert set(manifest["files"]) == {"adapters.safetensors", "adapter_config.json", "metrics.json", "plots/loss.png"}
    # S3 reads the bundle from the attempt's prefix; a local store's run directory is the bundle itself.
    staged = f"runs/run-1/attempts/{published.attempt_id}/" if store.uri.startswith("s3://") else "runs/run-1/"
    for name, entry in manifest["files"].items():
        assert entry["key"] == staged + name
        assert entry["sha256"] == file_digest(bundle / name).sha256
        assert entry["size"] == (bundle / name).stat().st_size
        assert store.get_bytes(entry["key"]) == (bundle / name).read_bytes()
    assert published.uri == store.uri_for("runs/run-1")
    assert datetime.fromisoformat(manifest["created"]).tzinfo is not None


def test_second_attempt_with_other_content_is_refused(store, tmp_path):
    publish_run(store, "run-1", make_bundle(tmp_path / "a", weights=b"A" * 64), FIELDS)
    before = store.get_with_etag(manifest_key("run-1"))
    with pytest.raises(AlreadyPublished, match="already published"):
        publish_run(store, "run-1", make_bundle(tmp_path / "b", weights=b"B" * 64), FIELDS)
    assert store.get_with_etag(manifest_key("run-1")) == before
    # Identical content (a retried task after success) is not a second publication.
    again = publish_run(store, "run-1", tmp_path / "a", FIELDS)
    assert again.reused and store.get_with_etag(manifest_key("run-1")) == before


@pytest.mark.parametrize("name", ["adapters.bin", "model.pt", "weights.pkl", "x.npy"])
def test_pickle_format_files_are_never_published(store, tmp_path, name):
    bundle = make_bundle(tmp_path / "b", extra={name: b"\x80\x04"})
    with pytest.raises(BundleError, match="safetensors"):
        publish_run(store, "run-1", bundle, FIELDS)
    assert store.list() == []


def test_bad_inputs_are_refused_before_any_upload(store, tmp_path):
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(PublishError, match="run id"):
        publish_run(store, "../x", bundle, FIELDS)
    with pytest.raises(PublishError, match="reserved"):
        publish_run(store, "r", bundle, {"files": {}})
    (bundle / "adapters.safetensors").unlink()
    with pytest.raises(BundleError, match="missing adapters.safetensors"):
        publish_run(store, "r", bundle, FIELDS)
    assert store.list() == []


def test_manifest_must_be_plain_json_without_credentials(tmp_path):
    cfg = StorageConfig(uri=str(tmp_path / "s"), access_key_id="AKIDMARKER1", secret_access_key="SECRETMARKER1")
    store = open_store(cfg)
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(PublishError, match="credential"):
        publish_run(store, "r", bundle, {"config": {"oops": "SECRETMARKER1"}})
    with pytest.raises(PublishError, match="plain JSON"):
        publish_run(store, "r2", bundle, {"config": cfg.secret_access_key})
    assert read_manifest(store, "r") is None and read_manifest(store, "r2") is None


def test_promotion_needs_a_better_score_by_the_margin(store, tmp_path):
    for run in ("a", "b", "c"):
        publish_run(store, run, make_bundle(tmp_path / run, weights=run.encode() * 8), FIELDS)
    first = promote_if_better(store, "a", 2.0, metric="val_loss", higher_is_better=False, margin=0.1)
    assert first.promoted and first.previous is None
    close = promote_if_better(store, "b", 1.95, metric="val_loss", higher_is_better=False, margin=0.1)
    assert not close.promoted and read_champion(store)["run_id"] == "a"
    better = promote_if_better(store, "c", 1.5, metric="val_loss", higher_is_better=False, margin=0.1)
    assert better.promoted and better.previous["run_id"] == "a"
    pointer = read_champion(store)
    assert (pointer["run_id"], pointer["score"], pointer["previous"]["run_id"]) == ("c", 1.5, "a")
    assert pointer["manifest_key"] == "runs/c/manifest.json"


def test_higher_is_better_and_fresh_champion_scores(store, tmp_path):
    for run in ("a", "b"):
        publish_run(store, run, make_bundle(tmp_path / run, weights=run.encode() * 8), FIELDS)
    promote_if_better(store, "a", 0.5, metric="exact_match", higher_is_better=True)
    # Re-measured on today's inputs the champion scores 0.2, so 0.4 wins although 0.4 < 0.5.
    assert not promote_if_better(store, "b", 0.4, metric="exact_match", higher_is_better=True).promoted
    won = promote_if_better(store, "b", 0.4, metric="exact_match", higher_is_better=True, fresh_scores={"a": 0.2})
    assert won.promoted and read_champion(store)["run_id"] == "b"


def test_incomparable_or_nonfinite_scores_keep_the_champion(store, tmp_path):
    for run in ("a", "b"):
        publish_run(store, run, make_bundle(tmp_path / run, weights=run.encode() * 8), FIELDS)
    promote_if_better(store, "a", 2.0, metric="val_loss", higher_is_better=False)
    other = promote_if_better(store, "b", 0.9, metric="exact_match", higher_is_better=True)
    assert not other.promoted and "not comparable" in other.reason
    nan = promote_if_better(store, "b", float("nan"), metric="val_loss", higher_is_better=False)
    assert not nan.promoted and read_champion(store)["run_id"] == "a"
    missing = promote_if_better(store, "b", None, metric="val_loss", higher_is_better=False)
    assert not missing.promoted and "not finite" in missing.reason


def test_manual_promotion_and_unpublished_runs(store, tmp_path):
    for run in ("a", "b"):
        publish_run(store, run, make_bundle(tmp_path / run, weights=run.encode() * 8), FIELDS)
    promote_if_better(store, "a", 1.0, metric="val_loss", higher_is_better=False)
    decision = promote(store, "b")
    assert decision.promoted and read_champion(store)["run_id"] == "b"
    assert read_champion(store)["score"] == 2.0  # from b's manifest
    with pytest.raises(PublishError, match="not published"):
        promote(store, "nope")
    with pytest.raises(PublishError, match="not published"):
        promote_if_better(store, "nope", 0.0, metric="val_loss", higher_is_better=False)


def test_list_runs(store, tmp_path):
    assert list_runs(store) == []
    publish_run(store, "a", make_bundle(tmp_path / "a"), FIELDS)
    store.put_bytes("runs/b/attempts/x1/adapters.safetensors", b"x")  # an interrupted attempt
    promote(store, "a")
    runs = {r.run_id: r for r in list_runs(store)}
    assert runs["a"].published and runs["a"].champion and runs["a"].score == 2.0 and runs["a"].attempts == 1
    assert not runs["b"].published and not runs["b"].champion and runs["b"].attempts == 1


def test_gc_deletes_only_old_unreferenced_attempts(store, tmp_path):
    published = publish_run(store, "a", make_bundle(tmp_path / "a"), FIELDS)
    store.put_bytes("runs/a/attempts/failed-1/adapters.safetensors", b"x")
    store.put_bytes("runs/b/attempts/failed-2/adapters.safetensors", b"x")
    assert gc(store, timedelta(hours=1)).deleted_attempts == []  # too young
    later = datetime.now(UTC) + timedelta(hours=2)
    dry = gc(store, timedelta(hours=1), now=later, dry_run=True)
    assert sorted(dry.deleted_attempts) == ["a/failed-1", "b/failed-2"] and len(store.list("runs/b/")) == 1
    report = gc(store, timedelta(hours=1), now=later)
    # kept: the published attempt's staging files (a local store moved them into runs/a/ itself)
    kept = 1 if store.uri.startswith("s3://") else 0
    assert sorted(report.deleted_attempts) == ["a/failed-1", "b/failed-2"] and report.kept_attempts == kept
    keys = [i.key for i in store.list()]
    assert keys == sorted([*(e["key"] for e in published.manifest["files"].values()), "runs/a/manifest.json"])


def test_fetch_bundle_verifies_and_caches(store, cfg, tmp_path):
    bundle = make_bundle(tmp_path / "b")
    publish_run(store, "a", bundle, FIELDS)
    promote(store, "a")
    cache = tmp_path / "cache"
    for ref in (f"{store.uri}/runs/a", f"{store.uri}/champion", "runs/a", "champion"):
        out = fetch_bundle(ref, cache, cfg)
        # A local store's run directory is the bundle (verified in place); S3 bundles land in the cache.
        assert out == Path(store.uri) / "runs" / "a" if isinstance(store, LocalStore) else out.is_relative_to(cache)
        for name in ("adapters.safetensors", "adapter_config.json", "metrics.json"):
            assert (out / name).read_bytes() == (bundle / name).read_bytes()
    if isinstance(store, LocalStore):
        return
    # A damaged cached copy is detected and replaced.
    (out / "adapters.safetensors").write_bytes(b"\x01" * 64)
    again = fetch_bundle("runs/a", cache, cfg)
    assert (
        again == out and (out / "adapters.safetensors").read_bytes() == (bundle / "adapters.safetensors").read_bytes()
    )
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".partial")]


def test_fetch_refuses_tampered_objects(store, cfg, tmp_path):
    published = publish_run(store, "a", make_bundle(tmp_path / "b"), FIELDS)
    store.put_bytes(published.manifest["files"]["adapters.safetensors"]["key"], b"\x01" * 64)
    with pytest.raises(BundleError, match="does not match the manifest"):
        fetch_bundle("runs/a", tmp_path / "cache", cfg)
    assert not any(p.is_file() and p.suffix == ".safetensors" for p in (tmp_path / "cache").rglob("*"))


@pytest.mark.parametrize(
    ("name", "key", "message"),
    [
        ("../evil.safetensors", None, "unsafe"),
        ("/abs.json", None, "unsafe"),
        ("a//b.json", None, "unsafe"),
        ("adapters.bin", None, "safetensors"),
        ("x.json", "runs/other/attempts/z/x.json", "outside the run"),
        ("x.json", "runs/a/attempts/../../../x.json", "unsafe"),
    ],
)
def test_fetch_refuses_unsafe_manifests(store, cfg, tmp_path, name, key, message):
    published = publish_run(store, "a", make_bundle(tmp_path / "b"), FIELDS)
    manifest = dict(published.manifest)
    staging = f"runs/a/attempts/{published.attempt_id}/"
    manifest["files"] = {**manifest["files"], name: {"key": key or staging + "x", "sha256": "0" * 64, "size": 1}}
    store.delete(manifest_key("a"))
    store.put_bytes(manifest_key("a"), json.dumps(manifest).encode())
    with pytest.raises(BundleError, match=message):
        fetch_bundle("runs/a", tmp_path / "cache", cfg)
    assert not (tmp_path / "evil.safetensors").exists()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_fetch_local_bundle_dir_and_errors(cfg, tmp_path):
    bundle = make_bundle(tmp_path / "b")
    assert fetch_bundle(bundle, tmp_path / "cache", cfg) == bundle
    (bundle / "adapters.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="safetensors"):
        fetch_bundle(bundle, tmp_path / "cache", cfg)
    with pytest.raises(BundleError, match="no champion"):
        fetch_bundle("champion", tmp_path / "cache", cfg)
    with pytest.raises(BundleError, match="not published"):
        fetch_bundle("runs/missing", tmp_path / "cache", cfg)
    with pytest.raises(BundleError, match="expected a bundle directory"):
        fetch_bundle(str(tmp_path / "nothing-here"), tmp_path / "cache", cfg)


def test_split_ref():
    assert split_ref("s3://b/p/runs/r1") == ("s3://b/p", "r1")
    assert split_ref("s3://b/p/champion") == ("s3://b/p", None)
    assert split_ref("/data/store/runs/r1/") == ("/data/store", "r1")
    assert split_ref("champion") == ("", None)
    with pytest.raises(PublishError):
        split_ref("s3://b/runs/..")


def test_local_store_publish_survives_leftover_temp_files(tmp_path):
    store = open_store(StorageConfig(uri=str(tmp_path / "s")))
    (tmp_path / "s" / ".tmp").mkdir(parents=True)
    (tmp_path / "s" / ".tmp" / "stale").write_bytes(os.urandom(8))
    publish_run(store, "a", make_bundle(tmp_path / "b"), FIELDS)
    assert {r.run_id for r in list_runs(store)} == {"a"}


def test_gc_aborts_old_incomplete_uploads(store, cfg, tmp_path):
    if cfg.uri.startswith("s3://"):
        client = store.client
        client.create_multipart_upload(Bucket=BUCKET, Key="team/runs/x/attempts/a/adapters.safetensors")
        client.create_multipart_upload(Bucket=BUCKET, Key="elsewhere/big.bin")  # outside our prefix
        pending = lambda: {u["Key"] for u in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])}  # noqa: E731
    else:
        (tmp_path / "store" / ".tmp").mkdir(parents=True)
        (tmp_path / "store" / ".tmp" / "half-written").write_bytes(b"x")
        pending = lambda: {p.name for p in (tmp_path / "store" / ".tmp").iterdir()}  # noqa: E731
    if not cfg.uri.startswith("s3://"):  # moto reports every upload as initiated in 2010: no age to test there
        before = pending()
        assert gc(store, timedelta(hours=1)).aborted_uploads == 0 and pending() == before  # too young
    report = gc(store, timedelta(hours=1), now=datetime.now(UTC) + timedelta(hours=2))
    assert report.aborted_uploads == 1
    assert pending() == ({"elsewhere/big.bin"} if cfg.uri.startswith("s3://") else set())
