"""The CLI: help everywhere, and bad input fails with one line naming the problem before anything is written."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from finetune.cli import app


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = app(list(args), standalone_mode=False)
    out, err = capsys.readouterr()
    return code or 0, out, err


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["demo"],
        ["run"],
        ["train"],
        ["evaluate"],
        ["generate"],
        ["tiny-model"],
        ["sweep"],
        ["data", "check"],
        ["runs", "list"],
        ["runs", "show"],
        ["champion"],
        ["promote"],
        ["gc"],
    ],
)
def test_help_everywhere(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        app([*command, "--help"])
    assert exit_info.value.code == 0
    assert "Usage" in capsys.readouterr().out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "training.iterz=5"], "unknown config key 'training.iterz'"),
        (["--set", "training.iters=lots"], "config key 'training.iters'"),
        (["--set", "dataset.source=missing.jsonl"], "dataset.source 'missing.jsonl': no such file or directory"),
        (["-c", "nope.yaml"], "config file nope.yaml: not found"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(capsys, workdir, args, expected):
    code, out, err = run_cli(capsys, "run", *args, "--set", "storage.uri=store")
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (workdir / "store").exists()
    assert not (workdir / ".finetune").exists()


def test_unreachable_storage_fails_before_training(capsys, workdir):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    code, out, err = run_cli(
        capsys,
        "run",
        "--set",
        "storage.uri=s3://finetune-bucket/runs",
        "--set",
        f"storage.endpoint_url={endpoint}",
        "--set",
        "storage.max_attempts=1",
        "--set",
        "storage.connect_timeout=1",
    )
    assert code == 2
    assert "s3://finetune-bucket" in err and len(err.strip().splitlines()) == 1, err
    assert not (workdir / ".finetune" / "runs").exists()


def test_tiny_model_command(capsys, workdir):
    code, out, err = run_cli(capsys, "tiny-model", "m")
    assert code == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in Path("m").iterdir()
    }
