"""The compiled training and evaluation steps: summed loss, gradient norm, token-weighted update.

The gradient leaves the gradient step as one flat float32 array, and the update
works on the flat master copy (``flat``): a few kernels a step, not a few per tensor.

Skip decisions are made on the device: a micro-batch with a non-finite loss or
gradient contributes zeros, and an update with no usable micro-batch leaves
parameters and optimizer state as they were (``mx.where``), so the host never
waits for a step; ``PendingStep.resolve`` reads the outcome when it is reported.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from finetune.train import packing
from finetune.train.batching import Batch
from finetune.train.flat import KEY, FlatTrainables
from finetune.train.memory import LossHead


def compile_steps(
    flat: FlatTrainables,
    clip: float | None,
    head: LossHead,
    traces: dict[str, int],
    mask_dtype: mx.Dtype | None = None,
) -> tuple[Any, Any, Any]:
    """(grad_fn, update_fn, eval_fn); built after a restore, since compile captures the optimizer state object.

    The gradient is one flat float32 array (``flat``). ``mask_dtype``: None for a
    boolean segment mask, else an additive one in that dtype (``packing.mask_dtype``).
    ``traces`` counts how often each function was traced (Python in them runs only while tracing).
    """
    model, optimizer = flat.model, flat.optimizer

    def loss_sum(inputs, targets, mask, *segments):
        # A packed batch carries segment ids: attention stays inside each row.
        cache = packing.segment_caches(model, segments[0], mask_dtype) if segments else None
        return head(inputs, targets, mask, cache)

    value_and_grad = nn.value_and_grad(model, loss_sum)

    # model.state is an output too: value_and_grad leaves the traced parameters in the model.
    grad_state = [model.state, mx.random.state]

    @partial(mx.compile, inputs=grad_state, outputs=grad_state)
    def grad_fn(*arrays):
        traces["grad"] += 1
        loss, grads = value_and_grad(*arrays)
        grad = flat.gather(grads)
        return loss, mx.sum(mx.square(grad)), grad

    state = [model.state, optimizer.state, flat.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update_fn(grad, n_targets, apply):
        traces["update"] += 1
        grads = {KEY: grad / mx.maximum(n_targets, 1.0)}
        if clip is not None:
            grads, _ = optim.clip_grad_norm(grads, clip)
        old_master, old_state = flat.state["master"], dict(tree_flatten(optimizer.state))
        master = mx.where(apply, optimizer.apply_gradients(grads, {KEY: old_master})[KEY], old_master)
        flat.state["master"] = master
        flat.show(master)
        # Entries the update created (a resumed state lacks the empty ones) have no old value to keep.
        kept = tree_map_with_path(
            lambda path, new: mx.where(apply, new, old_state[path]) if path in old_state else new, optimizer.state
        )
        _assign(optimizer.state, kept)

    @partial(mx.compile, inputs=[model.state])
    def eval_fn(*arrays):
        traces["eval"] += 1
        return loss_sum(*arrays)

    return grad_fn, update_fn, eval_fn


def device_arrays(batch: Batch) -> tuple[mx.array, ...]:
    """What the compiled functions take: inputs, targets, mask, and the segment ids of a packed batch."""
    arrays = (batch.inputs, batch.targets, batch.mask) + (() if batch.segments is None else (batch.segments,))
    return tuple(mx.array(a) for a in arrays)


def _assign(tree: Any, new: Any) -> None:
    """Replace the leaves of a nested dict/list in place (compiled state must keep its containers)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in list(items):
        if isinstance(v, (dict, list)):
            _assign(v, new[k])
        else:
            tree[k] = new[k]


class PendingStep:
    """One step's outcome, still on the device until ``resolve`` (one wait for a whole report window)."""

    def __init__(self) -> None:
        self.grads: dict | None = None
        self.loss_sum = mx.array(0.0, mx.float32)
        self.n_targets = mx.array(0, mx.int32)
        self.checks: list[str | tuple[mx.array, mx.array]] = []  # per micro-batch: a host reason or device flags
        self.updated: mx.array | bool = False

    def add(self, loss: mx.array, sq_norm: mx.array, grads: dict, n_targets: int) -> None:
        finite_loss = mx.isfinite(loss)
        ok = finite_loss & mx.isfinite(sq_norm)
        kept = tree_map(lambda x: mx.where(ok, x, mx.zeros_like(x)), grads)  # noqa: B023
        self.grads = kept if self.grads is None else tree_map(mx.add, self.grads, kept)
        self.loss_sum = self.loss_sum + mx.where(ok, loss, 0.0)
        self.n_targets = self.n_targets + mx.where(ok, n_targets, 0)
        self.checks.append((ok, finite_loss))

    def resolve(self) -> dict[str, Any]:
        flags = [c for c in self.checks if not isinstance(c, str)]
        mx.eval(self.loss_sum, self.n_targets, flags, self.updated)
        skipped = []
        for c in self.checks:
            if isinstance(c, str):
                skipped.append(c)
            elif not c[0].item():
                skipped.append("non-finite loss" if not c[1].item() else "non-finite gradient")
        updated = bool(self.updated.item()) if isinstance(self.updated, mx.array) else self.updated
        return {
            "loss_sum": self.loss_sum.item(),
            "n_targets": self.n_targets.item(),
            "skipped": skipped,
            "updated": updated,
        }


def settle(pending: list[tuple[int, list[Batch], PendingStep]], window: Any, state: Any) -> list[tuple[int, str]]:
    """Wait for queued steps, add them to the progress window and the loop state; (step, reason) of each skip."""
    skips = []
    for step, batches, p in pending:
        out = p.resolve()
        window.add(batches, out, 0.0)
        state.supervised_tokens += out["n_targets"]
        state.skipped_batches += len(out["skipped"])
        skips += [(step, reason) for reason in out["skipped"]]
    return skips
