"""The compiled training and evaluation steps: summed loss, gradient norm, token-weighted update."""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map


def compile_steps(model: nn.Module, optimizer: optim.Optimizer, clip: float | None) -> tuple[Any, Any, Any]:
    """(grad_fn, update_fn, eval_fn); built after a restore, since compile captures the optimizer state object."""

    def loss_sum(inputs, targets, mask):
        logits = model(inputs)
        return (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum()

    value_and_grad = nn.value_and_grad(model, loss_sum)

    # model.state is an output too: value_and_grad leaves the traced parameters in the model.
    grad_state = [model.state, mx.random.state]

    @partial(mx.compile, inputs=grad_state, outputs=grad_state)
    def grad_fn(inputs, targets, mask):
        loss, grads = value_and_grad(inputs, targets, mask)
        sq_norm = sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads))
        return loss, sq_norm, grads

    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update_fn(grads, n_targets):
        grads = tree_map(lambda g: g / n_targets, grads)
        if clip is not None:
            grads, _ = optim.clip_grad_norm(grads, clip)
        optimizer.update(model, grads)

    @partial(mx.compile, inputs=[model.state])
    def eval_fn(inputs, targets, mask):
        return loss_sum(inputs, targets, mask)

    return grad_fn, update_fn, eval_fn
