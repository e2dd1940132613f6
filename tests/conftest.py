"""Shared fixtures: the tiny model is built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.data import TokenizedData, TokenizedSplit, save_tokenized
from finetune.data.templating import Encoded
from finetune.model.tiny import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


def tokenize_demo_subset(model_dir: Path, out_dir: Path, n_train: int, n_valid: int) -> Path:
    """The first rows of the demo data, tokenized for the tiny model (default dataset and template)."""
    from mlx_lm import load

    from finetune.config import load_settings
    from finetune.data import load_splits
    from finetune.data.templating import encode_chat

    settings = load_settings()
    _, tokenizer = load(str(model_dir))
    splits = load_splits(settings.dataset)
    data = {
        "train": [encode_chat(tokenizer, r["messages"], settings.template) for r in splits.train[:n_train]],
        "valid": [encode_chat(tokenizer, r["messages"], settings.template) for r in splits.valid[:n_valid]],
    }
    return write_tokenized(out_dir / "tokenized.safetensors", data)


@pytest.fixture(scope="session")
def small_tokenized(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training and 4 validation rows."""
    return tokenize_demo_subset(tiny_model_dir, tmp_path_factory.mktemp("data"), 16, 4)


@pytest.fixture(scope="session")
def medium_tokenized(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 training and 8 validation rows."""
    return tokenize_demo_subset(tiny_model_dir, tmp_path_factory.mktemp("data"), 64, 8)


def write_tokenized(path: Path, data: dict[str, list[Encoded]]) -> Path:
    """Pack encoded rows into the tokenized-data file the training child reads."""
    splits = {
        name: TokenizedSplit.from_encoded(rows) for name, rows in {"train": [], "valid": [], "test": [], **data}.items()
    }
    return save_tokenized(path, TokenizedData("test", "test", "", splits, {}))


@pytest.fixture(scope="session")
def prefect_api():
    """One real Prefect API for the whole session: a fresh server needs ~18 s to start on 2 cores."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# A real `prefect server start` per session, for deployments, workers and automations (tests/prefect_server.py).
from prefect_server import prefect_server, prefect_server_api  # noqa: E402,F401
