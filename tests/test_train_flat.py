"""The flat optimizer step: the per-tensor AdamW update exactly, per-tensor checkpoints, the LoRA compute dtype."""

from __future__ import annotations

import shutil

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from test_train import SHORT, demo_data, small_data, tokenizer  # noqa: F401  (fixtures)

from finetune.config import load_settings
from finetune.layout import ADAPTER_FILE, CHECKPOINTS_DIR
from finetune.train import batching, progress
from finetune.train.flat import Layout, base_dtype, compute_dtype
from finetune.train.lora import build_optimizer, load_model
from finetune.train.memory import LossHead
from finetune.train.trainer import Trainer, train


def test_flat_step_is_the_per_tensor_adamw_step(tiny_model_dir, small_data, tmp_path):  # noqa: F811
    """Two steps of the trainer against mlx's own AdamW on the model's tensors one by one, clipping included."""
    settings = load_settings(None, [*SHORT, "training.grad_clip=0.01", "training.weight_decay=0.1"])
    trainer = Trainer(settings, str(tiny_model_dir), small_data, tmp_path)
    trainer.restore()
    trainer._compile()
    ref, _, _ = load_model(settings, str(tiny_model_dir))  # the same seed: the same LoRA init
    opt = build_optimizer(settings, trainer.total_steps)
    head = LossHead(ref, trainer.loss_head.chunk)
    clipped = []
    for rows in (small_data["train"][:4], small_data["train"][4:8]):
        batch = batching.collate(rows, trainer.widths)
        out = trainer.train_step([batch])
        assert out["updated"] and out["skipped"] == []
        inputs, targets, mask = (mx.array(a) for a in (batch.inputs, batch.targets, batch.mask))
        _, grads = nn.value_and_grad(ref, head)(inputs, targets, mask)
        grads, norm = optim.clip_grad_norm(
            {k: g / batch.n_targets for k, g in tree_flatten(grads)}, settings.training.grad_clip
        )
        clipped.append(norm.item() > settings.training.grad_clip)
        opt.update(ref, tree_unflatten(list(grads.items())))
        mx.eval(ref.parameters(), opt.state)
    assert all(clipped)  # the clip was active, so it is compared too
    got, want = dict(tree_flatten(trainer.model.trainable_parameters())), dict(tree_flatten(ref.trainable_parameters()))
    assert got.keys() == want.keys() and len(got) > 2
    for k in want:
        np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    # Checkpoints hold the per-tensor form under mlx's names, so their format does not depend on the layout.
    moments = {k: v for k, v in tree_flatten(opt.state) if k not in ("step", "learning_rate")}
    saved = trainer.flat.optimizer_tensors()
    assert saved.keys() == {"step", "learning_rate", *moments}
    assert saved["step"].item() == 2
    np.testing.assert_allclose(np.array(saved[next(iter(moments))]), np.array(next(iter(moments.values()))), rtol=1e-4)
    adapters = trainer.flat.adapters()
    assert adapters.keys() == want.keys() and all(v.dtype == mx.float32 for v in adapters.values())


def test_layout_round_trip_and_order():
    tree = {"b": [mx.ones((2, 3)), {"w": mx.arange(4.0)}], "a": mx.zeros((1,))}
    layout = Layout.of(tree)
    flat = layout.flatten(tree)
    assert flat.shape == (11,) and layout.offsets[-1] == 11
    back = dict(tree_flatten(layout.tree(flat)))
    assert back.keys() == dict(tree_flatten(tree)).keys()
    assert all(mx.array_equal(back[k], v).item() for k, v in tree_flatten(tree))


def test_compute_dtype_auto_is_the_16_bit_base_dtype_on_cuda_only():
    layer = nn.Module()
    layer.proj = LoRALinear.from_base(nn.Linear(8, 8), r=2)
    layer.proj.linear.set_dtype(mx.bfloat16)
    assert base_dtype(layer) == mx.bfloat16
    assert compute_dtype("auto", "cuda", layer, "lora") == mx.bfloat16
    assert compute_dtype("auto", "cpu", layer, "lora") == mx.float32
    assert compute_dtype("auto", "metal", layer, "lora") == mx.float32
    assert compute_dtype("auto", "cuda", layer, "dora") == mx.float32
    assert compute_dtype("float16", "cpu", layer, "lora") == mx.float16
    layer.proj.linear.set_dtype(mx.float32)
    assert compute_dtype("auto", "cuda", layer, "lora") == mx.float32


def test_bf16_lora_path_trains_from_float32_master_weights(tiny_model_dir, small_data, tmp_path):  # noqa: F811
    runs = {}
    for dtype in ("float32", "bfloat16"):
        settings = load_settings(None, [*SHORT, f"lora.compute_dtype={dtype}"])
        events: list[dict] = []
        trainer = Trainer(settings, str(tiny_model_dir), small_data, tmp_path / dtype, on_progress=events.append)
        result = trainer.run()
        start = next(e for e in events if e["event"] == "start")
        assert f"LoRA products in {dtype}" in progress.format_event(start)
        views = {v.dtype for _, v in tree_flatten(trainer.model.trainable_parameters())}
        saved = mx.load(str(result.adapter_dir / ADAPTER_FILE))
        runs[dtype] = result
        assert views == {getattr(mx, dtype)}
        assert {v.dtype for v in saved.values()} == {mx.float32}  # the master copy, not the bf16 views
    f32, bf16 = runs["float32"], runs["bfloat16"]
    assert bf16.final_val_loss < bf16.initial_val_loss
    assert bf16.final_val_loss == pytest.approx(f32.final_val_loss, rel=0.02)
    # A run resumes under another compute dtype (operational): the master weights are float32 either way.
    shutil.rmtree(tmp_path / "bfloat16" / CHECKPOINTS_DIR / "step-0000004")
    again = train(load_settings(None, SHORT), str(tiny_model_dir), small_data, tmp_path / "bfloat16")
    assert again.resumed_from == 2 and again.steps == 4 and again.final_val_loss < again.initial_val_loss
