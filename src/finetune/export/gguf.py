"""GGUF of a fused llama-family model, for llama.cpp, Ollama and LM Studio.

mlx-lm's exporter (``mlx_lm.gguf``) writes F16 only and a SentencePiece ("llama") vocabulary, so
byte-level BPE tokenizers (Llama 3, SmolLM2, the tiny model) come out wrong; we write with the
``gguf`` package instead and reuse mlx-lm's tensor naming and q/k row permutation. Like llama.cpp's
converter, q/k rows are permuted for GGML's adjacent-pair rope, so a GGUF importer un-permutes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from finetune.errors import ExportError

GGUF_TYPES = ("f16", "q8_0")
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}  # mlx-lm model_type -> GGUF architecture
Q8_BLOCK = 32
# max |Δlogit| between the fused model and the GGUF read back, as a fraction of the fused model's max |logit|:
# weight rounding errors grow with the logits' scale (tiny model: 3.5, SmolLM2-135M: ~20).
GGUF_RELATIVE_TOLERANCE = {"f16": 0.01, "q8_0": 0.1}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def check_supported(config: dict[str, Any], gguf_types: tuple[str, ...]) -> None:
    """Refuse what this exporter would write wrong, before any work is done."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(
            f"GGUF export: model_type {model_type!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    bad = [t for t in gguf_types if t not in GGUF_TYPES]
    if bad or not gguf_types:
        raise ExportError(
            f"GGUF export: type {', '.join(bad) or '(none)'} not supported (supported: {', '.join(GGUF_TYPES)})"
        )
    scaling = config.get("rope_scaling")
    if scaling and (scaling.get("type") or scaling.get("rope_type")) not in (None, "linear", "default"):
        raise ExportError(f"GGUF export: rope_scaling {scaling!r} is not supported (linear only)")


# ---------------------------------------------------------------- tokenizer


def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer (``tokenizer.ggml.pre``), from tokenizer.json's structure."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    return "default"


def _merges(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def tokenizer_metadata(base_dir: Path, vocab_size: int, chat_template: str | None) -> dict[str, Any]:
    """Vocabulary, merges, token types, special ids and chat template as GGUF metadata values."""
    path = base_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"GGUF export: {base_dir} has no tokenizer.json")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    decoder = (tok.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise ExportError(
            f"GGUF export: {path}: only byte-level BPE tokenizers are supported (this one: {model.get('type')}, "
            f"decoder {decoder})"
        )
    by_id = {i: t for t, i in model["vocab"].items()}
    types = {}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    if max(by_id) >= vocab_size:
        raise ExportError(
            f"GGUF export: tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}"
        )
    tokens, token_types = [], []
    for i in range(vocab_size):  # llama.cpp wants one entry per embedding row, like its converter's [PADn]
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, TOKEN_NORMAL) if i in by_id else TOKEN_UNUSED)
    config_path = base_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    ids = {t: i for i, t in by_id.items()}

    def special(name: str) -> int | None:
        value = tok_config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        return ids.get(value) if value else None

    return {
        "pre": _pre_tokenizer_name(tok),
        "tokens": tokens,
        "token_types": token_types,
        "merges": _merges(model),
        "bos": special("bos_token"),
        "eos": special("eos_token"),
        "pad": special("pad_token"),
        "unk": special("unk_token"),
        "add_bos": bool(tok_config.get("add_bos_token", False)),
        "chat_template": chat_template or tok_config.get("chat_template"),
    }


def _write_tokenizer(writer: Any, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    writer.add_token_merges(meta["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):  # fmt: skip
        if meta[key] is not None:
            add(meta[key])
    writer.add_add_bos_token(meta["add_bos"])
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])


# ---------------------------------------------------------------- tensors


def gguf_tensors(weights: dict[str, Any], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Dense float32 tensors under GGUF names, q/k rows permuted the way llama.cpp's converter does."""
    import mlx.core as mx
    from mlx_lm.gguf import permute_weights, translate_weight_names

    if any(k.endswith((".scales", ".biases")) for k in weights):
        raise ExportError("GGUF export: the fused model is still quantized (export GGUF from a dequantized fuse)")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    out = {}
    for name, value in weights.items():
        if ".rotary_emb." in name:
            continue
        if ".self_attn.q_proj." in name:
            value = permute_weights(value, heads, heads)
        elif ".self_attn.k_proj." in name:
            value = permute_weights(value, heads, kv_heads)
        out[translate_weight_names(name)] = np.array(value.astype(mx.float32))
    if config.get("tie_word_embeddings", True) is False and "output.weight" not in out:
        raise ExportError("GGUF export: untied embeddings but no lm_head.weight")
    return out


def _stored(name: str, array: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype or None) as the file holds it: norms and biases F32, matrices F16 or Q8_0."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if array.ndim == 1:
        return array.astype(np.float32), None
    if gguf_type == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None  # llama.cpp falls back the same way for rows not made of 32-blocks


def write_gguf(
    path: Path,
    weights: dict[str, Any],
    config: dict[str, Any],
    tokenizer_meta: dict[str, Any],
    gguf_type: str,
    name: str,
) -> None:
    import gguf

    tensors = gguf_tensors(weights, config)
    heads = config["num_attention_heads"]
    writer = gguf.GGUFWriter(str(path), ARCHITECTURES[config["model_type"]])
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {}
    if (scaling.get("type") or scaling.get("rope_type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    writer.add_vocab_size(config["vocab_size"])
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, tokenizer_meta)
    for tensor_name, array in tensors.items():
        data, raw_dtype = _stored(tensor_name, array, gguf_type)
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------- read back (verification)


def read_back(path: Path) -> tuple[Any, Any]:
    """(model, tokenizers.Tokenizer) as the project's GGUF importer reads ``path``, dequantized to float32.

    Built in memory from the importer's config and weights: writing the directory would cost a full
    float32 copy on disk for a check.
    """
    from mlx_lm.utils import _get_classes

    from finetune.errors import ModelError
    from finetune.model.gguf import convert_dtype, read_gguf

    try:
        contents = convert_dtype(read_gguf(path), "float32")
    except ModelError as exc:
        raise ExportError(f"GGUF {path.name}: the importer cannot read it back: {exc}") from None
    model_class, args_class = _get_classes(contents.config)
    model = model_class(args_class.from_dict(contents.config))
    if hasattr(model, "sanitize"):
        contents = contents._replace(weights=model.sanitize(contents.weights))
    model.load_weights(list(contents.weights.items()), strict=True)
    model.eval()
    return model, contents.tokenizer.tokenizer


def _same_tokens(tokenizer: Any, other: Any, prompts: list[list[int]]) -> bool:
    """Both tokenizers split the verification prompts' text into the same ids."""
    for ids in prompts:
        text = tokenizer.decode(ids)
        if tokenizer.encode(text, add_special_tokens=False) != other.encode(text, add_special_tokens=False).ids:
            return False
    return True


def file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def verify_gguf(
    path: Path, config: dict[str, Any], prompts: list[list[int]], reference: list[Any], tolerance: float, tokenizer: Any
) -> dict[str, Any]:
    """Read the file back with the importer and compare logits (and tokenization) with the fused model's.

    ExportError when the logits differ beyond ``tolerance`` or the tokenizer splits text differently.
    """
    from finetune.export.source import logits_of, max_abs_diff

    model, imported_tokenizer = read_back(path)
    error = max_abs_diff(reference, logits_of(model, prompts))
    same_tokens = _same_tokens(tokenizer, imported_tokenizer, prompts)
    figures = {
        "check": "max |logit(fused) - logit(GGUF read back by finetune's importer)| over every position of the "
        "verification prompts; the imported tokenizer splits their text the same way",
        "max_abs_logit_error": error,
        "tolerance": tolerance,
        "tokenizer_agrees": same_tokens,
        "size": path.stat().st_size,
    }
    if error > tolerance:
        raise ExportError(f"GGUF {path.name}: read back differs from the fused model by {error:.3g} > {tolerance:.3g}")
    if not same_tokens:
        raise ExportError(f"GGUF {path.name}: the tokenizer read back splits the verification prompts differently")
    return figures
