"""Import a llama-family GGUF file (llama.cpp, Ollama, LM Studio) as an mlx-lm model directory.

``read_gguf(path)`` gives the mlx-lm config, the weights under mlx-lm's names and the tokenizer;
``import_gguf(path, cache_dir, dtype)`` writes them as a directory ``mlx_lm.load`` opens, cached by
the file's sha256. Q4_0/Q4_1/Q8_0 tensors stay MLX affine-quantized (group 32) unless a dtype asks
for dense weights; F32/F16/BF16 stay as they are.

llama.cpp permutes the rows of q/k for its adjacent-pair rope. We undo that permutation (it moves
whole rows, so quantized rows move exactly too) instead of setting ``rope_traditional``: the imported
directory then has Hugging Face's layout, so adapters trained on it apply to the original checkpoint
(PEFT export, fusing) and the GGUF exporter can permute once, the way llama.cpp's converter does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from finetune.errors import ModelError
from finetune.fsutil import atomic_dir, file_digest, write_json_atomic
from finetune.model.gguf_tokenizer import TokenizerInfo, tokenizer_from_metadata

IMPORTER_VERSION = "1"  # bump when the imported directory's content changes
GROUP_SIZE = 32  # every GGUF type mx.load keeps quantized uses blocks of 32
PROVENANCE_FILE = "finetune_gguf.json"  # which file, dtype and importer made the directory
DTYPES = ("auto", "keep", "float32", "bfloat16", "float16")

# GGUF architecture -> mlx-lm model_type. Mistral and most llama derivatives are written as "llama".
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
_PERMUTED_QK = {"llama"}  # llama.cpp's converter permutes q/k rows for these (qwen2 uses NEOX rope)
# ggml type ids (gguf.GGMLQuantizationType) that mx.load reads and we keep.
_SUPPORTED_TYPES = {0: "F32", 1: "F16", 30: "BF16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}

_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_]+)\.(weight|scales|biases|bias)$")


class GGUFError(ModelError):
    """A GGUF file that cannot be imported; the message is one line naming the file."""


class GGUFContents(NamedTuple):
    config: dict[str, Any]
    weights: dict[str, Any]  # mlx-lm name -> mx.array
    tokenizer: TokenizerInfo


def _scalar(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    return value.item() if hasattr(value, "item") else value


def _float(value: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.99999974e-06; keep the digits float32 actually has."""
    return float(f"{value:.7g}")


def _reader(path: Path) -> Any:
    """gguf's reader checks the header and tensor table in Python; mx.load can crash on a damaged header."""
    from gguf import GGUFReader

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (no GGUF magic at the start)")
    try:
        return GGUFReader(str(path))
    except Exception as exc:
        if "cannot reshape" in str(exc) or "out of bounds" in str(exc):
            detail = f"tensor data extends past the end of the file ({path.stat().st_size} bytes): truncated?"
        else:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GGUFError(f"{path}: cannot read GGUF: {detail}") from None


def _check_types(path: Path, types: dict[str, int]) -> None:
    from gguf import GGMLQuantizationType

    bad = {name: t for name, t in types.items() if t not in _SUPPORTED_TYPES}
    if bad:
        kinds = sorted({GGMLQuantizationType(t).name for t in bad.values()})
        raise GGUFError(
            f"{path}: unsupported tensor type {', '.join(kinds)} ({len(bad)} tensors, e.g. {next(iter(bad))}); "
            f"supported: {', '.join(_SUPPORTED_TYPES.values())}"
        )


def _load(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    import mlx.core as mx

    reader = _reader(path)
    field = reader.get_field("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    types = {t.name: int(t.tensor_type) for t in reader.tensors}
    _check_types(path, types)
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as exc:
        raise GGUFError(f"{path}: cannot read GGUF: {str(exc).replace('[load_gguf] ', '').strip()}") from None
    # mx.load widens BF16 to float16 (lossy outside float16's range): take those tensors' raw bits.
    for tensor in reader.tensors:
        if types[tensor.name] == 30:
            raw = mx.array(tensor.data.view("uint16")).view(mx.bfloat16)
            weights[tensor.name] = raw.reshape(weights[tensor.name].shape)
    return weights, metadata, types


def _model_config(path: Path, arch: str, metadata: dict[str, Any], tied: bool, biased: bool) -> dict[str, Any]:
    def need(key: str) -> Any:
        value = _scalar(metadata, f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"{path}: metadata {arch}.{key} missing")
        return value

    heads = need("attention.head_count")
    config = {
        "model_type": ARCHITECTURES[arch],
        "hidden_size": need("embedding_length"),
        "num_hidden_layers": need("block_count"),
        "intermediate_size": need("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _scalar(metadata, f"{arch}.attention.head_count_kv", heads),
        "rms_norm_eps": _float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float(_scalar(metadata, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": _scalar(metadata, f"{arch}.context_length", 2048),
        "vocab_size": _scalar(metadata, f"{arch}.vocab_size") or len(metadata.get("tokenizer.ggml.tokens", [])),
        "tie_word_embeddings": tied,
        "rope_traditional": False,
    }
    if (head_dim := _scalar(metadata, f"{arch}.attention.key_length")) is not None:
        config["head_dim"] = head_dim
    if arch == "llama" and biased:
        config["attention_bias"] = True
    scaling = _scalar(metadata, f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif scaling != "none":
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported (only linear)")
    for key, name in (("tokenizer.ggml.eos_token_id", "eos_token_id"), ("tokenizer.ggml.bos_token_id", "bos_token_id")):
        if (value := _scalar(metadata, key)) is not None:
            config[name] = value
    return config


def _rename(path: Path, gguf_weights: dict[str, Any]) -> dict[str, Any]:
    weights = {}
    for name, value in gguf_weights.items():
        match = _NAME.match(name)
        base = match and (_BLOCK.get(match[2]) if match[1] is not None else _TOP.get(match[2]))
        if not base:
            hint = " (llama-3.1 rope frequency factors are not supported)" if name.startswith("rope_freqs") else ""
            raise GGUFError(f"{path}: unexpected tensor {name!r}{hint}")
        prefix = f"model.layers.{match[1]}.{base}" if match[1] is not None else base
        weights[f"{prefix}.{match[3]}"] = value
    return weights


def _unpermute(weights: dict[str, Any], config: dict[str, Any]) -> None:
    """Undo llama.cpp's ``permute``: rows (head, half, pair) -> (head, pair, half), for every array of q and k."""
    for proj, heads in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
        for key in [k for k in weights if f".self_attn.{proj}." in k]:
            w = weights[key]
            rows = w.shape[0]
            weights[key] = w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quantization(weights: dict[str, Any]) -> dict[str, Any] | None:
    """mlx-lm's per-layer ``quantization`` entry for each quantized module, with the commonest as default."""
    layers = {}
    for key in weights:
        if key.endswith(".scales"):
            prefix = key[: -len(".scales")]
            bits = weights[f"{prefix}.weight"].shape[-1] // weights[key].shape[-1]
            layers[prefix] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    if not layers:
        return None
    bits = [entry["bits"] for entry in layers.values()]
    return {"group_size": GROUP_SIZE, "bits": max(set(bits), key=bits.count), "mode": "affine", **layers}


def read_gguf(path: Path | str) -> GGUFContents:
    """The mlx-lm config, weights (quantized or float, as stored) and tokenizer of a GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    gguf_weights, metadata, _ = _load(path)
    arch = _scalar(metadata, "general.architecture")
    weights = _rename(path, gguf_weights)
    tied = "lm_head.weight" not in weights
    biased = any(k.endswith(".self_attn.q_proj.bias") for k in weights)
    config = _model_config(path, arch, metadata, tied, biased)
    if arch in _PERMUTED_QK:
        _unpermute(weights, config)
    if (quantization := _quantization(weights)) is not None:
        config["quantization"] = quantization
    try:
        tokenizer = tokenizer_from_metadata(arch, metadata, config["max_position_embeddings"])
    except (ValueError, KeyError, IndexError) as exc:
        raise GGUFError(f"{path}: cannot build the tokenizer: {exc}") from None
    return GGUFContents(config=config, weights=weights, tokenizer=tokenizer)


def resolve_dtype(dtype: str) -> str:
    """``auto``: float32 on the CPU backend (MLX's CPU quantized matmul is slow), the stored types elsewhere."""
    import mlx.core as mx

    if dtype not in DTYPES:
        raise GGUFError(f"model.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "float32" if mx.default_device().type == mx.DeviceType.cpu else "keep"
    return dtype


def convert_dtype(contents: GGUFContents, dtype: str) -> GGUFContents:
    """Dense weights of ``dtype`` (quantized ones dequantized exactly, in float32, first); ``keep`` changes nothing."""
    import mlx.core as mx

    if dtype == "keep":
        return contents
    target = getattr(mx, dtype)
    weights, config = dict(contents.weights), dict(contents.config)
    for prefix, entry in (config.pop("quantization", None) or {}).items():
        if isinstance(entry, dict):
            w, scales, biases = (weights.pop(f"{prefix}.{k}") for k in ("weight", "scales", "biases"))
            # float32 scales: the float16 product would round GGML's d*q (+ m) values.
            weights[f"{prefix}.weight"] = mx.dequantize(
                w,
                scales.astype(mx.float32),
                biases.astype(mx.float32),
                group_size=entry["group_size"],
                bits=entry["bits"],
            )
    weights = {k: v.astype(target) for k, v in weights.items()}
    return GGUFContents(config=config, weights=weights, tokenizer=contents.tokenizer)


def write_model_dir(contents: GGUFContents, out_dir: Path, provenance: dict[str, Any]) -> Path:
    """Write config.json, model.safetensors and tokenizer files as ``out_dir``, all or nothing."""
    import mlx.core as mx

    with atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        mx.eval(contents.weights)
        mx.save_safetensors(str(tmp / "model.safetensors"), contents.weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(contents.config, indent=2))
        contents.tokenizer.save(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True))
    return out_dir


def _sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of the file, remembered per (path, size, mtime, inode) so a multi-GB model is hashed once."""
    st = path.stat()
    memo = cache_dir / "gguf" / "sha256-by-stat.json"
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = file_digest(path).sha256
        write_json_atomic(memo, known)
    return known[key]


def imported_dir(cache_dir: Path | str, sha256: str, dtype: str) -> Path:
    return Path(cache_dir) / "gguf" / f"{sha256[:16]}-{dtype}-i{IMPORTER_VERSION}"


def import_gguf(path: Path | str, cache_dir: Path | str, dtype: str = "auto") -> Path:
    """The mlx-lm directory for this GGUF under ``cache_dir/gguf/``, imported on first use."""
    path, cache_dir = Path(path), Path(cache_dir)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    dtype = resolve_dtype(dtype)
    sha256 = _sha256(path, cache_dir)
    out_dir = imported_dir(cache_dir, sha256, dtype)
    stamp = out_dir / PROVENANCE_FILE
    if stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == sha256:
        return out_dir
    contents = convert_dtype(read_gguf(path), dtype)
    provenance = {"source": path.name, "sha256": sha256, "dtype": dtype, "importer_version": IMPORTER_VERSION}
    return write_model_dir(contents, out_dir, provenance)
