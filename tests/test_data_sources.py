"""Dataset sources, formats, schemas, splitting and versioning."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import http.server
import io
import ipaddress
import json
import ssl
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from finetune.config import DatasetConfig, StorageConfig
from finetune.data import DataError, FetchError, RowFile, Splits, canonical_line, load_splits


def chat(i: int) -> dict:
    return {
        "messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(tmp_path: Path, source: Path | str, **kw) -> Splits:
    return load_splits(DatasetConfig(source=str(source), **kw), work_dir=tmp_path / "work")


def all_rows(splits: Splits) -> list[dict]:
    return [*splits.train, *splits.valid, *splits.test]


# ------------------------------------------------------------------ local sources and splitting


def test_one_file_is_split_by_seed_and_ratios_deterministically(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "data.jsonl", [chat(i) for i in range(100)])
    a = load(tmp_path, src)
    assert a.counts() == {"train": 80, "valid": 10, "test": 10}
    assert sorted(r["messages"][0]["content"] for r in all_rows(a)) == sorted(f"question {i}?" for i in range(100))
    b = load(tmp_path, src)
    assert b.version() == a.version() and b.directory == a.directory
    c = load(tmp_path, src, split_seed=1)
    assert c.version() != a.version() and c.counts() == a.counts()
    d = load(tmp_path, src, valid_fraction=0.2, test_fraction=0.0)
    assert d.counts() == {"train": 80, "valid": 20, "test": 0}
    assert a.sources["valid"] == "carved from train (seed 0)"


def test_directory_with_split_files_keeps_them_and_records_origins(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "ds/train.jsonl", [chat(i) for i in range(5)])
    write_jsonl(tmp_path / "ds/validation.jsonl", [chat(10), chat(11)])
    write_jsonl(tmp_path / "ds/test.jsonl", [chat(20)])
    splits = load(tmp_path, tmp_path / "ds")
    assert splits.counts() == {"train": 5, "valid": 2, "test": 1}
    assert list(splits.valid) == [chat(10), chat(11)]
    assert list(splits.origins("valid")) == [
        f"{tmp_path / 'ds'}/validation.jsonl:1",
        f"{tmp_path / 'ds'}/validation.jsonl:2",
    ]


def test_missing_test_file_is_carved_from_train_only(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "ds/train.jsonl", [chat(i) for i in range(20)])
    write_jsonl(tmp_path / "ds/valid.jsonl", [chat(100)])
    splits = load(tmp_path, tmp_path / "ds", test_fraction=0.25)
    assert splits.counts() == {"train": 15, "valid": 1, "test": 5}


def test_unnamed_shards_form_one_pool(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "ds/part-0.jsonl", [chat(i) for i in range(10)])
    write_jsonl(tmp_path / "ds/nested/part-1.jsonl", [chat(i) for i in range(10, 20)])
    (tmp_path / "ds/README.md").write_text("not data")
    splits = load(tmp_path, tmp_path / "ds")
    assert sum(splits.counts().values()) == 20


def test_a_file_of_unknown_split_next_to_split_files_is_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "ds/train.jsonl", [chat(1)])
    write_jsonl(tmp_path / "ds/extra.jsonl", [chat(2)])
    with pytest.raises(DataError, match=r"extra\.jsonl: cannot tell which split"):
        load(tmp_path, tmp_path / "ds")


def test_file_uri_and_builtin(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "my data.jsonl", [chat(i) for i in range(10)])
    splits = load(tmp_path, src.as_uri())
    assert sum(splits.counts().values()) == 10
    demo = load(tmp_path, "builtin:capitals")
    assert demo.counts() == {"train": 280, "valid": 32, "test": 32}


def test_archives_of_split_files(tmp_path: Path) -> None:
    train, valid = b"".join(canonical_line(chat(i)) + b"\n" for i in range(6)), canonical_line(chat(9)) + b"\n"
    with tarfile.open(tmp_path / "ds.tar.gz", "w:gz") as tar:
        for name, data in (("ds/train.jsonl", train), ("ds/valid.jsonl", valid), ("ds/._train.jsonl", b"junk")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(tmp_path / "ds.zip", "w") as zf:
        zf.writestr("ds/train.jsonl", train)
        zf.writestr("ds/valid.jsonl", valid)
        zf.writestr("__MACOSX/ds/._valid.jsonl", b"junk")
    from_tar, from_zip = load(tmp_path, tmp_path / "ds.tar.gz"), load(tmp_path, tmp_path / "ds.zip")
    assert from_tar.counts() == {"train": 5, "valid": 1, "test": 1}  # test carved from train
    assert from_tar.version() == from_zip.version()
    assert next(from_zip.origins("valid")) == f"{tmp_path / 'ds.zip'}!ds/valid.jsonl:1"


def test_unchanged_data_keeps_its_version_and_one_row_changes_it(tmp_path: Path) -> None:
    rows = [chat(i) for i in range(30)]
    src = write_jsonl(tmp_path / "data.jsonl", rows)
    first = load(tmp_path, src)
    assert load(tmp_path, src).version() == first.version()
    rows[17] = chat(1700)
    write_jsonl(src, rows)
    assert load(tmp_path, src).version() != first.version()
    # A list-backed Splits with the same rows has the same version.
    assert Splits(list(first.train), list(first.valid), list(first.test)).version() == first.version()


def test_splits_reopen_and_read_rows_on_demand(tmp_path: Path) -> None:
    splits = load(tmp_path, write_jsonl(tmp_path / "data.jsonl", [chat(i) for i in range(50)]))
    reopened = Splits.open(splits.directory)
    assert reopened.version() == splits.version() and reopened.schema == "chat"
    assert isinstance(reopened.train, RowFile)
    assert reopened.train[3] == list(reopened.train)[3] and reopened.train[-2:] == list(reopened.train)[-2:]


def test_without_work_dir_rows_live_in_a_temporary_directory(tmp_path: Path) -> None:
    import gc

    splits = load_splits(DatasetConfig(source=str(write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(10)]))))
    directory = splits.directory
    assert len(splits.train) == 8 and directory.is_dir()
    del splits
    gc.collect()
    assert not directory.exists()


# ------------------------------------------------------------------ formats


def pc_rows(n: int = 12) -> list[dict]:
    return [{"prompt": f"Capital no. {i}?", "completion": f'City {i}, "quoted", with comma'} for i in range(n)]


def write_format(path: Path, rows: list[dict]) -> Path:
    if path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    else:
        write_jsonl(path, rows)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".json"])
def test_every_format_yields_the_same_canonical_rows(tmp_path: Path, suffix: str) -> None:
    reference = load(tmp_path, write_format(tmp_path / "ref.jsonl", pc_rows()))
    other = load(tmp_path, write_format(tmp_path / f"data{suffix}", pc_rows()))
    assert other.version() == reference.version()
    assert other.train[0]["messages"][1]["content"].startswith("City")


def test_parquet_chat_rows_with_nested_messages(tmp_path: Path) -> None:
    rows = [chat(i) for i in range(10)]
    splits = load(tmp_path, write_format(tmp_path / "chat.parquet", rows))
    assert splits.version() == load(tmp_path, write_jsonl(tmp_path / "chat.jsonl", rows)).version()
    assert next(splits.origins("train")).endswith("chat.parquet: row 1")


def test_json_document_forms_and_row_positions(tmp_path: Path) -> None:
    holder = tmp_path / "holder.json"
    holder.write_text(json.dumps({"meta": "x", "rows": [chat(i) for i in range(10)]}), encoding="utf-8")
    assert sum(load(tmp_path, holder).counts().values()) == 10
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"text": "ok one"},\n  {"text": "ok two"},\n  {"text": 5}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: \[2\]: text must be a string, got int"):
        load(tmp_path, bad)
    jsonl_named_json = write_jsonl(tmp_path / "lines.json", [chat(i) for i in range(10)])
    assert sum(load(tmp_path, jsonl_named_json).counts().values()) == 10


def test_explicit_format_overrides_the_extension(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "data.txt", [chat(i) for i in range(10)])
    with pytest.raises(DataError, match="unknown file format; set dataset.format"):
        load(tmp_path, src)
    assert sum(load(tmp_path, src, format="jsonl").counts().values()) == 10


# ------------------------------------------------------------------ schemas


def test_prompt_completion_rows_become_chat_with_optional_system(tmp_path: Path) -> None:
    rows = [{"prompt": "Q?", "completion": "A.", "system": "Be brief."}] * 10
    row = load(tmp_path, write_jsonl(tmp_path / "pc.jsonl", rows)).train[0]
    assert row == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A."},
        ]
    }


def test_text_rows(tmp_path: Path) -> None:
    splits = load(tmp_path, write_jsonl(tmp_path / "t.jsonl", [{"text": f"Accra is in Ghana {i}."} for i in range(10)]))
    assert splits.schema == "text" and splits.train[0].keys() == {"text"}


def test_chat_rows_keep_tools_and_tool_messages(tmp_path: Path) -> None:
    row = {
        "tools": [{"type": "function", "function": {"name": "capital_of"}}],
        "messages": [
            {"role": "user", "content": "Capital of Ghana?", "weight": 1},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "capital_of", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "Accra", "tool_call_id": "1"},
            {"role": "assistant", "content": "Accra."},
        ],
    }
    got = load(tmp_path, write_jsonl(tmp_path / "tools.jsonl", [row] * 10)).train[0]
    assert got["tools"] == row["tools"]
    assert got["messages"][0] == {"role": "user", "content": "Capital of Ghana?"}  # unknown keys dropped
    assert got["messages"][1] == {"role": "assistant", "tool_calls": row["messages"][1]["tool_calls"]}


def test_field_map_for_a_csv_of_questions_and_answers(tmp_path: Path) -> None:
    rows = [{"question": f"Capital {i}?", "answer": f"City {i}."} for i in range(10)]
    src = write_format(tmp_path / "qa.csv", rows)
    with pytest.raises(DataError, match=r"qa\.csv:2: cannot tell the row schema.*dataset.field_map"):
        load(tmp_path, src)
    splits = load(tmp_path, src, field_map={"prompt": "question", "completion": "answer"})
    assert splits.schema == "prompt_completion"
    assert splits.train[0]["messages"][0]["content"].startswith("Capital")


def test_jinja_templates_map_alpaca_rows(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Name the capital.", "input": "Ghana", "output": "Accra"},
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
    ] * 5
    templates = {"prompt": "{{ instruction }}{% if input %}\n\n{{ input }}{% endif %}", "completion": "{{ output }}"}
    splits = load(
        tmp_path, write_jsonl(tmp_path / "alpaca.jsonl", rows), templates=templates, valid_fraction=0.5, test_fraction=0
    )
    prompts = {r["messages"][0]["content"] for r in all_rows(splits)}
    assert prompts == {"Name the capital.\n\nGhana", "Say hi."}
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match=r"missing\.jsonl:1: dataset.templates.prompt: 'input' is undefined"):
        load(tmp_path, missing, templates=templates)


def test_a_bad_jinja_template_names_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset.templates.prompt: invalid Jinja2 template"):
        load(tmp_path, write_jsonl(tmp_path / "x.jsonl", [chat(1)]), templates={"prompt": "{{ oops", "completion": "x"})


def test_templates_are_sandboxed(tmp_path: Path) -> None:
    rows = [{"q": "x", "a": "y"}] * 3
    templates = {"prompt": "{{ q.__class__.__mro__ }}", "completion": "{{ a }}"}
    with pytest.raises(DataError, match="dataset.templates.prompt"):
        load(tmp_path, write_jsonl(tmp_path / "s.jsonl", rows), templates=templates)


def test_schema_detected_from_the_first_row_holds_for_every_row(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "mixed.jsonl", [chat(1), {"text": "plain"}])
    with pytest.raises(
        DataError, match=r"mixed\.jsonl:2: missing field 'messages' for schema chat \(detected at .*mixed\.jsonl:1\)"
    ):
        load(tmp_path, src)


def test_hf_source_needs_the_datasets_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as when the hf extra is not installed
    with pytest.raises(DataError, match=r"hf:org/name: needs the datasets library: pip install 'finetune\[hf\]'"):
        load(tmp_path, "hf:org/name")


def test_unsupported_scheme_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unsupported scheme"):
        load(tmp_path, "ftp://example.com/x.jsonl")
    with pytest.raises(DataError, match="no such file or directory"):
        load(tmp_path, tmp_path / "nope.jsonl")


# ------------------------------------------------------------------ s3 (moto)


def test_s3_source_through_the_storage_layer(tmp_path: Path) -> None:
    import boto3
    from moto import mock_aws

    body = b"".join(canonical_line(chat(i)) + b"\n" for i in range(20))
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="datasets-bucket")
        s3.put_object(Bucket="datasets-bucket", Key="capitals/v1/data.jsonl", Body=body)
        storage = StorageConfig(region="us-east-1")
        cfg = DatasetConfig(source="s3://datasets-bucket/capitals/v1/data.jsonl")
        splits = load_splits(cfg, storage, tmp_path / "work")
        assert sum(splits.counts().values()) == 20
        assert next(splits.origins("train")).startswith("s3://datasets-bucket/capitals/v1/data.jsonl:")
        local = load(tmp_path, write_jsonl(tmp_path / "same.jsonl", [chat(i) for i in range(20)]))
        assert splits.version() == local.version()
        with pytest.raises(Exception, match="not found|NoSuchKey|404"):
            load_splits(DatasetConfig(source="s3://datasets-bucket/missing.jsonl"), storage, tmp_path / "work")


# ------------------------------------------------------------------ https (self-signed, 127.0.0.1)


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory):
    """An HTTPS server on 127.0.0.1 with a certificate made here; yields (base_url, cert_file, files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            if path == "/unavailable":
                self.send_error(503)
                return
            if path.startswith("/redirect"):  # /redirect/https/x.jsonl -> https://host:port/x.jsonl
                scheme, target = path.split("/", 3)[2:]
                self.send_response(302)
                self.send_header("Location", f"{scheme}://127.0.0.1:{self.server.server_address[1]}/{target}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if path not in files:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[path])))
            self.end_headers()
            self.wfile.write(files[path])

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert_file, files
    server.shutdown()
    server.server_close()


def test_https_source_streamed_and_checked_against_sha256(tmp_path: Path, https_server, monkeypatch) -> None:
    base, cert_file, files = https_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    body = b"".join(canonical_line(chat(i)) + b"\n" for i in range(20))
    files["/data/capitals.jsonl"] = body
    digest = hashlib.sha256(body).hexdigest()
    splits = load(tmp_path, f"{base}/data/capitals.jsonl?X-Signature=secret", sha256=digest)
    assert sum(splits.counts().values()) == 20
    origin = next(splits.origins("train"))
    assert origin.startswith(f"{base}/data/capitals.jsonl:") and "secret" not in origin
    with pytest.raises(DataError, match="does not match dataset.sha256") as err:
        load(tmp_path, f"{base}/data/capitals.jsonl?X-Signature=secret", sha256="0" * 64)
    assert "secret" not in str(err.value)
    with pytest.raises(DataError, match="over dataset.max_download_bytes=100"):
        load(tmp_path, f"{base}/data/capitals.jsonl", max_download_bytes=100)


def test_https_errors_are_classified_for_retries(tmp_path: Path, https_server, monkeypatch) -> None:
    base, cert_file, _ = https_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    with pytest.raises(DataError, match="HTTP 404") as not_found:
        load(tmp_path, f"{base}/missing.jsonl")
    assert not isinstance(not_found.value, FetchError)
    with pytest.raises(FetchError, match="HTTP 503"):
        load(tmp_path, f"{base}/unavailable")


def test_https_with_an_untrusted_certificate_is_refused(tmp_path: Path, https_server, monkeypatch) -> None:
    base, _, files = https_server
    files["/x.jsonl"] = canonical_line(chat(1)) + b"\n"
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(DataError, match="TLS certificate not trusted"):
        load(tmp_path, f"{base}/x.jsonl")


def test_https_redirects_stay_on_https(tmp_path: Path, https_server, monkeypatch) -> None:
    base, cert_file, files = https_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    files["/moved.jsonl"] = b"".join(canonical_line(chat(i)) + b"\n" for i in range(10))
    assert sum(load(tmp_path, f"{base}/redirect/https/moved.jsonl").counts().values()) == 10
    with pytest.raises(DataError, match="redirected to a non-https URL"):
        load(tmp_path, f"{base}/redirect/http/moved.jsonl")
