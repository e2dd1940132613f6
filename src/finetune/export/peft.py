"""The adapter in Hugging Face PEFT's format: ``adapter_model.safetensors`` + ``adapter_config.json``.

mlx-lm keeps ``lora_a`` as [in, r] and ``lora_b`` as [r, out] and multiplies by ``scale``; PEFT keeps
``lora_A.weight`` as [r, in] and ``lora_B.weight`` as [out, r] (torch Linear weights) and multiplies by
``lora_alpha / r``. So the tensors are transposed and ``lora_alpha = scale * r``. Module paths stay:
mlx-lm's llama/mistral/qwen2 use Hugging Face's names, which PEFT prefixes with ``base_model.model.``.

Verified without PyTorch: PEFT's documented forward, in numpy, on every exported layer equals
MLX's LoRA layer on the same input.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from finetune.errors import ExportError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
ARCHITECTURES = ("llama", "mistral", "qwen2")  # mlx-lm module paths equal Hugging Face's for these
LAYER_TOLERANCE = 1e-5  # max |Δ| between PEFT's math and MLX's layer, relative to max(1, max |y|)

# The fields of PEFT's LoraConfig (peft.tuners.lora.config, with PeftConfig's), as an adapter_config.json
# written by PEFT 0.17 holds them; what we write must be a subset.
PEFT_LORA_FIELDS = frozenset(
    "alpha_pattern auto_mapping base_model_name_or_path bias corda_config eva_config exclude_modules fan_in_fan_out "
    "inference_mode init_lora_weights layer_replication layers_pattern layers_to_transform loftq_config lora_alpha "
    "lora_bias lora_dropout megatron_config megatron_core modules_to_save peft_type qalora_group_size r rank_pattern "
    "revision target_modules target_parameters task_type trainable_token_indices use_dora use_qalora use_rslora".split()
)


def peft_key(module: str, part: str) -> str:
    """``model.layers.0.self_attn.q_proj`` + ``lora_A`` -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    return f"{PREFIX}{module}.{part}" if part == "lora_magnitude_vector" else f"{PREFIX}{module}.{part}.weight"


def peft_tensors(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """mlx-lm adapter tensors under PEFT's names and orientation (float32, contiguous)."""
    out = {}
    for name, value in adapter.items():
        module, leaf = name.rsplit(".", 1)
        if leaf == "lora_a":
            out[peft_key(module, "lora_A")] = np.ascontiguousarray(value.T, dtype=np.float32)
        elif leaf == "lora_b":
            out[peft_key(module, "lora_B")] = np.ascontiguousarray(value.T, dtype=np.float32)
        elif leaf == "m":  # DoRA's magnitude; PEFT saves it without the ".weight" of its DoraLinearLayer
            out[peft_key(module, "lora_magnitude_vector")] = np.ascontiguousarray(value, dtype=np.float32)
        else:
            raise ExportError(f"PEFT export: adapter tensor {name!r} is not a LoRA tensor")
    return out


def _layer_index(module: str) -> int | None:
    parts = module.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def _targets(adapted: set[str], linears: set[str]) -> tuple[list[str], list[int] | None]:
    """target_modules (+ layers_to_transform) that make PEFT wrap exactly the adapted modules of the base."""
    layers = sorted({i for m in adapted if (i := _layer_index(m)) is not None})
    all_layers = sorted({i for m in linears if (i := _layer_index(m)) is not None})
    restrict = layers if layers != all_layers else None
    for depth in (1, 2):
        targets = sorted({".".join(m.split(".")[-depth:]) for m in adapted})
        matched = {
            m
            for m in linears
            if any(m == t or m.endswith("." + t) for t in targets) and (restrict is None or _layer_index(m) in restrict)
        }
        if matched == adapted:
            return targets, restrict
    raise ExportError("PEFT export: no target_modules list selects exactly the adapted layers of the base")


def peft_config(
    adapter_config: dict[str, Any], adapted: set[str], linears: set[str], base_model: str, revision: str | None
) -> dict[str, Any]:
    lora = adapter_config["lora_parameters"]
    rank, scale = int(lora["rank"]), float(lora["scale"])
    alpha = scale * rank
    targets, layers = _targets(adapted, linears)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": revision,
        "r": rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(lora.get("dropout", 0.0)),
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": "layers" if layers is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": adapter_config.get("fine_tune_type") == "dora",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def peft_linear_forward(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, tensors: dict[str, np.ndarray], config: dict[str, Any]
) -> np.ndarray:
    """PEFT's forward for one LoRA (or DoRA) Linear, from its documented math (numpy, eval mode, no dropout).

    LoRA: y = x Wᵀ + b + (x Aᵀ Bᵀ) · s, with s = lora_alpha / r (lora_alpha / √r under use_rslora).
    DoRA: y = (m / ‖W + s·B A‖_row) ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b.
    ``tensors`` holds this module's lora_A, lora_B (and lora_magnitude_vector) keyed by their last part.
    """
    r = config["r"]
    s = config["lora_alpha"] / (np.sqrt(r) if config.get("use_rslora") else r)
    a, b = tensors["lora_A"], tensors["lora_B"]
    base = x @ weight.T
    lora = (x @ a.T) @ b.T * s
    if config.get("use_dora"):
        norm = np.linalg.norm(weight + s * (b @ a), axis=1)
        y = (tensors["lora_magnitude_vector"] / norm) * (base + lora)
    else:
        y = base + lora
    return y + bias if bias is not None else y


def module_tensors(tensors: dict[str, np.ndarray], module: str) -> dict[str, np.ndarray]:
    return {part: tensors[peft_key(module, part)] for part in ("lora_A", "lora_B", "lora_magnitude_vector")
            if peft_key(module, part) in tensors}  # fmt: skip


def lora_modules(model: Any) -> dict[str, Any]:
    """The adapted layers of an mlx-lm model: path -> LoRALinear/DoRALinear."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "linear")}


def dense_weight(linear: Any) -> tuple[np.ndarray, np.ndarray | None]:
    import mlx.core as mx

    w = linear.weight
    if hasattr(linear, "scales"):
        w = mx.dequantize(
            w, linear.scales, linear.biases, group_size=linear.group_size, bits=linear.bits, mode=linear.mode
        )
    bias = np.array(linear.bias.astype(mx.float32)) if "bias" in linear else None
    return np.array(w.astype(mx.float32)), bias


def verify_layers(model: Any, out_dir: Path, rows: int = 4, seed: int = 0) -> dict[str, Any]:
    """Read the exported files back and compare PEFT's math with MLX's layer on every adapted module."""
    import mlx.core as mx
    from safetensors.numpy import load_file

    tensors = load_file(str(out_dir / ADAPTER_WEIGHTS))
    config = json.loads((out_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    rng = np.random.default_rng(seed)
    worst, worst_rel, scale_seen = 0.0, 0.0, 0.0
    modules = lora_modules(model)
    for name, module in modules.items():
        weight, bias = dense_weight(module.linear)
        x = rng.standard_normal((rows, weight.shape[1]), dtype=np.float32)
        expected = np.array(module(mx.array(x)).astype(mx.float32))
        got = peft_linear_forward(x, weight, bias, module_tensors(tensors, name), config)
        error = float(np.abs(got - expected).max())
        scale = float(np.abs(expected).max())
        worst, scale_seen = max(worst, error), max(scale_seen, scale)
        worst_rel = max(worst_rel, error / max(1.0, scale))
    figures = {
        "check": "max |PEFT forward (numpy, from the exported files) - MLX LoRA layer| on random inputs, every layer",
        "layers": len(modules),
        "max_abs_error": worst,
        "max_abs_output": scale_seen,
        "max_error_relative_to_max_1_output": worst_rel,
        "tolerance": LAYER_TOLERANCE,
    }
    if worst_rel > LAYER_TOLERANCE:
        raise ExportError(
            f"PEFT export: layer outputs differ from MLX's by {worst:.3g} (tolerance {LAYER_TOLERANCE:g})"
        )
    return figures


def base_linears(model: Any) -> set[str]:
    """Module paths of the base's linear layers (what PEFT's target_modules can match)."""
    names = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_a"):
            names.add(name)
        elif type(module).__name__ in ("Linear", "QuantizedLinear") and not name.endswith(".linear"):
            names.add(name)
    return names


def write_peft(model: Any, config: dict[str, Any], adapter_config: dict[str, Any], out_dir: Path,
               base_model: str, revision: str | None) -> dict[str, Any]:  # fmt: skip
    """Write the PEFT files into ``out_dir`` and verify them; returns the verification figures."""
    import mlx.core as mx
    from safetensors.numpy import save_file

    if config.get("model_type") not in ARCHITECTURES:
        raise ExportError(
            f"PEFT export: model_type {config.get('model_type')!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    modules = lora_modules(model)
    adapter = {}
    for name, module in modules.items():
        adapter[f"{name}.lora_a"] = np.array(module.lora_a.astype(mx.float32))
        adapter[f"{name}.lora_b"] = np.array(module.lora_b.astype(mx.float32))
        if "m" in module:
            adapter[f"{name}.m"] = np.array(module.m.astype(mx.float32))
    save_file(peft_tensors(adapter), str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    settings = peft_config(adapter_config, set(modules), base_linears(model), base_model, revision)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2, sort_keys=True), encoding="utf-8")
    return verify_layers(model, out_dir)


def unknown_fields(config: Iterable[str]) -> set[str]:
    return set(config) - PEFT_LORA_FIELDS
