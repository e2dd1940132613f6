"""Which micro-batches a run trains on: packed fixed-shape batches where the model allows, else length buckets.

Every epoch's plan is a pure function of (seed, epoch), so a resumed run only
needs the cursor (epoch, micro-batch index) to continue with the same batches.
Batches are collated straight from the tokenized split's packed arrays.
"""

from __future__ import annotations

import mlx.nn as nn
import numpy as np

from finetune.config import TrainingConfig
from finetune.data.tokenized import TokenizedSplit
from finetune.errors import TrainingError
from finetune.train import batching, packing
from finetune.train.batching import Batch
from finetune.train.checkpoints import LoopState


class BatchPlan:
    def __init__(
        self, t: TrainingConfig, model: nn.Module, split: TokenizedSplit, rows: np.ndarray, widths: list, longest: int
    ):
        self.t, self.split, self.rows, self.widths = t, split, rows, widths
        self.lengths = split.lengths()[rows].tolist()
        self._cached: tuple[int, list] | None = None
        why_not = packing.supports_segments(model) if t.packing else None
        self.packed = t.packing and why_not is None
        self.note = f"packing off, batches are length-bucketed instead: {why_not}" if why_not else None
        if not self.packed:
            self.per_epoch = len(rows) // t.batch_size
            return
        longest_input = longest - 1  # training and validation rows
        self.pack_length = t.pack_length or packing.default_pack_length(longest_input)
        self.inputs = [n - 1 for n in self.lengths]
        if self.pack_length < max(self.inputs, default=0):
            raise TrainingError(
                f"training.pack_length={self.pack_length} is shorter than the longest row ({max(self.inputs)} input tokens)"
            )
        mean = sum(self.inputs) / max(len(self.inputs), 1)
        self.packs_per_step = packing.packs_per_step(t.batch_tokens, t.batch_size, mean, self.pack_length)
        self.per_epoch = len(self.epoch(0)) if len(rows) >= t.batch_size else 0

    def describe(self) -> str:
        return f"packed {self.packs_per_step} x {self.pack_length}" if self.packed else "bucketed"

    def epoch(self, epoch: int) -> list:
        """The micro-batches of one epoch: positions in ``rows`` (bucketed), or packs of them."""
        t = self.t
        if self.packed:
            window = t.batch_size * t.sort_window_batches
            return packing.epoch_packs(self.inputs, self.pack_length, self.packs_per_step, t.seed, epoch, window)
        return batching.epoch_batches(self.lengths, t.batch_size, t.seed, epoch, t.sort_window_batches)

    def next(self, s: LoopState) -> Batch:
        """The micro-batch at the cursor (epoch, batch index), which it advances; packed epochs vary in length."""
        if self._cached is None or self._cached[0] != s.epoch:
            self._cached = (s.epoch, self.epoch(s.epoch))
        if s.batch_index >= len(self._cached[1]):
            s.epoch, s.batch_index = s.epoch + 1, 0
            self._cached = (s.epoch, self.epoch(s.epoch))
        s.batch_index += 1
        entry = self._cached[1][s.batch_index - 1]
        if self.packed:
            packs = [[int(self.rows[i]) for i in p] for p in entry]
            return packing.collate_packs(self.split, packs, self.packs_per_step, self.pack_length)
        return batching.collate_packed(self.split, self.rows[entry], self.widths)

    def eval_batches(self, split: TokenizedSplit, rows: np.ndarray) -> list[Batch]:
        """Validation, in the training shape when packed (so evaluation compiles once too)."""
        if self.t.val_batches != -1:
            # A fixed random subset, not the shortest rows that a length sort would put first.
            order = batching.epoch_order(len(rows), self.t.seed)
            rows = rows[order[: self.t.val_batches * self.t.batch_size]]
        if self.packed:
            return packing.eval_packs(split, rows, self.packs_per_step, self.pack_length)
        return batching.eval_batches_packed(split, rows, self.t.batch_size, self.widths)
