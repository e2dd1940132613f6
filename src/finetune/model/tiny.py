"""A tiny random-init Llama with a byte-level BPE tokenizer and a chat template.

Built deterministically in seconds from the bundled demo data, so the demo and
the tests run offline. It loads with plain ``mlx_lm.load(path)``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from finetune.fsutil import atomic_dir

BUILTIN_PREFIX = "builtin:"
TINY_NAME = "tiny-llama"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the layout Qwen and many others use; generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCH = {
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
VOCAB_SIZE = 512
BUILD_VERSION = "1"  # bump when the builder's output changes


def _corpus() -> list[str]:
    texts = []
    data = resources.files("finetune.demo_data")
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        for line in data.joinpath(name).read_text(encoding="utf-8").splitlines():
            for message in json.loads(line)["messages"]:
                texts.append(f"{message['role']}\n{message['content']}")
    return texts


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def build_tiny_model(out_dir: Path | str, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and tokenizer files to ``out_dir`` atomically."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tokenizer = _train_tokenizer()
        tokenizer.save(str(tmp / "tokenizer.json"))
        vocab_size = tokenizer.get_vocab_size()
        eos_id = tokenizer.token_to_id("<|im_end|>")
        config = {**ARCH, "vocab_size": vocab_size, "eos_token_id": eos_id, "finetune_tiny_version": BUILD_VERSION}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "eos_token": "<|im_end|>",
                    "pad_token": "<|endoftext|>",
                    "bos_token": None,
                    "unk_token": None,
                    "model_max_length": ARCH["max_position_embeddings"],
                    "chat_template": CHAT_TEMPLATE,
                },
                indent=2,
            )
        )
        (tmp / "special_tokens_map.json").write_text(
            json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
        )
        mx.random.seed(seed)
        model = llama.Model(llama.ModelArgs.from_dict(config))
        weights = dict(tree_flatten(model.parameters()))
        mx.eval(weights)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out_dir


def ensure_tiny_model(cache_dir: Path | str) -> Path:
    """The cached tiny model under ``cache_dir``, built on first use."""
    path = Path(cache_dir) / f"{TINY_NAME}-v{BUILD_VERSION}"
    if not (path / "model.safetensors").is_file():
        build_tiny_model(path)
    return path
