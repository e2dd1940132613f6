"""Memory-lean training: chunked cross-entropy and per-instance gradient checkpointing.

- The loss of a large-vocabulary model is the biggest activation of a LoRA step:
  full ``[tokens × vocab]`` logits, in float32 for the softmax. ``LossHead`` runs
  the model's backbone once and the output projection plus cross-entropy over
  chunks of ``chunk`` tokens, each under ``mx.checkpoint``, so at most one chunk of
  logits exists at a time, forward or backward (the chunk's projection is
  recomputed in the backward pass).
- mlx-lm's ``grad_checkpoint`` replaces ``__call__`` on the layer's *class*: every
  model of that architecture in the process is affected, and a second call nests
  the checkpoint. ``checkpoint_blocks`` instead gives each block instance its own
  subclass (one per original class, cached) whose ``__call__`` recomputes the
  block in the backward pass; doing it twice is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

_CHECKPOINTED: dict[type, type] = {}
DEFAULT_LOSS_CHUNK = 2048  # tokens, on every backend but CUDA


def loss_chunk(setting: int | str | None, backend: str) -> int | None:
    """Tokens per loss chunk for ``training.loss_chunk_tokens`` on ``backend``; None: whole logits.

    auto follows measurements (``benchmarks/results/h200-2026-12-02*``): on an H200 a
    4,096-token step of the 0.5B shape took 139 ms with whole logits against 175 ms in
    2,048-token chunks, and peaked at 14.3 against 21.4 GB; on this project's CPU machine
    2,048-token chunks were ~13 % faster than whole logits (32k vocabulary).
    """
    if setting != "auto":
        return setting
    return None if backend == "cuda" else DEFAULT_LOSS_CHUNK


def _checkpointed_class(cls: type) -> type:
    if getattr(cls, "_finetune_checkpointed", False):
        return cls
    if cls not in _CHECKPOINTED:
        call = cls.__call__

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            def inner(params, *inner_args):
                self.update(params)
                return call(self, *inner_args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args)

        _CHECKPOINTED[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_finetune_checkpointed": True})
    return _CHECKPOINTED[cls]


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute each transformer block in the backward pass; returns how many blocks were (already) wrapped."""
    for layer in model.layers:
        layer.__class__ = _checkpointed_class(type(layer))
    return len(model.layers)


class LossHead:
    """Summed, masked cross-entropy of ``model`` on (inputs, targets, mask), logits in chunks when possible."""

    def __init__(self, model: nn.Module, chunk: int | None):
        self.model = model
        self.chunk = chunk
        self.note: str | None = None
        if chunk:
            self.note = self._check_split()
            if self.note:
                self.chunk = None

    # The backbone/head split that mlx-lm's language models share: model.model, then lm_head or tied embeddings.
    def _head(self) -> tuple[nn.Module, Callable[[nn.Module, mx.array], mx.array]]:
        m = self.model
        args = getattr(m, "args", None)
        if getattr(args, "tie_word_embeddings", False) or not hasattr(m, "lm_head"):
            return m.model.embed_tokens, lambda mod, h: mod.as_linear(h)
        return m.lm_head, lambda mod, h: mod(h)

    def _check_split(self) -> str | None:
        """None when head(backbone(x)) is the model's own output; otherwise why chunking is off."""
        try:
            x = mx.array([[1, 2, 3, 4]], mx.int32)
            module, apply = self._head()
            split = apply(module, self.model.model(x)).astype(mx.float32)
            whole = self.model(x).astype(mx.float32)
            err = mx.abs(split - whole).max().item()
            scale = mx.abs(whole).max().item()
        except Exception as exc:  # an architecture without the usual split: full logits it is
            return f"chunked loss off: {type(self.model).__name__} has no backbone/head split ({type(exc).__name__})"
        if not err <= 1e-3 * max(scale, 1.0):
            return f"chunked loss off: {type(self.model).__name__} transforms its logits after the output layer"
        return None

    def __call__(self, inputs: mx.array, targets: mx.array, mask: mx.array, cache: list | None = None) -> mx.array:
        if not self.chunk:
            logits = self.model(inputs, cache=cache)
            return (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum()
        hidden = self.model.model(inputs, cache=cache)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets, mask = targets.reshape(-1), mask.reshape(-1)
        module, apply = self._head()

        def chunk_loss(params, h, t, w):
            module.update(params)
            logits = apply(module, h).astype(mx.float32)
            return (nn.losses.cross_entropy(logits, mx.stop_gradient(t)) * mx.stop_gradient(w)).sum()

        chunk_loss = mx.checkpoint(chunk_loss)
        params = module.trainable_parameters()
        total = mx.array(0.0, mx.float32)
        for s in range(0, hidden.shape[0], self.chunk):
            e = s + self.chunk
            total = total + chunk_loss(params, hidden[s:e], targets[s:e], mask[s:e])
        return total
