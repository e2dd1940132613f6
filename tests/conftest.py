"""Shared fixtures: the tiny model is built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.tiny_model import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))
