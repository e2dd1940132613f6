"""The base model with LoRA layers, the optimizer and its schedule, and the per-step random seed."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from finetune.config import Settings
from finetune.errors import TrainingError
from finetune.model.resolve import resolve_model


def load_model(settings: Settings, model_path: str) -> tuple[nn.Module, Any, Path]:
    """Base model with LoRA layers; the LoRA init draws from the global RNG, hence the seed first."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model_dir = resolve_model(model_path, settings.model.revision, settings.work_dir, settings.model.dtype)
    model, tokenizer = load(
        str(model_dir),
        tokenizer_config={"trust_remote_code": settings.model.trust_remote_code},
        trust_remote_code=settings.model.trust_remote_code,
    )
    lora = settings.lora
    if lora.num_layers > len(model.layers):
        raise TrainingError(f"lora.num_layers={lora.num_layers}: the model has only {len(model.layers)} blocks")
    mx.random.seed(settings.training.seed)
    model.freeze()
    linear_to_lora_layers(model, lora.num_layers, lora_parameters(settings), use_dora=lora.fine_tune_type == "dora")
    return model, tokenizer, Path(model_dir)


def lora_parameters(settings: Settings) -> dict[str, Any]:
    params: dict[str, Any] = {
        "rank": settings.lora.rank,
        "scale": settings.lora.scale,
        "dropout": settings.lora.dropout,
    }
    if settings.lora.layer_keys is not None:
        params["keys"] = list(settings.lora.layer_keys)
    return params


def build_optimizer(settings: Settings, total_steps: int) -> optim.Optimizer:
    t = settings.training
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))
    if t.lr_schedule == "cosine":
        main = optim.cosine_decay(t.learning_rate, max(total_steps - warmup, 1), t.learning_rate * t.min_lr_ratio)
    else:
        main = lambda _: mx.array(t.learning_rate)  # noqa: E731
    lr = optim.join_schedules([optim.linear_schedule(0.0, t.learning_rate, warmup), main], [warmup]) if warmup else main
    return optim.AdamW(learning_rate=lr, weight_decay=t.weight_decay)


def step_seed(seed: int, step: int) -> int:
    """Dropout randomness depends on (seed, step) only, not on what ran before in this process."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little")
