"""The tiny demo/test model: deterministic, and a plain mlx-lm model with a chat template."""

from __future__ import annotations

import mlx_lm
import pytest

from finetune.fsutil import sha256_file
from finetune.tiny_model import build_tiny_model, resolve_model_path


def test_build_is_deterministic(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert sha256_file(again / name) == sha256_file(tiny_model_dir / name), name


def test_loads_with_mlx_lm_and_has_a_chat_template(tiny_model_dir):
    model, tokenizer = mlx_lm.load(str(tiny_model_dir))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_resolve_model_path(tmp_path):
    assert resolve_model_path("mlx-community/Qwen2.5-0.5B-Instruct-4bit", tmp_path) == "mlx-community/Qwen2.5-0.5B-Instruct-4bit"
    with pytest.raises(ValueError, match="unknown builtin model"):
        resolve_model_path("builtin:huge", tmp_path)
