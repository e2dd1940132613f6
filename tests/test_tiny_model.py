"""The tiny demo/test model: deterministic, and a plain mlx-lm model with a chat template."""

from __future__ import annotations

import mlx_lm
import pytest

from finetune.errors import ModelError
from finetune.fsutil import file_digest
from finetune.model.resolve import resolve_model
from finetune.model.tiny import build_tiny_model


def test_build_is_deterministic(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert file_digest(again / name) == file_digest(tiny_model_dir / name), name


def test_loads_with_mlx_lm_and_has_a_chat_template(tiny_model_dir):
    model, tokenizer = mlx_lm.load(str(tiny_model_dir))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_resolve_model(tmp_path, tiny_model_dir, monkeypatch):
    assert resolve_model(str(tiny_model_dir), None, tmp_path) == tiny_model_dir
    with pytest.raises(ModelError, match="unknown builtin model"):
        resolve_model("builtin:huge", None, tmp_path)
    with pytest.raises(ModelError, match="no such model directory"):
        resolve_model(str(tmp_path / "missing"), None, tmp_path)
    downloads = []

    def fake_download(ref, revision=None):
        downloads.append((ref, revision))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr("mlx_lm.utils._download", fake_download)
    got = resolve_model("mlx-community/Qwen2.5-0.5B-Instruct-4bit", "abc123", tmp_path)
    assert got == tmp_path / "snapshot"
    assert downloads == [("mlx-community/Qwen2.5-0.5B-Instruct-4bit", "abc123")]
