"""Tokenized data: versioning, the safetensors cache file, the data report and `finetune data check`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli.data import app
from finetune.config import DatasetConfig, TemplateConfig, load_settings
from finetune.data import (
    DataError,
    Splits,
    load_splits,
    read_tokenized,
    save_tokenized,
    tokenize_splits,
    tokenized_metadata,
)
from finetune.data.report import REPORT_JSON, REPORT_MD, build_report, report_markdown, write_report
from finetune.data.templating import chat_template_of, encode_row, load_tokenizer
from finetune.pipeline import stages


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(tiny_model_dir)


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def demo(tmp_path: Path) -> Splits:
    return load_splits(DatasetConfig(), work_dir=tmp_path / "work")


def test_tokenized_file_round_trips_to_the_same_encodings(tmp_path: Path, tokenizer) -> None:
    splits = demo(tmp_path)
    cfg = TemplateConfig(max_seq_length=64)
    data = tokenize_splits(splits, tokenizer, cfg)
    path = save_tokenized(tmp_path / "tok" / "tokens.safetensors", data)
    loaded = read_tokenized(path).encoded()
    assert {k: len(v) for k, v in loaded.items()} == splits.counts()
    assert loaded["valid"] == [encode_row(tokenizer, row, cfg) for row in splits.valid]
    meta = tokenized_metadata(path)
    assert meta["version"] == data.version and meta["dataset_version"] == splits.version()
    assert meta["chat_template"] == chat_template_of(tokenizer) and meta["stats"]["max_seq_length"] == 64
    assert b"pickle" not in path.read_bytes()[:2000] and path.read_bytes()[8:9] == b"{"  # safetensors JSON header


def test_tokenized_version_follows_rows_template_and_policy(tmp_path: Path, tokenizer) -> None:
    rows = [chat(f"Capital {i}?", f"City {i}.") for i in range(20)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = TemplateConfig()

    def version(**kw) -> str:
        splits = load_splits(DatasetConfig(source=str(src)), work_dir=tmp_path / "work")
        return tokenize_splits(splits, tokenizer, kw.pop("cfg", cfg), **kw).version

    first = version()
    assert version() == first
    assert version(cfg=TemplateConfig(system_prompt="Be brief.")) != first
    assert version(on_bad_row="skip") != first
    rows[3] = chat("Capital 3?", "Another city.")
    write_jsonl(src, rows)
    assert version() != first


def test_hand_built_encodings_pack_and_round_trip(tmp_path: Path) -> None:
    from finetune.data import TokenizedData, TokenizedSplit
    from finetune.data.templating import Encoded

    rows = [Encoded([5, 6, 7], [0, 1, 1]), Encoded([8, 9], [0, 1], truncated=True)]
    splits = {"train": TokenizedSplit.from_encoded(rows), "valid": TokenizedSplit.from_encoded(rows[:1])}
    splits["test"] = TokenizedSplit.from_encoded([])
    path = save_tokenized(tmp_path / "t.safetensors", TokenizedData("v", "d", "", splits, {}))
    assert read_tokenized(path).encoded() == {"train": rows, "valid": rows[:1], "test": []}


def test_reading_something_else_is_a_clear_error(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    other = tmp_path / "adapters.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(other))
    with pytest.raises(DataError, match="not a tokenized dataset"):
        read_tokenized(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 5)
    with pytest.raises(DataError, match="cannot read tokenized dataset"):
        read_tokenized(garbage)


def test_report_counts_duplicates_overlap_truncation_and_padding(tmp_path: Path, tokenizer) -> None:
    train = [chat(f"Capital {i}?", f"City {i}.") for i in range(12)] + [chat("Capital 0?", "City 0.")]
    train.append(chat("word " * 100, "Accra."))  # truncated at 64 tokens, but keeps no target: a bad row
    train.append(chat("Short?", "A long answer " * 20))  # truncated, keeps targets
    valid = [chat("Capital 1?", "City 1."), chat("Capital 2?", "A different answer."), chat("New?", "Yes.")]
    write_jsonl(tmp_path / "ds/train.jsonl", train)
    write_jsonl(tmp_path / "ds/valid.jsonl", valid)
    splits = load_splits(DatasetConfig(source=str(tmp_path / "ds"), test_fraction=0), work_dir=tmp_path / "work")
    data = tokenize_splits(splits, tokenizer, TemplateConfig(max_seq_length=64), on_bad_row="skip")
    report = build_report(splits, data, batch_size=4)
    assert report["rows"] == {"train": 15, "valid": 3, "test": 0}
    assert report["duplicates"]["train"] == 1
    assert report["overlap"]["valid_rows_in_train"] == 1 and report["overlap"]["valid_prompts_in_train"] == 2
    assert report["templating"]["zero_supervised_tokens"]["train"] == 1
    assert report["templating"]["truncated"]["train"] == 1
    assert report["tokens"]["train"]["rows"] == 14 and report["tokens"]["train"]["max"] == 64
    assert sum(report["length_histogram"]["counts"]["train"]) == 14
    waste = report["padding_waste"]
    assert 0 <= waste["length_sorted"] <= waste["file_order"] < 1
    md = report_markdown(report)
    assert "| train | 15 | 1 |" in md and "rows with no supervised token: 1" in md
    assert "train.jsonl:14: no supervised tokens" in md
    md_path, json_path = write_report(report, tmp_path / "run")
    assert md_path.name == REPORT_MD and json.loads(json_path.read_text())["dataset_version"] == splits.version()


def run_check(*args: str, model: Path, work_dir: Path):
    return CliRunner().invoke(app, ["check", *args, "--set", f"model.path={model}", "--set", f"work_dir={work_dir}"])


def test_data_check_prints_the_report(tmp_path: Path, tiny_model_dir: Path) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", [chat(f"Capital {i}?", f"City {i}.") for i in range(20)])
    work = tmp_path / "work"
    result = run_check(str(src), "--out", str(tmp_path / "out"), model=tiny_model_dir, work_dir=work)
    assert result.exit_code == 0, result.output
    assert "# Data report" in result.output and "| train | 16 | 0 |" in result.output
    assert (tmp_path / "out" / REPORT_JSON).is_file() and (tmp_path / "out" / REPORT_MD).is_file()
    as_json = run_check(str(src), "--json", "--rows-only", model=tiny_model_dir, work_dir=work)
    assert json.loads(as_json.output)["rows"] == {"train": 16, "valid": 2, "test": 2}

    # The check ran the run's own stages: a run on this data finds its rows and tokens already built.
    settings = load_settings(None, [f"dataset.source={src}", f"model.path={tiny_model_dir}", f"work_dir={work}"])
    fetched, tokens = stages.prepare_data(settings, tiny_model_dir)
    assert tokens.reused and fetched.version == json.loads(as_json.output)["dataset_version"]


def test_data_check_exit_codes_for_bad_rows(tmp_path: Path, tiny_model_dir: Path) -> None:
    lines = "".join(json.dumps(chat(f"Q{i}?", f"A{i}.")) + "\n" for i in range(10)) + '{"messages": []}\n'
    src = tmp_path / "bad.jsonl"
    src.write_text(lines)
    failed = run_check(str(src), model=tiny_model_dir, work_dir=tmp_path / "work")
    assert failed.exit_code == 2 and f"{src}:11: messages must be a non-empty list" in failed.output
    listed = run_check(str(src), "--keep-going", model=tiny_model_dir, work_dir=tmp_path / "work")
    assert listed.exit_code == 1 and f"- {src}:11: messages must be a non-empty list" in listed.output
    missing = run_check(str(tmp_path / "nope.jsonl"), model=tiny_model_dir, work_dir=tmp_path / "work")
    assert missing.exit_code == 2 and "no such file or directory" in missing.output
