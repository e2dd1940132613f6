"""Packing: packed rows learn exactly what they learn alone, one compiled shape, deterministic packs."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from finetune.config import load_settings
from finetune.data.templating import Encoded
from finetune.data.tokenized import TokenizedSplit
from finetune.train import batching, packing
from finetune.train.lora import load_model
from finetune.train.memory import DEFAULT_LOSS_CHUNK, LossHead, checkpoint_blocks, loss_chunk
from finetune.train.trainer import Trainer


def rows_of(lengths: list[int], seed: int = 0) -> list[Encoded]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        ids = rng.integers(3, 400, n).tolist()
        mask = [0] * (n // 3) + [1] * (n - n // 3)  # a prompt, then supervised tokens
        rows.append(Encoded(ids, mask))
    return rows


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    settings = load_settings(None, ["lora.rank=4", "lora.dropout=0.0"])
    model, _, _ = load_model(settings, str(tiny_model_dir))
    # Non-zero LoRA B (initialised to zero) so that every LoRA tensor gets a gradient.
    key = mx.random.key(1)
    model.update(
        tree_unflatten(
            [
                (k, mx.random.normal(v.shape, key=key) * 0.05)
                for k, v in tree_flatten(model.trainable_parameters())
                if k.endswith("lora_b")
            ]
        )
    )
    return model


def row_losses_alone(model, rows):
    out = []
    for r in rows:
        ids = mx.array(r.input_ids, mx.int32)[None]
        ce = nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:])
        out.append((ce * mx.array(r.loss_mask[1:], mx.float32)[None]).sum().item())
    return out


def grads_of(model, fn):
    _, grads = nn.value_and_grad(model, fn)()
    return {k: np.array(v) for k, v in tree_flatten(grads)}


def test_packed_batch_gives_each_row_its_own_loss_and_gradient(lora_model):
    model = lora_model
    rows = rows_of([40, 7, 23, 60, 12, 30, 5])
    packs = packing.best_fit([len(r.input_ids) - 1 for r in rows], list(range(len(rows))), 64, len(rows))
    assert any(len(p) > 1 for p in packs)
    split = TokenizedSplit.from_encoded(rows)
    batch = packing.collate_packs(split, packs, len(packs) + 1, 64)  # + one empty pack
    inputs, targets, mask, segments = (mx.array(a) for a in (batch.inputs, batch.targets, batch.mask, batch.segments))
    alone = row_losses_alone(model, rows)
    for mask_dtype in (None, mx.float32):  # boolean, and additive (0/-inf) as on CUDA
        cache = packing.segment_caches(model, segments, mask_dtype)
        token_ce = nn.losses.cross_entropy(model(inputs, cache=cache), targets) * mask
        packed = {}
        for p, pack in enumerate(packs):
            for s, i in enumerate(pack, start=1):
                packed[i] = (token_ce[p] * (segments[p] == s)).sum().item()
        np.testing.assert_allclose([packed[i] for i in range(len(rows))], alone, rtol=2e-5, atol=1e-5)
    # Positions restart for every row; the tail of a pack belongs to no row.
    assert batch.positions[0, : len(rows[packs[0][0]].input_ids) - 1].tolist() == list(
        range(len(rows[packs[0][0]].input_ids) - 1)
    )
    assert (batch.segments[-1] == 0).all() and batch.n_targets == sum(batching.n_targets(r) for r in rows)

    def alone_sum():
        total = mx.array(0.0)
        for r in rows:
            ids = mx.array(r.input_ids, mx.int32)[None]
            ce = nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:])
            total = total + (ce * mx.array(r.loss_mask[1:], mx.float32)[None]).sum()
        return total

    # The trainer's own loss: chunked cross-entropy (chunks cut across rows and packs), blocks recomputed.
    head = LossHead(model, chunk=48)
    assert head.chunk == 48 and head.note is None
    expected = grads_of(model, alone_sum)
    for checkpointed, mask_dtype in ((False, None), (False, mx.float32), (True, None)):
        if checkpointed:
            checkpoint_blocks(model)
        got = grads_of(model, lambda: head(inputs, targets, mask, packing.segment_caches(model, segments, mask_dtype)))  # noqa: B023
        assert got.keys() == expected.keys() and any(np.abs(v).max() > 0 for v in expected.values())
        for k in expected:
            # float32 sums in another order: relative error of the whole tensor
            assert np.linalg.norm(got[k] - expected[k]) <= 1e-4 * np.linalg.norm(expected[k]), k


def test_auto_loss_chunk_is_whole_logits_on_cuda_and_chunks_elsewhere():
    assert [loss_chunk("auto", backend) for backend in ("cuda", "cpu", "metal")] == [
        None,
        DEFAULT_LOSS_CHUNK,
        DEFAULT_LOSS_CHUNK,
    ]
    assert [loss_chunk(value, "cuda") for value in (256, None)] == [256, None]


def test_leaky_attention_would_be_caught(lora_model):
    """Without the segment mask the same comparison fails: the test above can fail."""
    rows = rows_of([30, 30])
    batch = packing.collate_packs(TokenizedSplit.from_encoded(rows), [[0, 1]], 1, 64)
    ce = nn.losses.cross_entropy(lora_model(mx.array(batch.inputs)), mx.array(batch.targets)) * mx.array(batch.mask)
    second = (ce[0] * (mx.array(batch.segments[0]) == 2)).sum().item()
    assert abs(second - row_losses_alone(lora_model, rows)[1]) > 1e-3


def test_a_model_that_ignores_the_mask_falls_back_to_bucketing(lora_model):
    class NoCache(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.layers = inner.layers

        def __call__(self, inputs, cache=None):
            return self.inner(inputs)

    assert packing.supports_segments(lora_model) is None
    assert "ignores the segment mask" in packing.supports_segments(NoCache(lora_model))


def test_block_checkpointing_is_per_instance_and_idempotent(tiny_model_dir):
    settings = load_settings(None, ["lora.rank=4"])
    a, _, _ = load_model(settings, str(tiny_model_dir))
    b, _, _ = load_model(settings, str(tiny_model_dir))
    original = type(a.layers[0])
    checkpoint_blocks(a)
    wrapped = type(a.layers[0])
    checkpoint_blocks(a)
    assert type(a.layers[0]) is wrapped and wrapped.__mro__[1] is original  # one level, not nested
    assert type(b.layers[0]) is original and original.__call__ is not wrapped.__call__
    x = mx.array([[5, 6, 7, 8, 9]])
    np.testing.assert_allclose(np.array(a(x)), np.array(b(x)), rtol=1e-5, atol=1e-5)


def test_best_fit_packs_every_row_once_within_capacity_and_deterministically():
    rng = np.random.default_rng(3)
    lengths = rng.integers(5, 500, 300).tolist()
    plan = packing.epoch_packs(lengths, 512, 4, seed=1, epoch=0, window_rows=64)
    packs = [p for step in plan for p in step]
    assert sorted(i for p in packs for i in p) == list(range(300))
    assert all(sum(lengths[i] for i in p) <= 512 for p in packs)
    assert sum(lengths) / (512 * len(packs)) > 0.9  # best fit leaves little empty tail
    assert plan == packing.epoch_packs(lengths, 512, 4, seed=1, epoch=0, window_rows=64)
    assert plan != packing.epoch_packs(lengths, 512, 4, seed=1, epoch=1, window_rows=64)
    with pytest.raises(ValueError, match="pack_length=256"):
        packing.best_fit([300], [0], 256, 1)


def test_packed_run_compiles_one_training_shape(tiny_model_dir, tmp_path):
    rows = rows_of([int(n) for n in np.random.default_rng(5).integers(8, 120, 48)])
    data = {"train": rows[:40], "valid": rows[40:]}
    settings = load_settings(
        None,
        [
            "training.iters=14",
            "training.batch_size=4",
            "training.steps_per_eval=7",
            "training.steps_per_report=2",
            "training.steps_per_checkpoint=7",
            "training.packing=true",  # auto would bucket the tiny model's short rows
            "lora.rank=4",
        ],
    )
    trainer = Trainer(settings, str(tiny_model_dir), data, tmp_path / "packed")
    assert trainer.packed and trainer.plan.pack_length == 128 and trainer.plan.note is None
    result = trainer.run()
    assert result.steps == 14 and trainer.state.epoch >= 1  # crossed an epoch boundary: a short last micro-batch too
    assert trainer.traces == {"grad": 1, "update": 1, "eval": 1}
    events = [h for h in result.history]
    assert events and trainer.compile_seconds > 0

    # The same data bucketed traces once per width: the counter does count.
    bucketed = Trainer(
        load_settings(None, ["training.packing=false", "lora.rank=4", "training.batch_size=4"]),
        str(tiny_model_dir),
        data,
        tmp_path / "bucketed",
    )
    bucketed.restore()
    bucketed._compile()
    short, long = (
        sorted(data["train"], key=lambda r: len(r.input_ids))[:4],
        sorted(data["train"], key=lambda r: -len(r.input_ids))[:4],
    )
    bucketed.train_step([batching.collate(short, bucketed.widths)])
    bucketed.train_step([batching.collate(long, bucketed.widths)])
    assert bucketed.traces["grad"] == 2
