"""Data parallelism over ``mx.distributed``: row shards, exact sums, agreement checks, a collective watchdog.

Why not mlx-lm's ``average_gradients``: it averages per-rank token means, so N
ranks weight rows differently from one rank. Here every rank builds the same
global micro-batch (cheap: it is a list of row indices, a function of the seed
and the step's data cursor), computes the summed token loss of its rows
``rank::world`` padded to the global batch's width, and the gradient sums are
all-summed before the one division by the step's supervised token count. That
count is known on every rank from the global batch, so it needs no collective
(it equals the all-sum of the per-rank counts). The result is what one rank
does with the same rows, up to float rounding in the order of the sum.
Validation is sharded by whole batches and its summed loss all-summed the same way.

Resume: checkpoints live on rank 0's machine only. Rank 0 restores from its
run directory and broadcasts the adapter, the optimizer state and the loop
state to the other ranks, so they need only the base model and the tokenized
data, never the run directory or a mirrored checkpoint.

With one process ``Reducer()`` is the identity and sends nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from finetune.errors import FingerprintMismatch, RankMismatch, TrainingError
from finetune.fsutil import file_digest
from finetune.train.batching import Batch
from finetune.train.checkpoints import LoopState
from finetune.train.lora import step_seed

# Exit status of a rank whose collective waited longer than the timeout.
WATCHDOG_EXIT = 75
# Files are sent from rank 0 in pieces of this size (every rank holds world x this while one is in flight).
FILE_CHUNK = 16 << 20
# mlx.launch backend name -> mx.distributed.init backend name.
INIT_BACKEND = {"ring": "ring", "jaccl": "jaccl", "jaccl-ring": "jaccl", "nccl": "nccl", "mpi": "mpi"}


def launched() -> bool:
    """True in a process started by mlx.launch (it sets MLX_RANK for every rank)."""
    return "MLX_RANK" in os.environ


def dropout_seed(seed: int, step: int, rank: int, world: int) -> int:
    """The RNG seed of a step on a rank: one rank keeps lora.step_seed exactly; N ranks draw different masks.

    Dropout masks have the shape of the rows a rank computes, so N ranks cannot
    draw one rank's masks: with dropout a run matches one rank's statistically,
    still exactly resumable, since the seed depends on (seed, step, rank, world) only.
    """
    if world == 1:
        return step_seed(seed, step)
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}/{world}".encode()).digest()[:8], "little")


def shard_rows(n_rows: int, rank: int, world: int) -> slice:
    """Rows of a global batch this rank computes: strided, so shard sizes differ by at most one."""
    return slice(rank, n_rows, world)


class Watchdog:
    """Ends the process when one collective waits longer than ``timeout`` seconds.

    A rank that dies is noticed by mlx.launch and the parent; a rank that hangs
    (a frozen machine, a cut link) is not, and the others would wait in their
    all-reduce forever. MLX releases the GIL while it evaluates, so this thread
    runs while the main thread is blocked in a collective.
    """

    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank = timeout, rank
        self.since = 0.0
        self.label: str | None = None
        threading.Thread(target=self._watch, daemon=True, name="collective-watchdog").start()

    @contextmanager
    def waiting(self, label: str) -> Iterator[None]:
        self.since = time.monotonic()
        self.label = label
        try:
            yield
        finally:
            self.label = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            label = self.label
            if label is not None and time.monotonic() - self.since > self.timeout:
                sys.stderr.write(
                    f"rank {self.rank}: {label} waited more than {self.timeout:g} s for the other ranks "
                    "(training.distributed_timeout_seconds); giving up\n"
                )
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT)


class Reducer:
    """The trainer's view of the other ranks; every method is the identity for one rank."""

    def __init__(self, group: Any = None, timeout: float = 600.0, small_stream: Any = mx.cpu):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.world = group.size() if group is not None else 1
        self.watchdog = Watchdog(timeout, self.rank) if self.world > 1 else None
        # Small collectives (scalars, bytes) run on the CPU, as mlx-lm does, except under NCCL, which needs the GPU.
        self.small = small_stream
        self.comm_seconds = 0.0  # time spent in gradient all-reduces, for benchmarks
        self.comm_bytes = 0

    @classmethod
    def connect(cls, backend: str, timeout: float) -> Reducer:
        """Join the ranks mlx.launch started (or a one-rank reducer in a plain process)."""
        if not launched():
            return cls()
        group = mx.distributed.init(strict=True, backend=INIT_BACKEND[backend])
        return cls(group, timeout, None if backend == "nccl" else mx.cpu)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextmanager
    def _waiting(self, label: str) -> Iterator[None]:
        if self.watchdog is None:
            yield
        else:
            with self.watchdog.waiting(label):
                yield

    # ----- shards

    def local_part(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """This rank's rows of a global batch (inputs, targets, mask) at the batch's width; None if it has none."""
        if self.world == 1:
            return batch.inputs, batch.targets, batch.mask
        rows = shard_rows(batch.inputs.shape[0], self.rank, self.world)
        if batch.inputs[rows].shape[0] == 0:
            return None
        return batch.inputs[rows], batch.targets[rows], batch.mask[rows]

    def mine(self, batches: list[Batch]) -> list[Batch]:
        """Whole batches for this rank (validation: the order of a sum does not matter)."""
        return batches[self.rank :: self.world]

    # ----- sums

    def sum_scalars(self, values: list[float], label: str = "loss all-reduce") -> list[float]:
        if self.world == 1:
            return values
        total = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=self.group, stream=self.small)
        with self._waiting(label):
            mx.eval(total)
        return total.tolist()

    def sum_grad(self, grad: mx.array | None) -> mx.array | None:
        """All-sum the flat gradient (``flat.FlatTrainables``): one collective a step."""
        if self.world == 1 or grad is None:
            return grad
        summed = mx.distributed.all_sum(grad, group=self.group)
        self.comm_bytes += summed.nbytes
        tic = time.perf_counter()
        with self._waiting("gradient all-reduce"):
            mx.eval(summed)
        self.comm_seconds += time.perf_counter() - tic
        return summed

    # ----- rank 0 to all

    def _gather_bytes(self, data: bytes, label: str) -> list[bytes]:
        """Every rank's ``data``, in rank order."""
        lengths = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=self.group, stream=self.small)
        with self._waiting(label):
            mx.eval(lengths)
        sizes = lengths.tolist()
        width = max(max(sizes), 1)
        padded = np.frombuffer(data.ljust(width, b"\0"), dtype=np.uint8)
        gathered = mx.distributed.all_gather(mx.array(padded)[None], group=self.group, stream=self.small)
        with self._waiting(label):
            mx.eval(gathered)
        rows = np.array(gathered)
        return [rows[r, : sizes[r]].tobytes() for r in range(self.world)]

    def gather_json(self, obj: Any, label: str = "agreement check") -> list[Any]:
        if self.world == 1:
            return [obj]
        return [json.loads(b) for b in self._gather_bytes(json.dumps(obj).encode(), label)]

    def broadcast_json(self, obj: Any, label: str = "broadcast from rank 0") -> Any:
        if self.world == 1:
            return obj
        data = json.dumps(obj).encode() if self.is_main else b""
        return json.loads(self._gather_bytes(data, label)[0])

    def broadcast_arrays(self, arrays: dict[str, mx.array] | None) -> dict[str, mx.array]:
        """Rank 0's tensors, bit for bit, on every rank (the others pass None)."""
        if self.world == 1:
            assert arrays is not None
            return arrays
        spec = {k: [list(v.shape), str(v.dtype).rsplit(".", 1)[-1]] for k, v in (arrays or {}).items()}
        spec = self.broadcast_json(spec if self.is_main else None)
        out = {}
        for key, (shape, dtype) in spec.items():
            local = arrays[key] if self.is_main else mx.zeros(shape, dtype=getattr(mx, dtype))
            # all_gather copies bytes; a sum with zeros would turn -0.0 into +0.0.
            gathered = mx.distributed.all_gather(local.reshape(1, -1), group=self.group, stream=self.small)
            out[key] = gathered[0].reshape(shape)
        with self._waiting("state broadcast"):
            mx.eval(list(out.values()))
        return out

    def share_restored(self, model: Any, optimizer: Any, state: LoopState, step: int | None) -> LoopState:
        """After rank 0 restored checkpoint ``step`` (None: none), every rank holds its adapter, optimizer state and
        loop state; returns the loop state."""
        if self.world == 1 or step is None:
            return state
        trained = {"adapters": model.trainable_parameters(), "optimizer": optimizer.state}
        arrays = self.broadcast_arrays(dict(tree_flatten(trained)) if self.is_main else None)
        loop = self.broadcast_json(asdict(state))
        if self.is_main:
            return state
        restored = tree_unflatten(list(arrays.items()))
        model.load_weights(tree_flatten(restored["adapters"]), strict=False)
        optimizer.state = restored["optimizer"]
        mx.eval(model.parameters(), optimizer.state)
        return LoopState(**loop)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0 only; its JSON result, or the user error it raised, reaches every rank."""
        if self.world == 1:
            return fn()
        outcome = None
        error: TrainingError | None = None
        if self.is_main:
            try:
                outcome = {"ok": fn()}
            except TrainingError as exc:
                error, outcome = exc, {"error": type(exc).__name__, "message": str(exc)}
        outcome = self.broadcast_json(outcome)
        if error is not None:
            raise error
        if "error" in outcome:
            kind = FingerprintMismatch if outcome["error"] == "FingerprintMismatch" else TrainingError
            raise kind(outcome["message"])
        return outcome["ok"]

    def share_file(self, path: Path, cache_dir: Path) -> Path:
        """Rank 0's file on this rank: used in place where this rank has the same bytes at that path, else sent
        over the group into ``cache_dir`` (named by its digest, so a retry reuses it)."""
        if self.world == 1:
            return path
        digest = self.on_main(lambda: file_digest(path).sha256)
        target = Path(cache_dir) / f"{digest}{path.suffix}"
        local = next((p for p in (path, target) if p.is_file() and file_digest(p).sha256 == digest), None)
        wanted = self.gather_json(local is None, "file check")
        if not any(wanted):
            return local or path
        size = self.broadcast_json(path.stat().st_size if self.is_main else None)
        out = None
        if local is None:
            target.parent.mkdir(parents=True, exist_ok=True)
            out = open(target.with_name(f".{target.name}.{os.getpid()}.tmp"), "wb")
        with open(path, "rb") if self.is_main else nullcontext() as src:
            for _ in range(0, size, FILE_CHUNK):
                piece = self._gather_bytes(src.read(FILE_CHUNK) if src else b"", "file transfer from rank 0")[0]
                if out is not None:
                    out.write(piece)
        if out is None:
            return local or path
        out.close()
        os.replace(out.name, target)
        if file_digest(target).sha256 != digest:
            raise TrainingError(f"{target}: the copy of rank 0's {path.name} does not match its sha256")
        return target

    # ----- agreement

    def check_agreement(self, digests: dict[str, str], batch_size: int) -> None:
        """Every rank must train on the same config, model, tokenizer and data (a mismatch names rank and part) and
        have at least one row of every batch."""
        if self.world == 1:
            return
        if batch_size < self.world:
            raise TrainingError(
                f"training.batch_size={batch_size} is smaller than the {self.world} ranks: every rank needs a row"
            )
        rows = self.gather_json({"host": socket.gethostname(), "digests": digests})
        message = disagreement(rows)
        if message:
            raise RankMismatch(message)


def disagreement(rows: list[dict[str, Any]]) -> str | None:
    """What differs from rank 0, per rank, or None when all agree."""
    first = rows[0]["digests"]
    problems = []
    for rank, row in enumerate(rows[1:], start=1):
        for name in sorted(set(first) | set(row["digests"])):
            theirs, ours = row["digests"].get(name), first.get(name)
            if theirs != ours:
                problems.append(
                    f"rank {rank} ({row['host']}) has a different {name} ({str(theirs)[:12]} vs rank 0's {str(ours)[:12]})"
                )
    if not problems:
        return None
    return (
        "ranks disagree before the first step: "
        + "; ".join(problems)
        + ". Every host needs the same base model, tokenized data and package versions at the same paths."
    )


def runtime_fingerprint() -> str:
    """Library versions that change the arithmetic: ranks on different MLX builds would drift apart."""
    from importlib.metadata import version

    return ",".join(f"{name}=={version(name)}" for name in ("mlx", "mlx-lm"))
