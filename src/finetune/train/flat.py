"""The trainable tensors as one float32 buffer, so that an optimizer step is a handful of kernels.

A LoRA model has hundreds of small trainable tensors (two per adapted layer: 336
on the Qwen2.5-0.5B shape). Updated one by one, AdamW, the skip guards, the
gradient norm and clipping each launch a kernel per tensor, about 2,000 a step,
and on a GPU the host cannot launch them as fast as the GPU runs them
(``benchmarks/results/h200-2026-12-02-step.jsonl``). Here the compiled gradient
step concatenates the gradients once, AdamW and its guards see one array, and
the model's tensors are views of the updated buffer: cast once to the LoRA
compute dtype, then sliced (views cost no kernel).

The float32 buffer is the master copy: checkpoints and adapters are written from
it, tensor by tensor and under the names mlx-lm uses, so their format does not
depend on this layout (a checkpoint of per-tensor state restores into it).
AdamW is elementwise, so one array gives the per-tensor update exactly.

Measured on an H200 (``benchmarks/results/h200-2026-12-02-b-step.jsonl``, 0.5B
shape): kernel launches per step 6,572 before, 3,234 after; with the LoRA path
still in float32 a step took 100.8 ms against 144.9 ms before (the additive
mask, worth 5.4 ms, included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

KEY = "trainable"  # the one entry of the optimizer's parameter tree
COMPUTE_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def compute_dtype(setting: str, backend: str, model: nn.Module, fine_tune_type: str) -> mx.Dtype:
    """The dtype of the LoRA path for ``lora.compute_dtype``.

    auto follows measurements: on CUDA, LoRA weights in float32 promote the
    bf16 activations, and the LoRA path took about 110 of 372 GPU milliseconds
    of an 8B-shape step (tf32 GEMMs, casts); there auto computes it in the base
    layers' dtype, as autocast does (the master weights stay float32). DoRA's
    weight norms, and the other backends, stay in float32.
    """
    if setting != "auto":
        return COMPUTE_DTYPES[setting]
    if backend != "cuda" or fine_tune_type != "lora":
        return mx.float32
    dtype = base_dtype(model)
    return dtype if dtype in (mx.bfloat16, mx.float16) else mx.float32


def base_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype of the first adapted layer's base weights (a quantized layer's scales)."""
    for _, module in model.named_modules():
        linear = getattr(module, "linear", None)
        if linear is not None and hasattr(module, "lora_a"):
            return getattr(linear, "scales", linear.weight).dtype
    return mx.float32


@dataclass(frozen=True)
class Layout:
    """Where each named tensor lives in the flat buffer."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # one more than names: the last is the size

    @classmethod
    def of(cls, tree: Any) -> Layout:
        leaves = tree_flatten(tree)
        offsets = [0]
        for _, v in leaves:
            offsets.append(offsets[-1] + v.size)
        return cls(tuple(k for k, _ in leaves), tuple(tuple(v.shape) for _, v in leaves), tuple(offsets))

    def flatten(self, tree: Any, dtype: mx.Dtype | None = None) -> mx.array:
        """The tensors of ``tree`` (named like the layout) end to end; one cast after the copy."""
        leaves = dict(tree_flatten(tree))
        flat = mx.concatenate([leaves[k].reshape(-1) for k in self.names])
        return flat if dtype is None else flat.astype(dtype)

    def named(self, flat: mx.array) -> dict[str, mx.array]:
        """Views of ``flat`` by name."""
        o = self.offsets
        return {k: flat[o[i] : o[i + 1]].reshape(s) for i, (k, s) in enumerate(zip(self.names, self.shapes))}

    def tree(self, flat: mx.array) -> Any:
        return tree_unflatten(list(self.named(flat).items()))


class FlatTrainables:
    """The master buffer of a model's trainable tensors and a flat optimizer state.

    Built from the model's tensors and the optimizer's per-tensor state (as
    initialised or restored); from then on ``state`` is what compiled functions
    capture, and ``adapters``/``optimizer_tensors`` give the per-tensor form back.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, dtype: mx.Dtype):
        self.model, self.optimizer, self.dtype = model, optimizer, dtype
        trainable = model.trainable_parameters()
        self.layout = Layout.of(trainable)
        per_tensor = optimizer.state
        flat_state = {k: v for k, v in per_tensor.items() if isinstance(v, mx.array)}  # step, learning_rate
        names = set(self.layout.names)
        moments = {name: s for name, s in tree_flatten(per_tensor) if name.rpartition(".")[0] in names}
        slots = sorted({name.rpartition(".")[2] for name in moments})  # AdamW: m, v
        flat_state[KEY] = {
            slot: mx.concatenate([moments[f"{n}.{slot}"].reshape(-1) for n in self.layout.names]) for slot in slots
        }
        self.state = {"master": self.layout.flatten(trainable, mx.float32)}
        optimizer.state = flat_state
        optimizer.init({KEY: self.state["master"]})  # marks it initialised (it would re-init inside the trace)
        self.show(self.state["master"])
        mx.eval(self.state, optimizer.state, model.parameters())

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in COMPUTE_DTYPES.items() if v == self.dtype)

    def show(self, master: mx.array) -> None:
        """Point the model's trainable tensors at ``master``, in the compute dtype (one cast for all)."""
        self.model.update(self.layout.tree(master.astype(self.dtype)))

    def gather(self, grads: Any) -> mx.array:
        """One flat float32 gradient; a 16-bit LoRA path's gradients are cast after the copy."""
        return self.layout.flatten(grads, mx.float32)

    def adapters(self) -> dict[str, mx.array]:
        """The float32 master tensors by name (the adapter a checkpoint holds)."""
        return self.layout.named(self.state["master"])

    def optimizer_tensors(self) -> dict[str, mx.array]:
        """The optimizer state by name, as ``tree_flatten`` of mlx's per-tensor state names it."""
        out = {k: v for k, v in self.optimizer.state.items() if isinstance(v, mx.array)}
        for slot, flat in self.optimizer.state[KEY].items():
            out.update({f"{name}.{slot}": v for name, v in self.layout.named(flat).items()})
        return out
