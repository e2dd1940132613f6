"""Sequence packing: rows best-fit into fixed-length packs, attention kept block-diagonal.

Every training step then has the same shape (``packs_per_step`` × ``pack_length``),
so the compiled step is traced once, and no computed token is padding beyond the
tail of each pack. Row boundaries are kept by segment ids: attention inside a pack
is causal *and* restricted to the query's own segment, so a packed row sees exactly
what it would see alone. Positions continue across a pack; with rope, attention
scores depend only on positions relative to each other inside a block, so that is
harmless (``tests/test_train_packing.py`` checks losses and gradients against the
rows run one by one).

The mask reaches mlx-lm's models through the cache argument: every model builds its
mask with ``models/base.py:create_attention_mask``, which asks ``cache.make_mask``
when the cache object has one. ``SegmentCache`` is such an object that stores
nothing (offset 0, keys and values passed through). Whether a given architecture
honours it is checked once per model by ``supports_segments`` on a tiny input;
where it does not (state-space or hybrid layers), the trainer falls back to
bucketing and says why.

Every epoch's packs are a pure function of (seed, epoch), like the bucketed plan.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from finetune.data.tokenized import TokenizedSplit
from finetune.train.batching import PAD_ID, Batch

PACK_ALIGN = 64  # pack lengths are multiples of this: kernel-friendly, and a few distinct shapes at most


def default_pack_length(longest_input: int) -> int:
    """The shortest multiple of ``PACK_ALIGN`` that holds the longest row's inputs."""
    return -(-longest_input // PACK_ALIGN) * PACK_ALIGN


def packs_per_step(batch_tokens: int | None, batch_size: int, mean_input: float, pack_length: int) -> int:
    """Packs in one micro-batch: ``batch_tokens`` when given, else about ``batch_size`` rows' worth of tokens."""
    tokens = batch_tokens if batch_tokens is not None else batch_size * mean_input
    return max(1, round(tokens / pack_length))


def best_fit(lengths: Sequence[int], order: Sequence[int], capacity: int, window: int) -> list[list[int]]:
    """Best-fit decreasing inside windows of ``window`` rows taken in ``order``: deterministic, ~O(n log n).

    Each row goes into the open pack whose free space it fills most tightly; a
    window of rows is sorted longest first so that large rows claim packs before
    small ones fill the gaps.
    """
    packs: list[list[int]] = []
    for start in range(0, len(order), window):
        free: list[tuple[int, int]] = []  # (free tokens, pack index), sorted
        for i in sorted(order[start : start + window], key=lambda i: (-lengths[i], i)):
            n = lengths[i]
            if n > capacity:
                raise ValueError(f"a row of {n} input tokens is longer than training.pack_length={capacity}")
            k = bisect.bisect_left(free, (n, -1))
            if k == len(free):
                packs.append([i])
                room, p = capacity - n, len(packs) - 1
            else:
                room, p = free.pop(k)
                packs[p].append(i)
                room -= n
            if room > 0:
                bisect.insort(free, (room, p))
    return packs


def epoch_packs(
    lengths: Sequence[int], capacity: int, per_step: int, seed: int, epoch: int, window_rows: int
) -> list[list[list[int]]]:
    """The micro-batches of one epoch as lists of packs of row indices; deterministic in (seed, epoch).

    Lengths are input tokens (a row's tokens minus one). The last micro-batch may
    hold fewer packs; ``collate_packs`` fills it up with empty ones.
    """
    rng = np.random.default_rng([seed, epoch, 7])
    order = rng.permutation(len(lengths)).tolist()
    packs = best_fit(lengths, order, capacity, window_rows)
    packs = [packs[i] for i in rng.permutation(len(packs))]
    return [packs[s : s + per_step] for s in range(0, len(packs), per_step)]


def collate_packs(split: TokenizedSplit, packs: Sequence[Sequence[int]], n_packs: int, pack_length: int) -> Batch:
    """Packs of ``split``'s rows as one (n_packs, pack_length) batch with segment ids (0: the empty tail)."""
    inputs = np.full((n_packs, pack_length), PAD_ID, np.int32)
    targets = np.full((n_packs, pack_length), PAD_ID, np.int32)
    mask = np.zeros((n_packs, pack_length), np.float32)
    segments = np.zeros((n_packs, pack_length), np.int32)
    positions = np.zeros((n_packs, pack_length), np.int32)
    n_tokens = 0
    for p, pack in enumerate(packs):
        at = 0
        for s, row in enumerate(pack, start=1):
            a, b = int(split.offsets[row]), int(split.offsets[row + 1])
            n = b - a - 1
            inputs[p, at : at + n] = split.input_ids[a : b - 1]
            targets[p, at : at + n] = split.input_ids[a + 1 : b]
            mask[p, at : at + n] = split.loss_mask[a + 1 : b]
            segments[p, at : at + n] = s
            positions[p, at : at + n] = np.arange(n)
            at += n
        n_tokens += at
    return Batch(
        inputs, targets, mask, n_tokens=n_tokens, n_targets=int(mask.sum()), segments=segments, positions=positions
    )


def eval_packs(split: TokenizedSplit, rows: Sequence[int], n_packs: int, pack_length: int) -> list[Batch]:
    """Validation rows packed into batches of the training shape (so evaluation compiles once, too)."""
    rows = [int(r) for r in rows]
    lengths = (split.lengths()[rows] - 1).tolist()
    packs = [[rows[i] for i in p] for p in best_fit(lengths, list(range(len(rows))), pack_length, max(len(rows), 1))]
    return [collate_packs(split, packs[s : s + n_packs], n_packs, pack_length) for s in range(0, len(packs), n_packs)]


# ---------------------------------------------------------------- the mask


def mask_dtype(backend: str, activations: mx.Dtype) -> mx.Dtype | None:
    """None: a boolean segment mask; else an additive one (0 or -inf) in this dtype.

    MLX's CUDA attention takes no boolean mask and converts it in every layer;
    one additive mask a step measured 159 against 175 ms a step on an H200
    (0.5B shape, ``benchmarks/results/h200-2026-12-02-step.jsonl``). Metal and
    the CPU take the boolean one as it is.
    """
    return activations if backend == "cuda" else None


def segment_mask(segments: mx.array, dtype: mx.Dtype | None = None) -> mx.array:
    """(B, 1, L, L): causal and within the query's own segment; boolean, or additive in ``dtype``."""
    n = segments.shape[1]
    causal = mx.arange(n)[:, None] >= mx.arange(n)[None]
    same = segments[:, :, None] == segments[:, None, :]
    allowed = mx.expand_dims(same & causal, 1)
    return allowed if dtype is None else mx.where(allowed, 0.0, -mx.inf).astype(dtype)


class SegmentCache:
    """A stand-in for mlx-lm's KV cache that stores nothing and supplies a block-diagonal mask."""

    offset = 0

    def __init__(self, mask: mx.array):
        self.mask = mask

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        if window_size is None:
            return self.mask
        idx = mx.arange(n)
        inside = idx[:, None] < idx[None] + window_size
        if self.mask.dtype == mx.bool_:
            return self.mask & inside
        return mx.where(inside, self.mask, -mx.inf).astype(self.mask.dtype)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values


def segment_caches(model, segments: mx.array, dtype: mx.Dtype | None = None) -> list[SegmentCache]:
    """One cache object per block, all sharing one mask built from ``segments`` (``segment_mask``'s dtype)."""
    mask = segment_mask(segments, dtype)
    return [SegmentCache(mask) for _ in model.layers]


def supports_segments(model) -> str | None:
    """None when ``model`` keeps packed rows apart through ``SegmentCache``; otherwise why not.

    Two rows run packed must give the second row the logits it gets alone, and
    clearly closer to them than a plain causal mask would (so a model that
    ignores the cache's mask is caught, whatever its precision).
    """
    rng = np.random.default_rng(0)
    vocab = int(getattr(getattr(model, "args", None), "vocab_size", 0) or 256)
    a, b = rng.integers(1, min(vocab, 1000), size=(2, 12))
    both = mx.array(np.concatenate([a, b])[None].astype(np.int32))
    segments = mx.array(np.array([[1] * 12 + [2] * 12], np.int32))
    try:
        alone = model(mx.array(b[None].astype(np.int32))).astype(mx.float32)
        packed = model(both, cache=segment_caches(model, segments))[:, 12:].astype(mx.float32)
        leaky = model(both)[:, 12:].astype(mx.float32)
        err, leak = (mx.abs(x - alone).max().item() for x in (packed, leaky))
    except Exception as exc:  # any architecture-specific refusal means: no packing for this model
        return f"{type(model).__name__} cannot take a segment mask through its cache ({type(exc).__name__}: {exc})"
    if not err <= 0.05 * leak:
        return f"{type(model).__name__} ignores the segment mask (packed rows differ from single rows by {err:.3g})"
    return None
