"""The Store interface on both backends: S3 through moto in-process and a local directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from moto import mock_aws
from s3faults import raw_client

from finetune.config import StorageConfig
from finetune.store import (
    LocalStore,
    NotFoundError,
    PreconditionFailed,
    S3Store,
    StorageError,
    UnsafeKeyError,
    VerificationError,
    check_reachable,
    download_uri,
    file_digest,
    open_store,
    parse_uri,
    redact_url,
    safe_key,
)

BUCKET = "finetune-test"


@pytest.fixture
def aws():
    with mock_aws():
        raw_client().create_bucket(Bucket=BUCKET)
        yield


def s3_cfg(**kw) -> StorageConfig:
    return StorageConfig(uri=f"s3://{BUCKET}/some/prefix", region="us-east-1", addressing_style="path", **kw)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        yield open_store(StorageConfig(uri=f"file://{tmp_path}/store"))
    else:
        with mock_aws():
            raw_client().create_bucket(Bucket=BUCKET)
            yield open_store(s3_cfg(multipart_threshold_mib=5, multipart_chunk_mib=5))


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "..", "./a", "a/.hidden", "a\\b", "a\nb", "x" * 1025])
def test_unsafe_keys_are_refused(key):
    with pytest.raises(UnsafeKeyError):
        safe_key(key)


def test_plain_keys_pass():
    assert safe_key("runs/r1/attempts/a1/adapters.safetensors") == "runs/r1/attempts/a1/adapters.safetensors"


def test_parse_uri_forms():
    assert parse_uri("s3://b-1/p/q/") == ("s3", "b-1", "p/q")
    assert parse_uri("s3://b-1") == ("s3", "b-1", "")
    assert parse_uri("file:///tmp/x") == ("local", "/tmp/x", "")
    assert parse_uri("relative/dir") == ("local", "relative/dir", "")
    with pytest.raises(StorageError, match="missing bucket"):
        parse_uri("s3://")
    with pytest.raises(StorageError, match="unsupported scheme"):
        parse_uri("gs://bucket/x")


def test_redact_url_drops_userinfo():
    assert redact_url("http://user:pw@minio:9000/x") == "http://minio:9000/x"
    assert redact_url("http://127.0.0.1:9000") == "http://127.0.0.1:9000"


def test_round_trip_and_listing(store, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * 1024 * 1024))  # multipart on S3 (5 MiB parts)
    digest = store.put_file("a/big.bin", src)
    store.verify("a/big.bin", digest)
    store.put_bytes("a/small.json", b'{"x": 1}')
    assert store.get_bytes("a/small.json") == b'{"x": 1}'
    out = store.get_file("a/big.bin", tmp_path / "out" / "big.bin")
    assert file_digest(out) == digest
    assert [i.key for i in store.list("a/")] == ["a/big.bin", "a/small.json"]
    assert [i.size for i in store.list("a/")] == [src.stat().st_size, 8]
    assert store.exists("a/small.json") and not store.exists("a/nope")
    store.delete("a/small.json")
    store.delete("a/small.json")  # deleting twice is fine
    assert [i.key for i in store.list()] == ["a/big.bin"]
    with pytest.raises(NotFoundError):
        store.get_bytes("a/small.json")


def test_conditional_writes(store):
    etag = store.put_bytes("p.json", b"1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("p.json", b"2", if_none_match=True)
    data, read_etag = store.get_with_etag("p.json")
    assert (data, read_etag) == (b"1", etag)
    new_etag = store.put_bytes("p.json", b"3", if_match=read_etag)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("p.json", b"4", if_match=read_etag)
    assert store.get_with_etag("p.json") == (b"3", new_etag)
    with pytest.raises(NotFoundError):
        store.put_bytes("missing.json", b"x", if_match=etag)
    assert store.get_with_etag("missing.json") is None


def test_verify_catches_a_different_object(store, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(b"abc")
    digest = store.put_file("f.bin", src)
    store.put_bytes("f.bin", b"abd")  # same size, different content
    with pytest.raises(VerificationError):
        store.verify("f.bin", digest)


def test_unsafe_key_never_reaches_the_backend(store):
    with pytest.raises(UnsafeKeyError):
        store.put_bytes("../escape", b"x")


def test_local_store_writes_atomically_and_hides_temp_files(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.put_bytes("k/v.json", b"1")
    assert (tmp_path / "s" / "k" / "v.json").read_bytes() == b"1"
    assert [i.key for i in store.list()] == ["k/v.json"]
    assert list((tmp_path / "s" / ".tmp").iterdir()) == []


def test_s3_uri_and_repr_name_no_secrets(aws):
    cfg = s3_cfg(endpoint_url="http://user:pw@localhost:9000", access_key_id="AKIDMARKER", secret_access_key="SKMARKER")
    store = open_store(cfg)
    assert isinstance(store, S3Store)
    assert store.uri == f"s3://{BUCKET}/some/prefix"
    shown = repr(store) + store._where()
    assert "pw@" not in shown and "localhost:9000" in shown
    for text in (shown, repr(cfg), str(cfg.model_dump())):
        assert "AKIDMARKER" not in text and "SKMARKER" not in text


def test_half_set_credentials_are_a_config_error():
    with pytest.raises(StorageError, match="must be set together"):
        open_store(s3_cfg(access_key_id="only-the-id"))


def test_check_reachable_names_the_problem(aws, tmp_path):
    check_reachable(open_store(s3_cfg()))
    with pytest.raises(StorageError, match=r"^storage.uri s3://no-such-bucket/x: bucket not found$"):
        check_reachable(open_store(s3_cfg(), "s3://no-such-bucket/x"))
    check_reachable(open_store(StorageConfig(uri=str(tmp_path / "new" / "store"))))
    assert not (tmp_path / "new").exists()  # checking writes nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is not a directory"):
        check_reachable(open_store(StorageConfig(uri=str(tmp_path / "file" / "store"))))


def test_check_reachable_unreachable_endpoint():
    # Port 9 on localhost refuses connections; one attempt keeps the test fast.
    cfg = s3_cfg(
        endpoint_url="http://127.0.0.1:9",
        max_attempts=1,
        connect_timeout=1,
        access_key_id="testing",
        secret_access_key="testing",
    )
    with pytest.raises(StorageError, match="cannot connect to the endpoint"):
        check_reachable(open_store(cfg))


def test_download_uri(aws, tmp_path):
    raw_client().put_object(Bucket=BUCKET, Key="data/train.jsonl", Body=b"{}\n")
    cfg = s3_cfg()
    assert download_uri(cfg, f"s3://{BUCKET}/data/train.jsonl", tmp_path).read_bytes() == b"{}\n"
    target = download_uri(cfg, f"s3://{BUCKET}/data/train.jsonl", tmp_path / "sub" / "t.jsonl")
    assert target == tmp_path / "sub" / "t.jsonl" and target.read_bytes() == b"{}\n"
    local = download_uri(cfg, f"file://{target}", tmp_path / "copy.jsonl")
    assert local.read_bytes() == b"{}\n"
    with pytest.raises(NotFoundError):
        download_uri(cfg, f"s3://{BUCKET}/data/missing.jsonl", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.jsonl", "sub", "train.jsonl"]  # no temp left


def test_when_required_mode_still_verifies_by_reading_back(aws, tmp_path):
    store = open_store(s3_cfg(checksum_mode="when_required"))
    src = tmp_path / "f.bin"
    src.write_bytes(b"hello")
    digest = store.put_file("f.bin", src)
    assert store.head("f.bin").crc32 is None  # nothing sent, nothing stored
    store.verify("f.bin", digest)
    raw_client().put_object(Bucket=BUCKET, Key="some/prefix/f.bin", Body=b"hellp", Metadata={"sha256": digest.sha256})
    with pytest.raises(VerificationError, match="content sha256"):
        store.verify("f.bin", digest)


def test_list_of_missing_local_root_is_empty(tmp_path):
    assert LocalStore(Path(tmp_path / "nope")).list() == []


def test_missing_credentials_are_named(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg = s3_cfg(endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(StorageError, match="no usable credentials"):
        check_reachable(open_store(cfg))
