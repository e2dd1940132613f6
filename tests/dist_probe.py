"""A rank program for tests/test_train_distributed.py: the real Reducer over a real mlx.launch ring.

Usage: python tests/dist_probe.py MODE, with MODE one of
  agree     every rank checks identical digests, then round-trips a broadcast and a gradient sum;
  mismatch  rank 1 reports a different data digest;
  hang      rank 1 never joins the collective; rank 0's watchdog must end it;
  file DIR  rank 0's file DIR/data.bin reaches rank 1, which lacks it, in pieces, then from rank 1's cache.
Rank 0 prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlx.core as mx

from finetune.errors import RankMismatch
from finetune.train import distributed
from finetune.train.distributed import Reducer


def share(dist: Reducer, where: Path) -> int:
    distributed.FILE_CHUNK = 1000  # several pieces
    path = where / "data.bin" if dist.is_main else where / "missing" / "data.bin"
    first = dist.share_file(path, where / f"cache-{dist.rank}")
    again = dist.share_file(path, where / f"cache-{dist.rank}")
    print(json.dumps({"rank": dist.rank, "first": str(first), "again": str(again)}), flush=True)
    return 0


def main(mode: str, *args: str) -> int:
    dist = Reducer.connect("ring", timeout=3.0)
    if mode == "file":
        return share(dist, Path(args[0]))
    digests = {"config": "c", "model": "m", "tokenizer": "t", "data": "d"}
    if mode == "mismatch" and dist.rank == 1:
        digests["data"] = "other"
    if mode == "hang" and dist.rank == 1:
        time.sleep(600)
    try:
        dist.check_agreement(digests, batch_size=2)
    except RankMismatch as exc:
        print(json.dumps({"rank": dist.rank, "error": str(exc)}), flush=True)
        return 3
    state = {"w": mx.array([-0.0, 1.5, 3.25]), "step": mx.array(7, dtype=mx.uint64)}
    got = dist.broadcast_arrays(state if dist.is_main else None)
    grad = dist.sum_grad(mx.full((3,), float(dist.rank + 1)))
    if dist.is_main:
        print(
            json.dumps(
                {
                    "world": dist.world,
                    "w": [str(x) for x in got["w"].tolist()],
                    "step": got["step"].item(),
                    "grad": grad.tolist(),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
