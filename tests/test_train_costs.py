"""training.packing: auto: the compute estimate (train/costs.py) and the decision the plan takes from it."""

from __future__ import annotations

import json

import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama

from finetune.config import load_settings
from finetune.data.templating import Encoded
from finetune.data.tokenized import TokenizedSplit, read_tokenized
from finetune.layout import TRAIN_EVENTS_FILE
from finetune.train import batching, costs, packing
from finetune.train.lora import load_model
from finetune.train.plan import BatchPlan
from finetune.train.trainer import Trainer

TINY = costs.ModelDims(layers=4, attention_width=128, linear_params=655_360)  # the tiny Llama
QWEN_05B = costs.ModelDims(layers=24, attention_width=896, linear_params=493_961_216)  # tied 151,936 × 896 head


def plan_estimate(dims: costs.ModelDims, lengths: list[int], batch_size: int = 8, seed: int = 0) -> costs.Estimate:
    """The estimate of the plans the trainer would run: real packs and buckets of epoch 0 (lengths in tokens)."""
    inputs = [n - 1 for n in lengths]
    pack_length = packing.default_pack_length(max(inputs))
    per_step = packing.packs_per_step(None, batch_size, float(np.mean(inputs)), pack_length)
    packs = packing.epoch_packs(inputs, pack_length, per_step, seed, 0, batch_size * 64)
    buckets = batching.epoch_batches(lengths, batch_size, seed, 0, 64)
    widths = batching.pad_widths(max(inputs))
    return costs.estimate(dims, inputs, len(packs), (per_step, pack_length), buckets, widths)


def test_batch_flops_count_linear_layers_and_dense_attention():
    dims = costs.ModelDims(layers=2, attention_width=3, linear_params=10)
    # 4 · 10 · (2 × 5 tokens) + 12 · 2 layers · 3 · 2 sequences · 5²
    assert costs.batch_flops(dims, 2, 5) == 4 * 10 * 10 + 12 * 2 * 3 * 2 * 25
    assert costs.batch_flops(dims, 1, 10) > costs.batch_flops(dims, 2, 5)  # same tokens, one longer sequence


def test_packs_win_on_long_tailed_rows_with_a_big_model():
    lengths = np.clip(np.random.default_rng(0).lognormal(5.8, 0.7, 1000), 40, 1000).astype(int).tolist()
    est = plan_estimate(QWEN_05B, lengths)
    assert est.packs and est.ratio < 0.97 and est.bucket_padding > 0.05


def test_buckets_win_on_short_rows_with_the_tiny_model():
    # Like the CPU benchmark's data: median ~60 tokens, a tail to ~320 (which sets the pack length).
    lengths = np.clip(np.random.default_rng(1).lognormal(4.1, 0.5, 480), 20, 320).astype(int).tolist()
    est = plan_estimate(TINY, lengths)
    assert not est.packs and est.ratio > 1.1
    assert est.packed > plan_estimate(TINY, [min(n, 100) for n in lengths]).packed  # the long tail's L² is the cost


def test_model_dims_count_linear_layers_with_the_head(tiny_model_dir):
    model, _, _ = load_model(load_settings(None, ["lora.rank=4"]), str(tiny_model_dir))
    # 4 blocks of q,o 128×128, k,v 128×64, gate/up/down 128×256, and a 128 × 512 head; LoRA's A and B not counted
    assert costs.model_dims(model) == TINY
    args = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4)
    tied = llama.Model(llama.ModelArgs(**args, rms_norm_eps=1e-5, vocab_size=1000, num_key_value_heads=4))
    expected = costs.ModelDims(2, 64, 2 * (4 * 64 * 64 + 3 * 64 * 96) + 1000 * 64)  # the tied embedding is the head
    assert costs.model_dims(tied) == expected
    nn.quantize(tied, group_size=32, bits=4)
    assert costs.model_dims(tied) == expected


def test_auto_trains_the_tiny_model_on_buckets_and_says_why(tiny_model_dir, medium_tokenized, tmp_path):
    settings = load_settings(None, ["training.iters=2", "training.batch_size=4", "lora.rank=4"])
    assert settings.training.packing == "auto"
    events = []
    trainer = Trainer(settings, str(tiny_model_dir), read_tokenized(medium_tokenized), tmp_path / "run", events.append)
    assert not trainer.packed and trainer.plan.estimate is not None and trainer.plan.estimate.ratio > 1
    trainer.run()
    notes = [e["message"] for e in events if e["event"] == "note"]
    assert len(notes) == 1 and notes[0].startswith("packing auto: buckets (estimated compute: packed ")
    assert "x buckets; attention over 64-token packs of rows with median" in notes[0]
    done = [json.loads(line) for line in (tmp_path / "run" / TRAIN_EVENTS_FILE).read_text().splitlines()][-1]
    assert done["event"] == "done" and done["batching"]["setting"] == "auto"
    assert done["batching"]["batching"] == "bucketed" and done["batching"]["note"] == notes[0]
    assert done["batching"]["flops_per_token"]["ratio"] == pytest.approx(trainer.plan.estimate.ratio)


def test_auto_packs_where_the_head_dominates_and_decides_the_same_every_time():
    args = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=128, num_attention_heads=2)
    model = llama.Model(llama.ModelArgs(**args, rms_norm_eps=1e-5, vocab_size=16384, num_key_value_heads=2))
    rng = np.random.default_rng(2)
    split = TokenizedSplit.from_encoded(
        [Encoded(rng.integers(3, 900, n).tolist(), [1] * n) for n in rng.integers(8, 120, 96)]
    )
    rows, longest = np.arange(len(split)), int(split.lengths().max())
    t = load_settings(None, ["training.batch_size=8"]).training

    def plan(world: int = 1) -> BatchPlan:
        return BatchPlan(t, model, split, rows, batching.pad_widths(longest - 1), longest, world)

    first, again = plan(), plan()
    assert first.packed and first.note.startswith(f"packing auto: packs of {first.pack_length} tokens")
    assert first.estimate == again.estimate and first.epoch(0) == again.epoch(0) == packing.epoch_packs(
        first.inputs, first.pack_length, first.packs_per_step, t.seed, 0, 8 * t.sort_window_batches
    )
    ranks = plan(world=2)  # ranks split each batch's rows: no packs, whatever the estimate
    assert not ranks.packed and "2 ranks" in ranks.note
    forced = BatchPlan(t.model_copy(update={"packing": False}), model, split, rows, first.widths, longest)
    assert not forced.packed and forced.note is None and forced.estimate is None
