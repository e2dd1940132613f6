"""The tokenizer and chat template a GGUF file describes in its metadata, as Hugging Face tokenizer files.

transformers' GGUF tokenizer converter does the work (it needs no torch); we feed it metadata read
by ``mx.load`` rather than by its own reader, which imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type",
    "ggml.pre": "pre_tokenizer_type",
    "ggml.tokens": "tokens",
    "ggml.scores": "scores",
    "ggml.token_type": "token_type",
    "ggml.merges": "merges",
}
_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


@dataclass
class TokenizerInfo:
    """A ``tokenizers.Tokenizer`` plus the tokenizer_config.json that goes beside it."""

    tokenizer: Any  # tokenizers.Tokenizer
    config: dict[str, Any]

    def save(self, out_dir: Path) -> None:
        self.tokenizer.save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2))
        specials = {k: v for k, v in self.config.items() if k in _SPECIAL_IDS and v is not None}
        (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def tokenizer_from_metadata(architecture: str, metadata: dict[str, Any], context_length: int) -> TokenizerInfo:
    """Build the tokenizer; raises ValueError (the caller names the file) when the metadata lacks one."""
    from tokenizers import processors
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError("no tokenizer in the metadata (tokenizer.ggml.tokens missing)")
    spec = {
        name: _plain(metadata[f"tokenizer.{key}"])
        for key, name in _TOKENIZER_KEYS.items()
        if f"tokenizer.{key}" in metadata
    }
    tokens = spec["tokens"]
    tokenizer, _ = convert_gguf_tokenizer(architecture, spec)

    ids = {name: _plain(metadata.get(key)) for name, key in _SPECIAL_IDS.items()}
    ids = {name: i for name, i in ids.items() if i is not None and 0 <= i < len(tokens)}
    specials = {name: tokens[ids[name]] if name in ids else None for name in _SPECIAL_IDS}
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    add_bos = bool(_plain(metadata.get("tokenizer.ggml.add_bos_token", spec.get("tokenizer_type") == "llama")))
    add_eos = bool(_plain(metadata.get("tokenizer.ggml.add_eos_token", False)))
    # Decide BOS/EOS in the tokenizer itself, so every loader (transformers, mlx-lm, tokenizers) agrees.
    single, pair, used = "$A", "$A $B", []
    bos, eos = specials["bos_token"], specials["eos_token"]
    if add_bos and bos is not None:
        single, pair, used = f"{bos} {single}", f"{bos} $A {bos} $B", [(bos, ids["bos_token"])]
    if add_eos and eos is not None:
        single, pair = f"{single} {eos}", f"{pair} {eos}"
        used.append((eos, ids["eos_token"]))
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=used)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
    }
    if template := metadata.get("tokenizer.chat_template"):
        config["chat_template"] = template
    return TokenizerInfo(tokenizer=tokenizer, config=config)
