"""Export: fused, GGUF and PEFT files computing what base + adapter computed, on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from finetune.config import load_settings
from finetune.errors import ExportError
from finetune.export import REPORT_FILE, export_bundle
from finetune.export import peft as peft_format
from finetune.fsutil import file_digest
from finetune.layout import ADAPTER_CONFIG_FILE, ADAPTER_FILE, CONFIG_FILE

SHORT = [
    "training.iters=6",
    "training.batch_size=4",
    "training.steps_per_eval=3",
    "training.steps_per_checkpoint=3",
    "training.steps_per_report=3",
    "training.warmup_steps=1",
    "training.learning_rate=0.01",
    "lora.rank=4",
    "lora.num_layers=3",
    # Packed at lr 0.01 the tiny random model came out ill-conditioned: 1e-4 relative weight noise moved one
    # logit by 0.15, so any Q8_0 check failed. Trained on buckets it moves 0.003 at 1e-3 noise.
    "training.packing=false",
]


def make_bundle(model_dir: Path, out: Path, overrides: list[str]) -> Path:
    """Train a few steps in-process on the demo data and assemble the bundle the pipeline would publish."""
    from mlx_lm import load

    from finetune.data import load_splits
    from finetune.data.templating import chat_template_of, encode_chat
    from finetune.publishing.bundle import build_bundle
    from finetune.train.trainer import train

    settings = load_settings(None, [*SHORT, f"model.path={model_dir}", *overrides])
    _, tokenizer = load(str(model_dir))
    splits = load_splits(settings.dataset)
    data = {
        "train": [encode_chat(tokenizer, r["messages"], settings.template) for r in splits.train[:16]],
        "valid": [encode_chat(tokenizer, r["messages"], settings.template) for r in splits.valid[:4]],
    }
    result = train(settings, str(model_dir), data, out.parent / f"{out.name}-run")
    template = chat_template_of(tokenizer, settings.template)
    return build_bundle(out, result.adapter_dir, template, settings.public_dict(), {})


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory) -> Path:
    return make_bundle(tiny_model_dir, tmp_path_factory.mktemp("export") / "bundle", [])


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


def prompt_ids(model_dir: Path) -> list[list[int]]:
    from mlx_lm import load

    _, tokenizer = load(str(model_dir))
    questions = ["What is the capital of France?", "Name the capital city of Peru."]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions
    ]


def max_logit_diff(a, b, prompts) -> float:
    return max(float(mx.abs(a(mx.array(p)[None]) - b(mx.array(p)[None])).max()) for p in prompts)


def assert_digests(result, out: Path) -> None:
    report = json.loads((out / REPORT_FILE).read_text())
    assert set(report["files"]) == {p.name for p in out.iterdir()} - {REPORT_FILE}
    for name, entry in report["files"].items():
        assert entry["sha256"] == file_digest(out / name).sha256 == result.files[name].sha256
    assert report["verification"] == json.loads(json.dumps(result.verification))


def test_fused_equals_base_plus_adapter(bundle, tiny_model_dir, work_dir, tmp_path):
    from mlx_lm import load

    out = tmp_path / "fused"
    result = export_bundle(bundle, "fused", out, work_dir=work_dir)
    check = result.verification["fused_vs_adapter"]
    assert check["prompts"] == 8 and check["max_abs_logit_error"] < check["tolerance"] == 1e-3
    assert_digests(result, out)

    # Independently of the exporter's own check: the directory loads as a plain mlx-lm model.
    adapted, _ = load(str(tiny_model_dir), adapter_path=str(bundle))
    base, _ = load(str(tiny_model_dir))
    fused, tokenizer = load(str(out))
    prompts = prompt_ids(tiny_model_dir)
    assert max_logit_diff(adapted, fused, prompts) < 1e-3
    assert max_logit_diff(base, fused, prompts) > 1e-2  # the adapter did change the model
    assert fused.model.embed_tokens.weight.dtype == mx.float32
    assert tokenizer.chat_template == (bundle / "chat_template.jinja").read_text()


@pytest.fixture(scope="module")
def quantized_base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model quantized to 8 bits, group 32, as mlx-lm writes it."""
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.utils import save_config, save_model

    model, tokenizer, config = load(str(tiny_model_dir), return_config=True)
    nn.quantize(model, group_size=32, bits=8)
    out = tmp_path_factory.mktemp("q8") / "tiny-q8"
    save_model(out, model)
    save_config(
        {**config, "quantization": {"group_size": 32, "bits": 8, "mode": "affine"}}, config_path=out / "config.json"
    )
    tokenizer.save_pretrained(str(out))
    return out


def test_quantized_base_is_dequantized_unless_requantize_is_asked(bundle, quantized_base, work_dir, tmp_path):
    from mlx_lm import load

    dense = export_bundle(bundle, "fused", tmp_path / "dense", work_dir=work_dir, base_model=str(quantized_base))
    check = dense.verification["fused_vs_adapter"]
    assert check["base_quantized"] and not check["requantized"] and check["max_abs_logit_error"] < 1e-3
    assert "quantization" not in json.loads((tmp_path / "dense" / "config.json").read_text())

    requantized = export_bundle(
        bundle, "fused", tmp_path / "requant", work_dir=work_dir, base_model=str(quantized_base), requantize=True
    )
    figures = requantized.verification["fused_vs_adapter"]
    assert figures["requantized"] and figures["requantize_max_abs_logit_error"] > figures["max_abs_logit_error"]
    assert json.loads((tmp_path / "requant" / "config.json").read_text())["quantization"]["bits"] == 8
    model, _ = load(str(tmp_path / "requant"))
    assert hasattr(model.model.layers[-1].self_attn.q_proj, "scales")  # fused and quantized again
    assert requantized.total_size < dense.total_size


def test_gguf_f16_reads_back_as_the_fused_model_and_q8_0_error_is_reported(bundle, tiny_model_dir, work_dir, tmp_path):
    import gguf

    out = tmp_path / "gguf"
    result = export_bundle(bundle, "gguf", out, work_dir=work_dir, gguf_types=("f16", "q8_0"))
    f16, q8 = result.verification["gguf_f16_vs_fused"], result.verification["gguf_q8_0_vs_fused"]
    assert (
        f16["max_abs_logit_error"]
        < f16["tolerance"]
        == pytest.approx(0.01 * result.verification["fused_vs_adapter"]["max_abs_logit"])
    )
    assert 0 < q8["max_abs_logit_error"] < q8["tolerance"]
    assert f16["max_abs_logit_error"] < q8["max_abs_logit_error"]
    assert result.files["model-q8_0.gguf"].size < result.files["model-f16.gguf"].size
    assert f16["tokenizer_agrees"] and q8["tokenizer_agrees"]
    assert_digests(result, out)

    # Independently of the exporter: imported as a model directory, it answers like base + adapter.
    from mlx_lm import load

    from finetune.model.gguf import import_gguf

    imported, imported_tokenizer = load(str(import_gguf(out / "model-f16.gguf", tmp_path / "cache", "float32")))
    adapted, tokenizer = load(str(tiny_model_dir), adapter_path=str(bundle))
    prompts = prompt_ids(tiny_model_dir)
    assert max_logit_diff(adapted, imported, prompts) < 0.05
    assert imported_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True) == (
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    )

    reader = gguf.GGUFReader(str(out / "model-f16.gguf"))
    fields = {name: reader.fields[name] for name in reader.fields}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == (bundle / "chat_template.jinja").read_text()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "model-q8_0.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_peft_files_follow_peft_naming_and_math(bundle, tiny_model_dir, work_dir, tmp_path):
    from mlx_lm import load
    from safetensors.numpy import load_file

    out = tmp_path / "peft"
    result = export_bundle(bundle, "peft", out, work_dir=work_dir, base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert result.verification["peft_layers_vs_mlx"]["max_abs_error"] < 1e-5
    config = json.loads((out / "adapter_config.json").read_text())
    assert not peft_format.unknown_fields(config)
    adapter = json.loads((bundle / ADAPTER_CONFIG_FILE).read_text())
    rank, scale = adapter["lora_parameters"]["rank"], adapter["lora_parameters"]["scale"]
    assert config["r"] == rank == 4 and config["lora_alpha"] == scale * rank
    assert config["task_type"] == "CAUSAL_LM" and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["layers_to_transform"] == [1, 2, 3] and config["layers_pattern"] == "layers"

    tensors = load_file(str(out / "adapter_model.safetensors"))
    mlx_adapter = mx.load(str(bundle / ADAPTER_FILE))
    base_names = set(mx.load(str(tiny_model_dir / "model.safetensors")))
    assert len(tensors) == len(mlx_adapter) == 2 * 7 * 3
    for key, value in tensors.items():
        prefix, module, part = key[: len("base_model.model.")], *key[len("base_model.model.") :].rsplit(".", 2)[:2]
        assert prefix == "base_model.model." and f"{module}.weight" in base_names  # an HF module of the base
        a, b = np.array(mlx_adapter[f"{module}.lora_a"]), np.array(mlx_adapter[f"{module}.lora_b"])
        if part == "lora_A":
            assert key.endswith(".lora_A.weight") and value.shape == (rank, a.shape[0])
            np.testing.assert_array_equal(value, a.T)
        else:
            assert key.endswith(".lora_B.weight") and value.shape == (b.shape[1], rank)
            np.testing.assert_array_equal(value, b.T)

    # One layer by hand: PEFT's documented forward in numpy vs MLX's LoRA layer.
    model, _ = load(str(tiny_model_dir), adapter_path=str(bundle))
    layer = model.model.layers[2].mlp.down_proj
    x = np.random.default_rng(1).standard_normal((5, layer.linear.weight.shape[1]), dtype=np.float32)
    p = "base_model.model.model.layers.2.mlp.down_proj"
    scaling = config["lora_alpha"] / config["r"]
    w = np.array(layer.linear.weight)
    expected = x @ w.T + (x @ tensors[f"{p}.lora_A.weight"].T) @ tensors[f"{p}.lora_B.weight"].T * scaling
    np.testing.assert_allclose(np.array(layer(mx.array(x))), expected, atol=1e-5, rtol=0)


def test_peft_dora_magnitude_and_math(tiny_model_dir, work_dir, tmp_path):
    """A DoRA adapter (made by hand: random B and magnitudes) exports lora_magnitude_vector and PEFT's DoRA math."""
    from mlx.utils import tree_flatten
    from mlx_lm import load

    bundle = tmp_path / "dora"
    model, _ = load(str(tiny_model_dir))
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0}, use_dora=True)
    weights = {}
    for k, v in tree_flatten(model.trainable_parameters()):
        noise = mx.random.normal(v.shape, key=mx.random.key(len(weights))) * 0.05
        weights[k] = v + noise if k.endswith((".lora_b", ".m")) else v
    bundle.mkdir()
    mx.save_safetensors(str(bundle / ADAPTER_FILE), weights)
    (bundle / ADAPTER_CONFIG_FILE).write_text(
        json.dumps(
            {"fine_tune_type": "dora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}}
        )
    )
    (bundle / CONFIG_FILE).write_text(json.dumps({"model": {"path": str(tiny_model_dir)}}))
    result = export_bundle(bundle, "peft", tmp_path / "out", work_dir=work_dir)
    assert result.verification["peft_layers_vs_mlx"]["max_abs_error"] < 1e-5
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["lora_alpha"] == 8
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.3.self_attn.v_proj.lora_magnitude_vector"
    np.testing.assert_array_equal(tensors[key], np.array(weights["model.layers.3.self_attn.v_proj.m"]))


def _refused(tmp_path: Path, needle: str, *args, **kwargs) -> None:
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    with pytest.raises(ExportError) as info:
        export_bundle(*args, out, **kwargs)
    message = str(info.value)
    assert "\n" not in message and needle in message, message
    assert not out.exists() and set(tmp_path.iterdir()) == before  # nothing in OUT, no temp dir left


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle-copy"))


def test_corrupt_bundles_are_refused_with_one_line(bundle, work_dir, tmp_path):
    broken = copy_bundle(bundle, tmp_path)
    data = (broken / ADAPTER_FILE).read_bytes()
    (broken / ADAPTER_FILE).write_bytes(data[: len(data) // 2])
    _refused(tmp_path, "adapters.safetensors", broken, "fused", work_dir=work_dir)

    shutil.copy2(bundle / ADAPTER_FILE, broken / ADAPTER_FILE)
    (broken / ADAPTER_CONFIG_FILE).write_text("{not json")
    _refused(tmp_path, "adapter_config.json: not valid JSON", broken, "gguf", work_dir=work_dir)

    shutil.copy2(bundle / ADAPTER_CONFIG_FILE, broken / ADAPTER_CONFIG_FILE)
    (broken / CONFIG_FILE).unlink()
    _refused(tmp_path, "missing finetune_config.json", broken, "peft", work_dir=work_dir)
    _refused(tmp_path, "no such directory", tmp_path / "nope", "fused", work_dir=work_dir)


def test_unsupported_architecture_type_and_format_are_refused(bundle, tiny_model_dir, work_dir, tmp_path):
    _refused(tmp_path, "type q4_k not supported", bundle, "gguf", work_dir=work_dir, gguf_types=("q4_k",))
    _refused(tmp_path, "export format 'onnx'", bundle, "onnx", work_dir=work_dir)
    other = Path(shutil.copytree(tiny_model_dir, tmp_path / "gemma-like"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    _refused(tmp_path, "model_type 'gemma' is not supported", bundle, "gguf", work_dir=work_dir, base_model=str(other))


def test_a_failed_verification_or_write_leaves_out_untouched(bundle, work_dir, tmp_path, monkeypatch):
    _refused(tmp_path, "fused model differs from base+adapter", bundle, "fused", work_dir=work_dir, tolerance=1e-12)
    _refused(tmp_path, "read back differs", bundle, "gguf", work_dir=work_dir, tolerance=1e-9)

    from finetune.export import gguf as gguf_export

    def crash(path, *args, **kwargs):
        Path(path).write_bytes(b"GGUF half")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_export, "write_gguf", crash)
    before = set(tmp_path.iterdir())
    with pytest.raises(OSError):
        export_bundle(bundle, "gguf", tmp_path / "out", work_dir=work_dir)
    assert set(tmp_path.iterdir()) == before

    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "mine.txt").write_text("user data")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_bundle(bundle, "peft", tmp_path / "keep", work_dir=work_dir)
    assert (tmp_path / "keep" / "mine.txt").read_text() == "user data"
