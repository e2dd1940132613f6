"""Which micro-batches a run trains on: packed fixed-shape batches where they pay and the model allows, else buckets.

Every epoch's plan is a pure function of (seed, epoch), so a resumed run only
needs the cursor (epoch, micro-batch index) to continue with the same batches.
Batches are collated straight from the tokenized split's packed arrays.

``training.packing: auto`` (the default) packs only where an estimate of the
training compute (``costs``) over epoch 0's packs and buckets favours packs; it
is decided once per run from the configuration, the model's dimensions and the
rows, all fingerprinted, so a resumed run decides the same and its cursor
points into the same plan.
"""

from __future__ import annotations

import mlx.nn as nn
import numpy as np

from finetune.config import TrainingConfig
from finetune.data.tokenized import TokenizedSplit
from finetune.errors import TrainingError
from finetune.train import batching, costs, packing
from finetune.train.batching import Batch
from finetune.train.checkpoints import LoopState


class BatchPlan:
    def __init__(
        self,
        t: TrainingConfig,
        model: nn.Module,
        split: TokenizedSplit,
        rows: np.ndarray,
        widths: list,
        longest: int,
        world: int = 1,
    ):
        self.t, self.split, self.rows, self.widths = t, split, rows, widths
        self.lengths = split.lengths()[rows].tolist()
        self._cached: tuple[int, list] | None = None
        self.estimate: costs.Estimate | None = None  # training.packing: auto only
        self.packed, self.note = self._choose(model, longest, world)
        if not self.packed:
            self.per_epoch = len(rows) // t.batch_size
            return
        self.per_epoch = len(self._epoch_cached(0)) if len(rows) >= t.batch_size else 0

    def _choose(self, model: nn.Module, longest: int, world: int) -> tuple[bool, str | None]:
        """Whether to pack (the setting, what the model and the ranks allow, the estimate), and a note on why not."""
        setting = self.t.packing
        if setting is False:
            return False, None
        if world > 1:  # ranks split a batch's rows between them; packs are not split by rank yet
            return (
                False,
                f"packing {str(setting).lower()}: length buckets on {world} ranks (packs are not split by rank)",
            )
        why_not = packing.supports_segments(model)
        if why_not:
            return False, f"packing off, batches are length-bucketed instead: {why_not}"
        self._pack_shape(longest)
        if setting is True:
            return True, None
        return self._auto(model)

    def _pack_shape(self, longest: int) -> None:
        t = self.t
        longest_input = longest - 1  # training and validation rows
        self.pack_length = t.pack_length or packing.default_pack_length(longest_input)
        self.inputs = [n - 1 for n in self.lengths]
        if self.pack_length < max(self.inputs, default=0):
            raise TrainingError(
                f"training.pack_length={self.pack_length} is shorter than the longest row ({max(self.inputs)} input tokens)"
            )
        mean = sum(self.inputs) / max(len(self.inputs), 1)
        self.packs_per_step = packing.packs_per_step(t.batch_tokens, t.batch_size, mean, self.pack_length)

    def _auto(self, model: nn.Module) -> tuple[bool, str | None]:
        """Pack when the estimated training compute of epoch 0's packs is below that of its length buckets."""
        t = self.t
        if len(self.rows) < t.batch_size:
            return False, None  # too few rows for a batch: the trainer refuses the run either way
        packs = self._packs(0)
        buckets = batching.epoch_batches(self.lengths, t.batch_size, t.seed, 0, t.sort_window_batches)
        shape = (self.packs_per_step, self.pack_length)
        est = costs.estimate(costs.model_dims(model), self.inputs, len(packs), shape, buckets, self.widths)
        self.estimate = est
        self._cached = (0, packs if est.packs else buckets)  # epoch 0 of the chosen plan, built once
        return est.packs, (
            f"packing auto: {f'packs of {self.pack_length} tokens' if est.packs else 'buckets'} "
            f"(estimated compute: packed {est.ratio:.2f}x buckets; attention over {self.pack_length}-token packs "
            f"of rows with median {int(np.median(self.lengths))} tokens, buckets {est.bucket_padding:.1%} padding)"
        )

    def describe(self) -> str:
        return f"packed {self.packs_per_step} x {self.pack_length}" if self.packed else "bucketed"

    def summary(self) -> dict:
        """What the metrics record: the setting, what it resolved to, why, and the estimate behind ``auto``."""
        est = self.estimate
        flops = {"packed": est.packed, "buckets": est.buckets, "ratio": est.ratio} if est else None
        return {"setting": self.t.packing, "batching": self.describe(), "note": self.note, "flops_per_token": flops}

    def _packs(self, epoch: int) -> list:
        t = self.t
        window = t.batch_size * t.sort_window_batches
        return packing.epoch_packs(self.inputs, self.pack_length, self.packs_per_step, t.seed, epoch, window)

    def epoch(self, epoch: int) -> list:
        """The micro-batches of one epoch: positions in ``rows`` (bucketed), or packs of them."""
        if self.packed:
            return self._packs(epoch)
        t = self.t
        return batching.epoch_batches(self.lengths, t.batch_size, t.seed, epoch, t.sort_window_batches)

    def _epoch_cached(self, epoch: int) -> list:
        """``epoch(epoch)``, computed once while the run is in that epoch (auto's estimate leaves epoch 0 here)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.epoch(epoch))
        return self._cached[1]

    def next(self, s: LoopState) -> Batch:
        """The micro-batch at the cursor (epoch, batch index), which it advances; packed epochs vary in length."""
        if s.batch_index >= len(self._epoch_cached(s.epoch)):
            s.epoch, s.batch_index = s.epoch + 1, 0
        s.batch_index += 1
        entry = self._epoch_cached(s.epoch)[s.batch_index - 1]
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
