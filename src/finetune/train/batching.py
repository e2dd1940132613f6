"""Length-bucketed batches padded to a few fixed widths (the fallback when packing is off or unsupported).

mlx-lm's ``iterate_batches`` meant to sort by length but sorts by the size of
the row dict, so its batches mix short and long rows and about a quarter of
the computed tokens are padding. Here rows are sorted by token count inside
shuffled windows, cut into batches, and the batches shuffled again; each batch
is padded to the next width of a short ladder, so the compiled step is traced
once per width instead of once per batch shape.

Every epoch's order is a pure function of (seed, epoch): a resumed run only
needs the cursor (epoch, batch index) to continue with the same batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from finetune.data.templating import Encoded
from finetune.data.tokenized import TokenizedData, TokenizedSplit

PAD_ID = 0  # any valid id works: padded positions are masked out of the loss


@dataclass(frozen=True)
class Batch:
    """Inputs, next-token targets and a 0/1 float mask of supervised targets, all (rows, width)."""

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    n_tokens: int  # real (non-padding) input positions
    n_targets: int  # supervised target tokens
    segments: np.ndarray | None = None  # packed batches: row number inside each pack, 0 for the empty tail
    positions: np.ndarray | None = None  # packed batches: position of each token inside its own row

    @property
    def width(self) -> int:
        return int(self.inputs.shape[1])

    @property
    def n_computed(self) -> int:
        return int(self.inputs.size)


def n_targets(row: Encoded) -> int:
    """Supervised tokens the model can predict: token 0 has no context, so it never counts."""
    return sum(row.loss_mask[1:])


def pad_widths(max_width: int) -> list[int]:
    """Widths from 16 growing by a quarter each (multiples of 8), up to ``max_width``: 15 up to 512, 18 up to 1024.

    Every new width is one more trace of the compiled step (about 40 widths
    dominated short GPU runs); a batch grows by at most 40 % (small widths), 26 % above 100 tokens,
    and length-sorted batches end up about 15 % padding (tests/test_train_batching.py).
    """
    widths, w = [], 16
    while w < max_width:
        widths.append(w)
        w = -(-round(w * 1.25) // 8) * 8
    widths.append(max_width)
    return widths


def padded_width(length: int, widths: Sequence[int]) -> int:
    for w in widths:
        if w >= length:
            return w
    raise ValueError(f"a row of {length} input tokens is longer than the widest batch ({widths[-1]})")


def usable(split: TokenizedSplit) -> np.ndarray:
    """Indices of the rows with a predictable target (others would add 0/0 to the loss)."""
    sums = np.concatenate([[0], np.cumsum(split.loss_mask, dtype=np.int64)])
    starts, ends = split.offsets[:-1], split.offsets[1:]
    targets = sums[ends] - sums[np.minimum(starts + 1, ends)]  # token 0 has no context
    return np.flatnonzero((ends - starts >= 2) & (targets > 0))


def collate_packed(split: TokenizedSplit, rows: Sequence[int], widths: Sequence[int]) -> Batch:
    """Rows of the packed arrays shifted into (inputs, targets, mask), padded to one ladder width."""
    starts, ends = split.offsets[:-1][rows], split.offsets[1:][rows]
    width = padded_width(int((ends - starts).max()) - 1, widths)
    inputs = np.full((len(rows), width), PAD_ID, np.int32)
    targets = np.full((len(rows), width), PAD_ID, np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        n = b - a - 1
        inputs[i, :n] = split.input_ids[a : b - 1]
        targets[i, :n] = split.input_ids[a + 1 : b]
        mask[i, :n] = split.loss_mask[a + 1 : b]
    return Batch(inputs, targets, mask, n_tokens=int((ends - starts - 1).sum()), n_targets=int(mask.sum()))


def eval_batches_packed(
    split: TokenizedSplit, rows: Sequence[int], batch_size: int, widths: Sequence[int]
) -> list[Batch]:
    """Validation batches: sorted by length (stably) for little padding; order does not matter for a sum."""
    rows = np.asarray(rows, np.int64)
    order = rows[np.argsort(split.lengths()[rows], kind="stable")]
    return [collate_packed(split, order[s : s + batch_size], widths) for s in range(0, len(order), batch_size)]


def collate(rows: Sequence[Encoded], widths: Sequence[int]) -> Batch:
    """Encoded rows (built by hand) as one batch, through the packed path."""
    return collate_packed(TokenizedSplit.from_encoded(rows), list(range(len(rows))), widths)


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, window_batches: int
) -> list[list[int]]:
    """Row indices of each batch of one epoch, deterministic in (seed, epoch).

    The remainder that does not fill a batch is dropped (a different remainder
    each epoch) so every training batch has the same number of rows.
    """
    if len(lengths) < batch_size:
        raise ValueError(
            f"the training split has {len(lengths)} usable rows, fewer than training.batch_size={batch_size}"
        )
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    order = order[: len(order) - len(order) % batch_size]
    window = batch_size * window_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window].tolist(), key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def epoch_order(n: int, seed: int) -> list[int]:
    """A fixed pseudo-random order of ``n`` rows."""
    return np.random.default_rng([seed, 1 << 30]).permutation(n).tolist()


def eval_batches(rows: Sequence[Encoded], batch_size: int, widths: Sequence[int]) -> list[Batch]:
    """Encoded rows (built by hand) as validation batches, through the packed path."""
    return eval_batches_packed(TokenizedSplit.from_encoded(rows), range(len(rows)), batch_size, widths)


def padding_stats(batches: Sequence[Batch]) -> dict[str, float]:
    computed = sum(b.n_computed for b in batches)
    real = sum(b.n_tokens for b in batches)
    return {
        "computed_tokens": computed,
        "real_tokens": real,
        "supervised_tokens": sum(b.n_targets for b in batches),
        "padded_fraction": 1.0 - real / computed if computed else 0.0,
    }


def usable_rows(split: TokenizedSplit, name: str) -> tuple[np.ndarray, str | None]:
    """Indices of the rows with a predictable target, and a note when some had none."""
    kept = usable(split)
    if len(kept) == len(split):
        return kept, None
    return kept, f"{name}: dropped {len(split) - len(kept)} of {len(split)} rows with no supervised tokens"


def as_tokenized(data: TokenizedData | Mapping[str, Sequence[Encoded]]) -> TokenizedData:
    return data if isinstance(data, TokenizedData) else TokenizedData.from_encoded(data)
