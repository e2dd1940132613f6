"""Data-parallel overhead: the trainer on 1 rank vs 2 ranks (mlx.launch, ring backend, 127.0.0.1).

Both runs use the same tiny model, data and global batch, so they compute the
same rows per step; 2 ranks split each batch. Printed per run: global tokens/s
over the measured steps, seconds per step, gradient all-reduce seconds per
step and the bytes all-reduced per step (what each rank sends and receives
over the ring is about the same). The all-reduce time includes waiting for the
slower rank, so on a shared machine it is mostly skew, not transfer.

THIS MEASURES OVERHEAD, NOT SPEED-UP: both ranks share this machine's cores
(2 here), so two ranks cannot compute faster than one; the ratio shows what
sharding, the extra collectives and the loopback ring cost.

Then a PROJECTION, not a measurement, for a 7B LoRA on two Macs: gradient bytes
per step of a Llama-2-7B-shaped model against link bandwidths and step times
that are stated as assumptions.

Run by hand:  .venv/bin/python benchmarks/bench_distributed.py [--steps 10] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 3  # steps that trace the compiled step for the first padded widths; not timed


def worker(args: argparse.Namespace) -> None:
    """One rank: train ``--steps`` steps after a warm-up; rank 0 prints one JSON line."""
    import mlx.core as mx

    from finetune.config import load_settings
    from finetune.data.tokenized import read_tokenized
    from finetune.train.distributed import Reducer
    from finetune.train.trainer import Trainer

    dist = Reducer.connect("ring", timeout=300)
    settings = load_settings(
        None, [f"training.batch_size={args.batch}", f"training.iters={args.steps + WARMUP}", "lora.rank=8"]
    )
    trainer = Trainer(settings, args.model, read_tokenized(Path(args.data)), Path(args.run_dir), dist=dist)
    trainer._compile()
    trainer.model.train()
    timed = {"seconds": 0.0, "tokens": 0, "comm_seconds": 0.0, "comm_bytes": 0}
    for step in range(args.steps + WARMUP):
        batches = [trainer._next_batch()]
        comm_s, comm_b = dist.comm_seconds, dist.comm_bytes
        tic = time.perf_counter()
        trainer.train_step(batches)
        if step >= WARMUP:
            timed["seconds"] += time.perf_counter() - tic
            timed["tokens"] += sum(b.n_tokens for b in batches)
            timed["comm_seconds"] += dist.comm_seconds - comm_s
            timed["comm_bytes"] += dist.comm_bytes - comm_b
    grad_bytes = sum(v.nbytes for v in _leaves(trainer.model.trainable_parameters()))
    if dist.is_main:
        print(json.dumps({"ranks": dist.world, "steps": args.steps, "grad_bytes": grad_bytes, **timed}), flush=True)
    mx.eval(trainer.model.parameters())


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]


def run_ranks(ranks: int, model: Path, data: Path, work: Path, steps: int, batch: int) -> dict:
    from finetune.train.launch import free_ports, launcher

    command = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        str(model),
        "--data",
        str(data),
        "--run-dir",
        str(work / f"run-{ranks}"),
        "--steps",
        str(steps),
        "--batch",
        str(batch),
    ]
    if ranks > 1:
        ring = [launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(ranks), "-p", str(free_ports(ranks))]
        command = [*ring, "--", *command]
    from finetune.train.blas import preload_env

    env, _ = preload_env(enabled=True)  # the same BLAS as training children get
    # Ranks on one machine split its cores; without this each OpenBLAS spawns one thread per core.
    env["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    out = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{ranks} rank(s) failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1])


def prepare(work: Path) -> tuple[Path, Path]:
    from finetune.config import load_settings
    from finetune.model.tiny import ensure_tiny_model
    from finetune.pipeline.stages import prepare_data

    model = ensure_tiny_model(work / "models")
    _, data = prepare_data(load_settings(None, [f"work_dir={work}"]), str(model), work / "tokens.safetensors")
    return model, data


def llama7b_lora_params(rank: int, all_linears: bool) -> int:
    """Trainable LoRA parameters of a Llama-2-7B shape (32 blocks, 4096 hidden, 11008 MLP)."""
    hidden, mlp, blocks = 4096, 11008, 32
    attn = (4 if all_linears else 2) * rank * (hidden + hidden)
    ffn = 3 * rank * (hidden + mlp) if all_linears else 0
    return blocks * (attn + ffn)


def projection() -> None:
    # Assumptions, not measurements. Links: effective TCP payload rates. Step: 8 rows x 512 tokens,
    # ~4*N*T FLOPs for LoRA (forward + activation gradients, no base weight gradients) at an assumed
    # sustained rate. Our all-reduce runs after the step's compute (no overlap), so the step costs
    # compute/2 + transfer on 2 Macs against compute on one.
    links = {
        "10 GbE (ring, ~1.1 GB/s)": 1.1e9,
        "Thunderbolt 4 bridge (ring over TCP, ~2.5 GB/s)": 2.5e9,
        "Thunderbolt 5 (jaccl RDMA, ~6 GB/s)": 6e9,
    }
    tokens = 8 * 512
    flops = 4 * 6.7e9 * tokens
    macs = {"M2 Ultra, ~13 TFLOP/s sustained": 13e12, "M3 Max, ~7 TFLOP/s sustained": 7e12}
    print("\nPROJECTION (assumed link rates and step times, not measured): 7B LoRA, 2 Macs, global batch 8x512")
    for keys, all_linears in (("q,v (r=8)", False), ("all 7 linears (r=8)", True)):
        grad = llama7b_lora_params(8, all_linears) * 4  # float32 LoRA gradients
        print(f"  LoRA on {keys}: {grad / 1e6:.1f} MB of gradients all-reduced per step")
        for mac, rate in macs.items():
            one = flops / rate
            for link, bw in links.items():
                # Ring all-reduce on 2 ranks: each sends (and receives) half the buffer twice = the whole buffer.
                transfer = grad / bw
                print(
                    f"    {mac}: 1 Mac {one:5.1f} s/step; {link}: transfer {transfer * 1e3:5.0f} ms, "
                    f"projected speed-up {one / (one / 2 + transfer):.2f}x"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=f"timed steps per run (after {WARMUP} warm-up steps)")
    parser.add_argument("--batch", type=int, default=8, help="global batch size (rows per step)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = prepare(work)
        results = [run_ranks(n, model, data, work, args.steps, args.batch) for n in (1, 2)]
    print("MEASURED on this machine (both ranks share its cores: overhead, not speed-up)")
    print(f"{'ranks':>5} {'tok/s':>9} {'s/step':>8} {'all-reduce ms/step':>19} {'bytes/step':>11}")
    for r in results:
        steps = r["steps"]
        print(
            f"{r['ranks']:>5} {r['tokens'] / r['seconds']:>9.0f} {r['seconds'] / steps:>8.3f} "
            f"{1e3 * r['comm_seconds'] / steps:>19.2f} {r['comm_bytes'] / steps:>11.0f}"
        )
    one, two = results
    print(
        f"2 ranks / 1 rank throughput: {(two['tokens'] / two['seconds']) / (one['tokens'] / one['seconds']):.2f}; "
        f"LoRA gradient bytes of this model: {one['grad_bytes']}"
    )
    projection()


if __name__ == "__main__":
    main()
