"""Which batching computes less for a run: an estimate of the training FLOPs of packs and of length buckets.

MLX computes attention densely over a sequence's whole width, masked positions
included, so a pack of L tokens pays L² attention however short its rows are,
while a bucketed row pays only its own padded width squared. Packs in turn
compute almost no padding. Which wins depends on the model (linear layers
against attention) and on the rows' lengths, so ``training.packing: auto``
compares the two plans of the run's own rows (``plan.py``).

For one micro-batch of B sequences of width L (padding included):

- linear layers: 4·P·B·L. Forward 2·P per token; backward 2·P more for the
  activation gradients (the frozen base has no weight gradients, LoRA's are
  small). P counts every linear layer's weights and the output head (a tied
  embedding is the head).
- attention: 12·layers·width·B·L², width = heads × head dim. Forward Q·Kᵀ and
  weights·V (2·L²·width each); backward four such products.

Measured on this CPU with the tiny model (one compiled step, tokens/s), the
attention share came out about 1.5× what these FLOPs say; softmax and masking
are not matrix products. The estimate stays the plain FLOP count: it decides
the right way in both measured cases (tiny model on short rows: buckets;
0.5B and 8B shapes on long rows on a GPU: packs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.nn as nn

from finetune.train import batching

LINEAR_FLOPS = 4  # per weight and computed token: forward 2, activation gradient 2
ATTENTION_FLOPS = 12  # per layer, attention width and L² of a sequence: forward 4, backward 8


@dataclass(frozen=True)
class ModelDims:
    layers: int
    attention_width: int  # query heads × head dim
    linear_params: int  # the weights of every linear layer, output head included


@dataclass(frozen=True)
class Estimate:
    """Training FLOPs per real (non-padding) token of each plan, and the padding the buckets compute."""

    packed: float
    buckets: float
    bucket_padding: float

    @property
    def ratio(self) -> float:
        return self.packed / self.buckets

    @property
    def packs(self) -> bool:
        return self.packed < self.buckets


def _in_out(module: nn.Module) -> int:
    """Input × output features of a linear layer or an embedding, quantized or not."""
    rows, cols = module.weight.shape
    return rows * cols * 32 // getattr(module, "bits", 32)  # quantized weights pack 32 // bits values per uint32


def model_dims(model: nn.Module) -> ModelDims:
    linear, embedding, has_head = 0, 0, False
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            linear += _in_out(module)
            has_head |= name.rsplit(".", 1)[-1] in ("lm_head", "output")
        elif isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            embedding = max(embedding, _in_out(module))
    args = getattr(model, "args", None)
    heads, hidden = getattr(args, "num_attention_heads", None), getattr(args, "hidden_size", None)
    head_dim = getattr(args, "head_dim", None) or (hidden // heads if heads and hidden else None)
    width = heads * head_dim if heads and head_dim else hidden or 0
    return ModelDims(len(model.layers), int(width), linear + (0 if has_head else embedding))


def batch_flops(dims: ModelDims, sequences: int, width: int) -> float:
    """Training FLOPs of one micro-batch of ``sequences`` × ``width`` computed tokens."""
    linear = LINEAR_FLOPS * dims.linear_params * sequences * width
    return linear + ATTENTION_FLOPS * dims.layers * dims.attention_width * sequences * width**2


def estimate(
    dims: ModelDims,
    inputs: Sequence[int],
    packed_steps: int,
    pack_shape: tuple[int, int],
    buckets: Sequence[Sequence[int]],
    widths: Sequence[int],
) -> Estimate:
    """Both plans of one epoch: ``packed_steps`` micro-batches of ``pack_shape`` (packs, pack length) holding every
    row, or the ``buckets`` (row indices per batch) padded to the ladder ``widths``; ``inputs`` are input tokens."""
    packed = packed_steps * batch_flops(dims, *pack_shape) / max(sum(inputs), 1)
    shapes = [(len(b), batching.padded_width(max(inputs[i] for i in b), widths)) for b in buckets]
    real = sum(inputs[i] for b in buckets for i in b)
    computed = sum(n * w for n, w in shapes)
    bucketed = sum(batch_flops(dims, n, w) for n, w in shapes) / max(real, 1)
    return Estimate(packed, bucketed, 1 - real / computed if computed else 0.0)
