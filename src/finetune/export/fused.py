"""The base with the LoRA deltas merged, as an mlx-lm model directory in the base's dtype.

mlx-lm's ``fuse()`` on LoRALinear/DoRALinear does the merge. On a quantized base mlx-lm re-quantizes
the merged weights silently; here the whole model is dequantized (exact) unless ``requantize`` is
asked for, and then the error the re-quantization adds is measured and reported.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import ExportError
from finetune.export.source import logits_of, max_abs, max_abs_diff

# max |Δlogit| allowed between base+adapter and fused, by the dtype the fused weights are stored in.
FUSED_TOLERANCE = {"float32": 1e-3, "float16": 0.1, "bfloat16": 0.5}


@dataclass(frozen=True)
class FusedModel:
    model: Any
    config: dict[str, Any]
    dtype: str
    figures: dict[str, Any]


def weight_dtype(model: Any) -> str:
    """The dtype of the model's floating-point weights (scales, for a quantized model)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    floats = [v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    dtype = max(set(floats), key=floats.count)
    return str(dtype).removeprefix("mlx.core.")


def fuse_in_place(model: Any, config: dict[str, Any], requantize: bool) -> tuple[Any, dict[str, Any]]:
    """Merge every LoRA/DoRA layer; dequantize everything unless ``requantize`` (then only LoRA layers are)."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    fused = [
        (name, module.fuse(dequantize=not requantize))
        for name, module in model.named_modules()
        if hasattr(module, "fuse")
    ]
    if not fused:
        raise ExportError("the bundle's adapter adapts no layer of the base model")
    model.update_modules(tree_unflatten(fused))
    config = dict(config)
    if not requantize and ("quantization" in config or "quantization_config" in config):
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    return model, config


def fuse_verified(
    model: Any,
    config: dict[str, Any],
    prompts: Sequence[Sequence[int]],
    requantize: bool = False,
    tolerance: float | None = None,
) -> FusedModel:
    """Fuse the adapted ``model`` and prove it computes what base+adapter computed (else ExportError)."""
    quantized = {name: m for name, m in model.named_modules() if hasattr(m, "scales")}
    adapted = {name for name, m in model.named_modules() if hasattr(m, "fuse")}
    reference = logits_of(model, prompts)
    model, fused_config = fuse_in_place(model, config, requantize=False)
    dtype = weight_dtype(model)
    limit = FUSED_TOLERANCE.get(dtype, 0.5) if tolerance is None else tolerance
    error = max_abs_diff(reference, logits_of(model, prompts))
    figures: dict[str, Any] = {
        "check": "max |logit(base+adapter) - logit(fused)| over every position of the verification prompts",
        "prompts": len(prompts),
        "positions": sum(len(p) for p in prompts),
        "max_abs_logit_error": error,
        "tolerance": limit,
        "max_abs_logit": max_abs(reference),
        "dtype": dtype,
        "base_quantized": bool(quantized),
        "requantized": False,
    }
    if error > limit:
        raise ExportError(f"fused model differs from base+adapter: max |Δlogit| {error:.3g} > tolerance {limit:.3g}")
    if requantize and quantized:
        model = _requantize(model, quantized, adapted)
        fused_config = config
        figures["requantized"] = True
        figures["requantize_max_abs_logit_error"] = max_abs_diff(reference, logits_of(model, prompts))
    return FusedModel(model, fused_config, dtype, figures)


def _requantize(model: Any, quantized: dict[str, Any], adapted: set[str]) -> Any:
    """Quantize the fused layers with their base layer's group size and bits; put the untouched ones back as they were.

    Re-quantizing a dequantized layer is not exact in general, so only the layers the adapter changed are.
    """
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    modules = dict(model.named_modules())
    updates = []
    for name, original in quantized.items():
        parent = name.removesuffix(".linear")
        if name.endswith(".linear") and parent in adapted:
            dense = modules[parent]
            updates.append(
                (parent, nn.QuantizedLinear.from_linear(dense, original.group_size, original.bits, mode=original.mode))
            )
        else:
            updates.append((name, original))
    model.update_modules(tree_unflatten(updates))
    return model


def save_fused(fused: FusedModel, tokenizer: Any, base_dir: Path, out_dir: Path, chat_template: str | None) -> None:
    """An mlx-lm model directory: weights, config.json, tokenizer files (with the template used in training)."""
    import shutil

    from mlx_lm.utils import save_config, save_model

    save_model(out_dir, fused.model, donate_model=False)
    save_config(fused.config, config_path=out_dir / "config.json")
    tokenizer.save_pretrained(str(out_dir))
    if chat_template:
        path = out_dir / "tokenizer_config.json"
        tok_config = json.loads(path.read_text(encoding="utf-8"))
        tok_config["chat_template"] = chat_template
        path.write_text(json.dumps(tok_config, indent=2), encoding="utf-8")
        (out_dir / "chat_template.jinja").unlink(missing_ok=True)  # one template, the trained one
    generation = base_dir / "generation_config.json"
    if generation.is_file():
        shutil.copy2(generation, out_dir / generation.name)
