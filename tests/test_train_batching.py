"""Length bucketing: few widths, little padding, deterministic per (seed, epoch), every row once per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.data.templating import Encoded
from finetune.train import batching


def rows_of(lengths: list[int]) -> list[Encoded]:
    return [Encoded(list(range(1, n + 1)), [0] * (n // 2) + [1] * (n - n // 2)) for n in lengths]


def mixed_lengths(n: int = 400, seed: int = 1) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(4.0, 0.9, n), 8, 512)]


def test_pad_widths_are_few_and_round_up_by_at_most_two_fifths():
    widths = batching.pad_widths(1000)
    assert widths[-1] == 1000 and widths == sorted(set(widths)) and len(widths) <= 18
    assert batching.pad_widths(511)[-1] == 511 and len(batching.pad_widths(511)) <= 15
    for length in range(17, 1001):
        w = batching.padded_width(length, widths)
        assert w >= length and w - length <= max(8, 0.4 * length)
    with pytest.raises(ValueError, match="longer than the widest batch"):
        batching.padded_width(1100, widths)


def test_collate_shifts_targets_and_masks_padding():
    rows = [Encoded([5, 6, 7, 8], [0, 0, 1, 1]), Encoded([9, 10], [0, 1])]
    b = batching.collate(rows, [8, 16])
    assert b.inputs.shape == b.targets.shape == b.mask.shape == (2, 8)
    assert b.inputs[0, :3].tolist() == [5, 6, 7] and b.targets[0, :3].tolist() == [6, 7, 8]
    assert b.mask[0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0] and b.mask[1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert b.n_tokens == 4 and b.n_targets == 3 and b.n_computed == 16


def test_epoch_covers_each_row_once_and_is_deterministic():
    lengths = mixed_lengths(203)
    plan = batching.epoch_batches(lengths, 8, seed=3, epoch=0, window_batches=4)
    flat = [i for batch in plan for i in batch]
    assert len(flat) == len(set(flat)) == 200 and all(len(b) == 8 for b in plan)
    assert plan == batching.epoch_batches(lengths, 8, seed=3, epoch=0, window_batches=4)
    assert plan != batching.epoch_batches(lengths, 8, seed=3, epoch=1, window_batches=4)
    assert plan != batching.epoch_batches(lengths, 8, seed=4, epoch=0, window_batches=4)


def test_bucketing_pads_far_less_than_unsorted_batches():
    lengths = mixed_lengths()
    rows = rows_of(lengths)
    widths = batching.pad_widths(511)
    bucketed = [
        batching.collate([rows[i] for i in b], widths)
        for b in batching.epoch_batches(lengths, 8, seed=0, epoch=0, window_batches=64)
    ]
    order = np.random.default_rng(0).permutation(len(rows))
    unsorted = [batching.collate([rows[i] for i in order[s : s + 8]], widths) for s in range(0, 400, 8)]
    ours, theirs = (
        batching.padding_stats(bucketed)["padded_fraction"],
        batching.padding_stats(unsorted)["padded_fraction"],
    )
    assert ours < 0.2 and theirs > 0.4, (ours, theirs)
    assert len({b.width for b in bucketed}) <= 24


def test_too_few_rows_for_a_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer than training.batch_size=8"):
        batching.epoch_batches([10] * 5, 8, seed=0, epoch=0, window_batches=4)


def test_eval_batches_keep_every_row():
    rows = rows_of(mixed_lengths(21))
    batches = batching.eval_batches(rows, 8, batching.pad_widths(511))
    assert [b.inputs.shape[0] for b in batches] == [8, 8, 5]
    assert sum(b.n_targets for b in batches) == sum(batching.n_targets(r) for r in rows)
