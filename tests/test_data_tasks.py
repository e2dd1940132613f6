"""Prefect data tasks: the tokenized cache is keyed on the version and its reuse shows in the log."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from finetune.config import DatasetConfig, TemplateConfig
from finetune.data import load_splits
from finetune.pipeline.results import TokenizedDataset
from tasks.data import TOKENIZED_FILE, _tokenized_cache_key


def write_rows(path: Path, n: int, changed: int | None = None) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"Capital {i}?"}, {"role": "assistant", "content": f"City {i}."}]}
        for i in range(n)
    ]
    if changed is not None:
        rows[changed]["messages"][1]["content"] = "Changed."
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cache_key_is_the_version_and_changes_when_the_file_is_gone(tmp_path: Path, tiny_model_dir: Path) -> None:
    from finetune.data import save_tokenized, tokenize_splits
    from finetune.data.templating import load_tokenizer

    splits = load_splits(DatasetConfig(source=str(write_rows(tmp_path / "d.jsonl", 20))), work_dir=tmp_path)
    params = {
        "dataset_dir": str(splits.directory),
        "model_path": str(tiny_model_dir),
        "template": TemplateConfig(),
        "on_bad_row": "fail",
        "work_dir": str(tmp_path),
    }
    data = tokenize_splits(splits, load_tokenizer(tiny_model_dir), TemplateConfig())
    before_build = _tokenized_cache_key(None, params)
    assert before_build.startswith(f"tokenized-{data.version}-")
    path = save_tokenized(tmp_path / "tokenized" / data.version / TOKENIZED_FILE, data)
    assert _tokenized_cache_key(None, params) == before_build == _tokenized_cache_key(None, params)
    path.unlink()  # e.g. the work dir was cleaned: a cached record must not point at it
    assert _tokenized_cache_key(None, params) != before_build
    other = _tokenized_cache_key(None, {**params, "template": TemplateConfig(max_seq_length=64)})
    assert not other.startswith(f"tokenized-{data.version}")


@pytest.mark.slow
def test_rerun_reuses_the_cached_tokenized_dataset_and_a_row_change_does_not(
    tmp_path: Path, tiny_model_dir: Path, prefect_api
) -> None:
    from prefect import flow
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from tasks.data import fetch_dataset, report_dataset, template_dataset

    @flow
    def data_flow(dataset: DatasetConfig, work_dir: str, run_dir: str):
        fetched = fetch_dataset(dataset, None, work_dir)
        state = template_dataset(
            fetched.directory, str(tiny_model_dir), TemplateConfig(), "fail", work_dir, return_state=True
        )
        tokenized = state.result()
        report_dataset(fetched.directory, tokenized.path, run_dir, 4)
        return state.name, tokenized

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    src = write_rows(tmp_path / "d.jsonl", 30)
    dataset = DatasetConfig(source=str(src))
    work = str(tmp_path / "work")
    try:
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "results"}):
            first_state, first = data_flow(dataset, work, str(tmp_path / "run1"))
            second_state, second = data_flow(dataset, work, str(tmp_path / "run2"))
            write_rows(src, 30, changed=7)
            third_state, third = data_flow(dataset, work, str(tmp_path / "run3"))
    finally:
        logger.removeHandler(handler)
    assert first_state == "Completed" and second_state == "Cached" and third_state == "Completed"
    # The cached result was read back from the JSON record Prefect persisted: the same typed record, not a dict.
    assert isinstance(second, TokenizedDataset) and isinstance(second.path, Path)
    assert second == first and third.version != first.version
    assert second.path.is_file() and not first.reused
    assert f"reusing cached tokenized dataset {first.version}" in records
    assert not any(third.version in r and "reusing" in r for r in records)
    assert (tmp_path / "run2" / "data_report.md").is_file()

    # What another process reads from the result storage (no in-memory cache): JSON that decodes to the record.
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    stored = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path / "results")))
    paths = sorted((tmp_path / "results").iterdir())
    raw = [json.loads(json.loads(p.read_text())["result"]) for p in paths]
    assert [r["__class__"] for r in raw] == ["finetune.pipeline.results.TokenizedDataset"] * 2
    assert {stored.read(p.name).result for p in paths} == {first, third}
