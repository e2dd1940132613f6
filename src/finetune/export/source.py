"""What an export starts from: a checked bundle, its base model, the verification prompts, and logits.

Every format is verified the same way: run a fixed set of prompts (validation rows, templated as in
training) through the reference and through the exported model, and compare the logits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import DatasetConfig, StorageConfig, TemplateConfig
from finetune.errors import ExportError, FinetuneError
from finetune.layout import ADAPTER_CONFIG_FILE, ADAPTER_FILE, CHAT_TEMPLATE_FILE, CONFIG_FILE

FINE_TUNE_TYPES = ("lora", "dora")
PROMPT_TOKENS = 128  # per verification prompt: enough positions to exercise attention, cheap on CPU


@dataclass(frozen=True)
class BundleSource:
    """A bundle that passed the checks, with the local directory of the base it was trained on."""

    bundle_dir: Path
    adapter_config: dict[str, Any]
    run_config: dict[str, Any]  # finetune_config.json: the public settings of the training run
    base_ref: str
    base_dir: Path

    @property
    def fine_tune_type(self) -> str:
        return self.adapter_config.get("fine_tune_type", "lora")

    @property
    def template(self) -> TemplateConfig:
        return TemplateConfig(**self.run_config.get("template", {}))

    @property
    def chat_template(self) -> str | None:
        path = self.bundle_dir / CHAT_TEMPLATE_FILE
        return path.read_text(encoding="utf-8") if path.is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"bundle {path.parent}: missing {path.name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"bundle {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ExportError(f"bundle {path}: expected a JSON object")
    return data


def _check_adapter_weights(path: Path) -> None:
    import mlx.core as mx

    if not path.is_file():
        raise ExportError(f"bundle {path.parent}: missing {path.name}")
    try:
        weights = mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise ExportError(f"bundle {path}: not a readable safetensors file ({exc})") from None
    if not weights or not all(k.rsplit(".", 1)[-1] in {"lora_a", "lora_b", "m"} for k in weights):
        raise ExportError(f"bundle {path}: holds no LoRA tensors (lora_a/lora_b)")


def open_bundle(bundle_dir: Path | str, work_dir: Path | str, base_ref: str | None = None) -> BundleSource:
    """Check the bundle's files and resolve the base model it names (or ``base_ref``)."""
    from finetune.model.resolve import resolve_model

    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise ExportError(f"bundle {bundle_dir}: no such directory")
    adapter_config = _read_json(bundle_dir / ADAPTER_CONFIG_FILE)
    fine_tune_type = adapter_config.get("fine_tune_type", "lora")
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise ExportError(
            f"bundle {bundle_dir / ADAPTER_CONFIG_FILE}: fine_tune_type {fine_tune_type!r} cannot be exported "
            f"(supported: {', '.join(FINE_TUNE_TYPES)})"
        )
    lora = adapter_config.get("lora_parameters")
    if not isinstance(lora, dict) or not {"rank", "scale"} <= set(lora):
        raise ExportError(f"bundle {bundle_dir / ADAPTER_CONFIG_FILE}: lora_parameters.rank/scale missing")
    _check_adapter_weights(bundle_dir / ADAPTER_FILE)
    run_config = _read_json(bundle_dir / CONFIG_FILE)
    model = run_config.get("model") or {}
    ref = base_ref or model.get("path")
    if not ref:
        raise ExportError(f"bundle {bundle_dir / CONFIG_FILE}: model.path missing (pass the base model explicitly)")
    base_dir = resolve_model(ref, model.get("revision"), work_dir, model.get("dtype", "auto"))
    return BundleSource(bundle_dir, adapter_config, run_config, ref, Path(base_dir))


def load_adapted(source: BundleSource) -> tuple[Any, Any, dict[str, Any]]:
    """(model with the adapter applied, tokenizer, model config), in eval mode."""
    from mlx_lm.utils import load

    trust = bool((source.run_config.get("model") or {}).get("trust_remote_code", False))
    try:
        model, tokenizer, config = load(
            str(source.base_dir),
            adapter_path=str(source.bundle_dir),
            return_config=True,
            tokenizer_config={"trust_remote_code": trust},
        )
    except ValueError as exc:  # mlx-lm: unknown model type, or adapter tensors that do not fit the base
        raise ExportError(f"bundle {source.bundle_dir}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer, config


def validation_rows(
    source: BundleSource, storage: StorageConfig | None, work_dir: Path | str, count: int
) -> list[dict[str, Any]]:
    """The first ``count`` rows of the validation split of the dataset the bundle was trained on."""
    from finetune.data import load_splits

    dataset = DatasetConfig(**source.run_config.get("dataset", {}))
    try:
        splits = load_splits(dataset, storage, Path(work_dir))
    except FinetuneError as exc:
        raise ExportError(f"verification prompts: cannot load the validation split: {exc}") from None
    rows = list(splits.rows("valid"))[:count] or list(splits.rows("train"))[:count]
    if not rows:
        raise ExportError(f"verification prompts: dataset {dataset.source!r} has no rows")
    return rows


def encode_prompts(tokenizer: Any, rows: Sequence[dict[str, Any]], template: TemplateConfig) -> list[list[int]]:
    """Each row as training saw it (chat template and all), cut to PROMPT_TOKENS tokens."""
    from finetune.data.templating import encode_row

    return [encode_row(tokenizer, row, template).input_ids[:PROMPT_TOKENS] for row in rows]


def logits_of(model: Any, prompts: Sequence[Sequence[int]]) -> list[Any]:
    """float32 logits of every position of every prompt (one prompt at a time: lengths differ)."""
    import mlx.core as mx

    out = []
    for ids in prompts:
        logits = model(mx.array(list(ids))[None]).astype(mx.float32)
        mx.eval(logits)
        out.append(logits)
    return out


def max_abs_diff(reference: Sequence[Any], other: Sequence[Any]) -> float:
    import mlx.core as mx

    return max(float(mx.max(mx.abs(a - b)).item()) for a, b in zip(reference, other, strict=True))


def max_abs(values: Sequence[Any]) -> float:
    import mlx.core as mx

    return max(float(mx.max(mx.abs(v)).item()) for v in values)
