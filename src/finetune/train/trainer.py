"""LoRA training on mlx-lm's building blocks, with exact resume.

Differences from ``mlx_lm.tuner.trainer`` and why:
- rows are packed with block-diagonal attention: one compiled shape (``packing``, ``plan``); chunked loss and
  block recomputation (``memory``); the host waits for the device only at reports, evals and checkpoints;
- the trainable tensors are one float32 master buffer, so an optimizer step is a few kernels (``flat``), and on
  CUDA the LoRA products run in the base model's 16-bit dtype;
- the loss is summed over supervised tokens and divided by the token count of
  the whole accumulated step, so gradient accumulation weights micro-batches
  by their target tokens rather than equally;
- a micro-batch with no targets, or a non-finite loss or gradient, is skipped
  and reported instead of being applied (one NaN update poisons every LoRA
  tensor);
- checkpoints hold the adapter, the optimizer state (with its step, so the LR
  schedule continues), the data cursor and best-validation state, and every
  random draw is a function of (seed, step) or (seed, epoch): a run killed at
  any point and resumed from its last checkpoint produces the same losses and
  tensors, bit for bit on CPU, as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from finetune.config import Settings
from finetune.data.templating import Encoded
from finetune.data.tokenized import TokenizedData
from finetune.errors import TrainingError
from finetune.layout import ADAPTER_DIR, CHECKPOINTS_DIR, TRAIN_EVENTS_FILE
from finetune.train import batching, checkpoints, packing
from finetune.train.batching import Batch
from finetune.train.blas import mlx_backend
from finetune.train.checkpoints import LoopState
from finetune.train.distributed import Reducer, dropout_seed, runtime_fingerprint
from finetune.train.fingerprints import (
    check_fingerprints,
    model_fingerprint,
    tokenizer_fingerprint,
)
from finetune.train.flat import FlatTrainables, base_dtype, compute_dtype
from finetune.train.lora import build_optimizer, load_model
from finetune.train.memory import LossHead, checkpoint_blocks, loss_chunk
from finetune.train.outputs import TrainResult, read_history, rewrite_events, run_lock, write_adapter
from finetune.train.plan import BatchPlan
from finetune.train.progress import ProgressWindow
from finetune.train.step import PendingStep, compile_steps, device_arrays, settle

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------- the trainer


class Trainer:
    """One LoRA training run in one process: compiled steps, guards, checkpoints, progress."""

    def __init__(
        self,
        settings: Settings,
        model_path: str,
        data: TokenizedData | Mapping[str, Sequence[Encoded]],
        run_dir: Path,
        on_progress: ProgressFn | None = None,
        dist: Reducer | None = None,  # the other ranks of a data-parallel run; only rank 0 writes files
    ):
        data = batching.as_tokenized(data)
        self.settings = settings
        self.t = settings.training
        self.dist = dist or Reducer()
        self.run_dir = Path(run_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.run_dir / CHECKPOINTS_DIR
        self.on_progress = on_progress
        self.model_path = model_path
        if "train" not in data.splits or "valid" not in data.splits:
            raise TrainingError(f"tokenized data needs 'train' and 'valid' splits, got {sorted(data.splits)}")
        self.train, self.valid = data.splits["train"], data.splits["valid"]
        self.train_rows, train_note = batching.usable_rows(self.train, "train")
        self.valid_rows, valid_note = batching.usable_rows(self.valid, "valid")
        self.data_notes = [n for n in (train_note, valid_note) if n]
        if not len(self.valid_rows):
            raise TrainingError("the validation split has no rows with supervised tokens")
        self.lengths = self.train.lengths()[self.train_rows].tolist()
        longest = max([*self.lengths, *self.valid.lengths()[self.valid_rows].tolist()])
        self.widths = batching.pad_widths(max(settings.template.max_seq_length, longest) - 1)
        self.model, tokenizer, model_dir = load_model(settings, model_path)
        if self.t.grad_checkpoint:
            checkpoint_blocks(self.model)
        self.loss_head = LossHead(self.model, loss_chunk(self.t.loss_chunk_tokens, mlx_backend()))
        self.plan = BatchPlan(self.t, self.model, self.train, self.train_rows, self.widths, longest, self.dist.world)
        self.notes, self.packed = [n for n in (self.loss_head.note, self.plan.note) if n], self.plan.packed
        self.batches_per_epoch = self.plan.per_epoch
        if self.batches_per_epoch == 0:
            raise TrainingError(
                f"the training split has {len(self.train_rows)} usable rows, fewer than training.batch_size={self.t.batch_size}"
            )
        self.total_steps = self._total_steps()
        self.fingerprints = {
            "config": settings.fingerprint(),
            "model": model_fingerprint(model_dir),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "data": data.version,  # names the rows, the template and the tokenizer
        }
        self.dist.check_agreement({**self.fingerprints, "runtime": runtime_fingerprint()}, self.t.batch_size)
        self.optimizer = build_optimizer(settings, self.total_steps)
        self.optimizer.init(self.model.trainable_parameters())
        self.state = LoopState()
        self.val_batches = self.plan.eval_batches(self.valid, self.valid_rows)
        self.traces, self.compile_seconds = {"grad": 0, "update": 0, "eval": 0}, 0.0  # traces per compiled function
        self.flat: FlatTrainables | None = None  # the master buffer, built from the restored tensors by _compile

    # ----- setup

    def _total_steps(self) -> int:
        if self.t.epochs is None:
            return self.t.iters
        return max(1, math.ceil(self.t.epochs * self.batches_per_epoch / self.t.grad_accumulation_steps))

    def restore(self, fresh: bool = False) -> int | None:
        """Resume from the newest valid checkpoint (or wipe the run when ``fresh``); returns its step."""
        checkpoints.remove_leftovers(self.ckpt_root)
        if fresh:
            shutil.rmtree(self.ckpt_root, ignore_errors=True)
            (self.run_dir / TRAIN_EVENTS_FILE).unlink(missing_ok=True)
        ckpt = checkpoints.latest_valid(self.ckpt_root)
        if ckpt is None:
            if checkpoints.committed(self.ckpt_root):
                self.emit(
                    {"event": "warning", "message": f"{self.ckpt_root}: no valid checkpoint; starting from step 0"}
                )
            (self.run_dir / TRAIN_EVENTS_FILE).unlink(missing_ok=True)
            return None
        check_fingerprints(ckpt.state.get("fingerprints", {}), self.fingerprints, ckpt.path)
        checkpoints.load_trained(ckpt, self.model, self.optimizer)
        # Fields an older version recorded and this one dropped are ignored.
        known = LoopState.__dataclass_fields__
        self.state = LoopState(**{k: v for k, v in ckpt.state["loop"].items() if k in known})
        rewrite_events(self.run_dir / TRAIN_EVENTS_FILE, ckpt.step)
        self.emit({"event": "resume", "step": ckpt.step, "checkpoint": str(ckpt.path)})
        return ckpt.step

    # ----- compiled functions (built after restore: compile captures the optimizer state object)

    def _compile(self) -> None:
        backend, lora = mlx_backend(), self.settings.lora
        if self.flat is None:
            dtype = compute_dtype(lora.compute_dtype, backend, self.model, lora.fine_tune_type)
            self.flat = FlatTrainables(self.model, self.optimizer, dtype)
        self._grad_fn, self._update_fn, self._eval_fn = compile_steps(
            self.flat,
            self.t.grad_clip,
            self.loss_head,
            self.traces,
            packing.mask_dtype(backend, base_dtype(self.model)),
        )

    # ----- data cursor

    def _call(self, name: str, fn: Callable, *args: Any) -> Any:
        """Call a compiled function; the host time of a call that (re)traced counts as compile time."""
        before, tic = self.traces[name], time.perf_counter()
        out = fn(*args)
        self.compile_seconds += time.perf_counter() - tic if self.traces[name] != before else 0.0
        return out

    def accumulate_lazy(self, micro_batches: Sequence[Batch]) -> PendingStep:
        """Summed gradients of the good micro-batches, decided on the device (one rank: the host does not wait)."""
        pending = PendingStep()
        for batch in micro_batches:
            if batch.n_targets == 0:
                pending.checks.append("no supervised tokens")
                continue
            arrays = device_arrays(batch) if self.dist.world == 1 else tuple(map(mx.array, self.dist.local_part(batch)))
            loss, sq_norm, g = self._call("grad", self._grad_fn, *arrays)
            if self.dist.world > 1:  # every rank decides on the summed values, so all skip alike
                loss, sq_norm = (mx.array(v) for v in self.dist.sum_scalars([loss.item(), sq_norm.item()]))
            pending.add(loss, sq_norm, g, batch.n_targets)
        return pending

    def accumulate(self, micro_batches: Sequence[Batch]) -> tuple[dict | None, float, int, list[str]]:
        """Summed gradients, summed loss and target count of the usable micro-batches, and why others were skipped."""
        p = self.accumulate_lazy(micro_batches)
        out = p.resolve()
        grads = self.flat.layout.tree(p.grads) if out["n_targets"] > 0 else None
        return grads, out["loss_sum"], out["n_targets"], out["skipped"]

    def step_lazy(self, micro_batches: Sequence[Batch]) -> PendingStep:
        """One optimizer step over ``micro_batches``, weighted by target tokens; queued, not waited for."""
        p = self.accumulate_lazy(micro_batches)
        if p.grads is not None:
            apply, grads = p.n_targets > 0, self.dist.sum_grad(p.grads)
            self._call("update", self._update_fn, grads, p.n_targets.astype(mx.float32), apply)
            p.updated, p.grads = apply, None
            mx.async_eval(
                self.flat.state, self.model.trainable_parameters(), self.optimizer.state, p.loss_sum, p.n_targets
            )
        return p

    def train_step(self, micro_batches: Sequence[Batch]) -> dict[str, Any]:
        """``step_lazy``, then wait for its result."""
        return self.step_lazy(micro_batches).resolve()

    def evaluate(self) -> float:
        self.model.eval()
        total = mx.array(0.0)
        for b in self.dist.mine(self.val_batches):
            total = total + self._call("eval", self._eval_fn, *device_arrays(b))
            mx.async_eval(total)
        self.model.train()
        return self.dist.sum_scalars([total.item()])[0] / sum(b.n_targets for b in self.val_batches)

    # ----- progress

    def emit(self, event: dict[str, Any]) -> None:
        if self.dist.is_main and event["event"] in ("train", "eval", "skip", "checkpoint", "resume", "done"):
            with open(self.run_dir / TRAIN_EVENTS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")
        if self.on_progress is not None:
            self.on_progress(event)
        elif event["event"] in ("skip", "warning"):
            log.warning("%s", event["message"])

    # ----- checkpoints

    def save_checkpoint(self, val_loss: float | None) -> None:
        s = self.state
        ckpt = checkpoints.write_checkpoint(
            self.ckpt_root,
            s.step,
            {
                "adapters": self.flat.adapters(),
                "optimizer": self.flat.optimizer_tensors(),
            },
            {
                "loop": asdict(s),
                "val_loss": val_loss,
                "fingerprints": self.fingerprints,
                "random": f"mx.random.seed(sha256('{self.t.seed}:<step>')) before each step; "
                f"numpy default_rng([{self.t.seed}, epoch]) per epoch",
            },
        )
        checkpoints.prune(self.ckpt_root, self.t.keep_checkpoints, s.best_step)
        self.emit({"event": "checkpoint", "step": s.step, "path": str(ckpt.path)})

    # ----- the loop

    def run(self, fresh: bool = False) -> TrainResult:
        resumed_from = self.dist.on_main(lambda: self.restore(fresh))
        self.state = self.dist.share_restored(self.model, self.optimizer, self.state, resumed_from)
        for note in self.data_notes:
            self.emit({"event": "warning", "message": note})
        for note in self.notes:
            self.emit({"event": "note", "message": note})
        self._compile()
        self.model.train()
        s, t = self.state, self.t
        self.emit(
            {
                "event": "start",
                "total_steps": self.total_steps,
                "resumed_from": resumed_from,
                "train_rows": len(self.train_rows),
                "valid_rows": len(self.valid_rows),
                "trainable_parameters": sum(v.size for _, v in tree_flatten(self.model.trainable_parameters())),
                "ranks": self.dist.world,
                "device": str(mx.default_device()),
                "lora_dtype": self.flat.dtype_name,
                "batching": self.plan.describe(),
            }
        )
        initial_val = None
        if resumed_from is None:
            initial_val = self.evaluate()
            self.emit({"event": "eval", "step": 0, "val_loss": initial_val})
        window, pending = ProgressWindow(), []
        started, first_step = time.perf_counter(), s.step
        window_start = started
        while s.step < self.total_steps and not s.stopped_early:
            s.step += 1
            mx.random.seed(dropout_seed(t.seed, s.step, self.dist.rank, self.dist.world))
            batches = [self.plan.next(s) for _ in range(t.grad_accumulation_steps)]
            pending.append((s.step, batches, self.step_lazy(batches)))
            last = s.step == self.total_steps
            if last or any(s.step % k == 0 for k in (t.steps_per_report, t.steps_per_eval, t.steps_per_checkpoint)):
                for step, reason in settle(pending, window, s):  # the only wait for the device between evals
                    self.emit({"event": "skip", "step": step, "message": f"step {step}: skipped a batch ({reason})"})
                pending = []
            if s.step % t.steps_per_report == 0 or last:
                now = time.perf_counter()
                window.seconds, window_start = now - window_start, now
                eta = (now - started) / (s.step - first_step) * (self.total_steps - s.step)
                self.emit(
                    {
                        "event": "train",
                        "step": s.step,
                        "total_steps": self.total_steps,
                        "epoch": s.epoch,
                        "lr": self.optimizer.learning_rate.item(),
                        "eta_seconds": eta,
                        "compile_seconds": self.compile_seconds,
                        **window.report(),
                    }
                )
                window = ProgressWindow()
            tic = time.perf_counter()
            self._after_step()
            window_start += time.perf_counter() - tic  # evaluation and checkpoints are not training time
        return self._finish(initial_val, resumed_from)

    def _after_step(self) -> None:
        s, t = self.state, self.t
        last = s.step == self.total_steps
        val_loss, improved = None, False
        if s.step % t.steps_per_eval == 0 or last:
            val_loss = self.evaluate()
            improved = s.record_eval(val_loss, t.early_stopping_patience)
            best = {"best_val_loss": s.best_val_loss, "best_step": s.best_step}
            self.emit({"event": "eval", "step": s.step, "val_loss": val_loss, **best})
        # The best step always gets a checkpoint so that it survives pruning and can become the final adapter.
        if self.dist.is_main and (s.step % t.steps_per_checkpoint == 0 or last or improved or s.stopped_early):
            self.save_checkpoint(val_loss)

    def _finish(self, initial_val: float | None, resumed_from: int | None) -> TrainResult:
        s = self.state
        if not self.dist.is_main:  # the adapter and the result are rank 0's
            return TrainResult(self.run_dir, s.step, None, None, None, None, False, resumed_from, 0)
        history = read_history(self.run_dir / TRAIN_EVENTS_FILE)
        if initial_val is None:
            initial_val = next((h["val_loss"] for h in history if h["step"] == 0), None)
        source = checkpoints.verify(self.ckpt_root / checkpoints.step_dir_name(s.step))
        if self.t.final_adapter == "best" and s.best_step not in (None, s.step):
            try:
                source = checkpoints.verify(self.ckpt_root / checkpoints.step_dir_name(s.best_step))
            except checkpoints.CheckpointError as exc:
                self.emit(
                    {"event": "warning", "message": f"best checkpoint unusable, using the last step's adapter: {exc}"}
                )
        source_step = source.step
        adapter_dir = write_adapter(
            self.run_dir / ADAPTER_DIR,
            checkpoints.load_arrays(source, "adapters"),
            self.settings,
            {
                "base_model": self.model_path,
                "step": source_step,
                "val_loss": source.state.get("val_loss"),
                "fingerprints": self.fingerprints,
            },
        )
        final_val = next((h["val_loss"] for h in reversed(history) if h["val_loss"] is not None), None)
        result = TrainResult(
            adapter_dir=adapter_dir,
            steps=s.step,
            initial_val_loss=initial_val,
            final_val_loss=final_val,
            best_val_loss=s.best_val_loss,
            best_step=s.best_step,
            stopped_early=s.stopped_early,
            resumed_from=resumed_from,
            skipped_batches=s.skipped_batches,
            history=history,
            ranks=self.dist.world,
        )
        self.emit(
            {
                "event": "done",
                "step": s.step,
                "adapter_dir": str(adapter_dir),
                "adapter_step": source_step,
                "best_val_loss": s.best_val_loss,
                "stopped_early": s.stopped_early,
                "compile_seconds": self.compile_seconds,
                "traces": dict(self.traces),
                "batching": self.plan.summary(),
            }
        )
        return result


def train(
    settings: Settings,
    model_path: str,
    data: TokenizedData | Mapping[str, Sequence[Encoded]],
    run_dir: Path,
    on_progress: ProgressFn | None = None,
    fresh: bool = False,
    dist: Reducer | None = None,
) -> TrainResult:
    """Train (or resume) a LoRA adapter in this process, or in one rank; the adapter lands in ``run_dir/adapter``."""
    with run_lock(Path(run_dir)) if dist is None or dist.is_main else nullcontext():
        return Trainer(settings, model_path, data, Path(run_dir), on_progress, dist).run(fresh=fresh)
