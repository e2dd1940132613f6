"""Where one training step's time goes: finetune's compiled step timed under variants, and its GPU kernels.

``bench_gpu.py`` compares whole runs; this one takes the step apart. Each
variant runs in its own process (so MLX's environment knobs take effect),
builds the same ``Trainer`` that ``finetune train`` builds, on the same model
and data as ``bench_gpu.py``, runs a few untimed steps and then times steps
end to end (the host waits for the device once, after the last).

Variants (``--variants``, comma-separated; ``+`` joins parts, e.g. ``boolean+lora-f32``):

- ``default``: the step as ``finetune train`` runs it (its CUDA environment
  included); the same process also times the gradient alone (no optimizer
  update) and the forward pass alone;
- ``chunk-none`` / ``chunk-N``: ``training.loss_chunk_tokens`` null or N;
- ``causal``: packed rows with a plain causal mask instead of the segment mask
  (wrong for training: it only prices the mask);
- ``boolean``: the segment mask as a boolean array (on CUDA the default is an
  additive one, ``packing.mask_dtype``);
- ``lora-f32``: ``lora.compute_dtype=float32`` (on CUDA the default computes the
  LoRA path in the base layers' dtype);
- ``ops-N``: ``MLX_MAX_OPS_PER_BUFFER=N`` (operations per CUDA graph);
- ``graphs-off``: ``MLX_USE_CUDA_GRAPHS=0``;
- ``kernels``: the step under PyTorch's profiler (CUPTI sees every kernel of
  the process, MLX's too): GPU-busy time per step and the top kernels.

Run on the GPU machine:  python3 benchmarks/bench_gpu_step.py --shape qwen0.5b --variants default,chunk-none,ops-100
Smoke test anywhere:     python benchmarks/bench_gpu_step.py --shape tiny --variants default,chunk-none,causal
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gpu  # noqa: E402  (the shared model, data and settings)

from finetune.train.blas import backend_env  # noqa: E402  (finetune train's CUDA environment)


def variant_setup(name: str) -> tuple[list[str], dict[str, str]]:
    """(extra settings overrides, extra environment) of a variant and its ``+``-joined parts."""
    overrides, env = [], {}
    for part in name.split("+"):
        if part.startswith("chunk-"):
            value = part.removeprefix("chunk-")
            overrides.append(f"training.loss_chunk_tokens={'null' if value == 'none' else value}")
        elif part.startswith("ops-"):
            env["MLX_MAX_OPS_PER_BUFFER"] = part.removeprefix("ops-")
        elif part == "lora-f32":
            overrides.append("lora.compute_dtype=float32")
        elif part == "graphs-off":
            env["MLX_USE_CUDA_GRAPHS"] = "0"
    return overrides, env


def patch(parts: list[str]) -> None:
    """The variants that change code rather than settings, applied before the step is compiled."""
    from finetune.train import packing

    if "causal" in parts:  # prices the segment mask (after the plan chose packing): one causal mask everywhere
        packing.SegmentCache.make_mask = lambda self, n, return_array=False, window_size=None: "causal"
    if "boolean" in parts:
        packing.mask_dtype = lambda backend, activations: None


def build(model_dir: Path, token_file: Path, run_dir: Path, variant: str):
    from finetune.config import load_settings
    from finetune.data import read_tokenized
    from finetune.train.trainer import Trainer

    overrides, _ = variant_setup(variant)
    settings = load_settings(None, [*bench_gpu.ours_overrides(1000, True), *overrides])
    trainer = Trainer(settings, str(model_dir), read_tokenized(token_file), run_dir)
    trainer.restore(fresh=True)
    patch(variant.split("+"))
    trainer._compile()
    trainer.model.train()
    return trainer


def time_steps(trainer, n: int, what: str = "step") -> dict:
    """Wall time of ``n`` steps queued back to back (one wait at the end), and their tokens."""
    import mlx.core as mx

    from finetune.train.step import device_arrays

    s, tokens, targets, outs = trainer.state, 0, 0, []
    mx.synchronize()
    tic = time.perf_counter()
    for _ in range(n):
        s.step += 1
        batch = trainer.plan.next(s)
        tokens, targets = tokens + batch.n_tokens, targets + batch.n_targets
        if what == "step":
            outs.append(trainer.step_lazy([batch]).loss_sum)
        elif what == "grad":  # loss and gradients, no update (evaluating the loss alone would skip the backward)
            outs.append(trainer._grad_fn(*device_arrays(batch)))
            mx.async_eval(outs[-1])
        else:
            outs.append(trainer._eval_fn(*device_arrays(batch)))
            mx.async_eval(outs[-1])
    mx.eval(outs)
    seconds = time.perf_counter() - tic
    return {"ms_per_step": 1000 * seconds / n, "tokens_per_step": tokens / n, "targets_per_step": targets / n}


def kernel_table(trainer, n: int, top: int) -> dict:
    """GPU-busy milliseconds per step and the kernels that take most of it, through PyTorch's profiler."""
    from collections import defaultdict

    import mlx.core as mx
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = time_steps(trainer, n)
        mx.synchronize()
    total_us, calls = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            total_us[e.name] += e.time_range.elapsed_us()
            calls[e.name] += 1
    names = sorted(total_us, key=lambda k: -total_us[k])
    rows = [
        {"kernel": k[:120], "calls_per_step": calls[k] / n, "ms_per_step": total_us[k] / 1000 / n} for k in names[:top]
    ]
    return {
        **wall,
        "gpu_busy_ms_per_step": sum(total_us.values()) / 1000 / n,
        "kernel_launches_per_step": sum(calls.values()) / n,
        "top": rows,
    }


def child(args) -> None:
    import mlx.core as mx

    model_dir, token_file = Path(args.model), Path(args.tokens)
    run_dir = Path(args.work) / f"step-{args.child}"
    tic = time.perf_counter()
    trainer = build(model_dir, token_file, run_dir, args.child)
    setup_s = time.perf_counter() - tic
    tic = time.perf_counter()
    time_steps(trainer, args.warm)
    warm_s = time.perf_counter() - tic
    out = {"variant": args.child, "setup_s": setup_s, "warm_s": warm_s, "batching": trainer.plan.describe()}
    if "kernels" in args.child.split("+"):
        out.update(kernel_table(trainer, args.steps, args.top))
    else:
        out.update(time_steps(trainer, args.steps))
        if args.child == "default":
            out["grad_only_ms"] = time_steps(trainer, args.steps, "grad")["ms_per_step"]
            time_steps(trainer, 1, "forward")  # compiles the evaluation step
            out["forward_only_ms"] = time_steps(trainer, args.steps, "forward")["ms_per_step"]
    out["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    out["traces"] = dict(trainer.traces)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen0.5b")
    p.add_argument("--variants", default="default,chunk-none,causal,ops-100")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warm", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--valid-rows", type=int, default=100)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--timeout-s", type=float, default=300)
    p.add_argument("--work", default="/tmp/bench-gpu")
    p.add_argument("--out", default=None, help="append one JSON line per variant to OUT/step-results.jsonl")
    p.add_argument("--tag", default=None, help="recorded in every result (e.g. the commit of the code measured)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokens", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    work = Path(args.work) / args.shape
    model_dir = bench_gpu.make_model(work / "model", args.shape)
    _, token_file = bench_gpu.make_data(work, model_dir, args.rows, args.valid_rows)
    flops_per_token = 4 * bench_gpu.matmul_params(bench_gpu.SHAPES[args.shape])
    for variant in args.variants.split(","):
        env = backend_env({**os.environ, "PYTHONUNBUFFERED": "1", **variant_setup(variant)[1]})
        command = [sys.executable, __file__, "--child", variant, "--model", str(model_dir), "--tokens", str(token_file)]
        command += ["--work", str(work), "--steps", str(args.steps), "--warm", str(args.warm), "--top", str(args.top)]
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout_s)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            res = (
                json.loads(lines[-1][7:])
                if lines
                else {"variant": variant, "error": (proc.stdout + proc.stderr)[-1500:]}
            )
        except subprocess.TimeoutExpired:
            res = {"variant": variant, "error": f"timed out after {args.timeout_s:.0f} s"}
        res["shape"] = args.shape
        if args.tag:
            res["tag"] = args.tag
        if "ms_per_step" in res:
            res["peak_fraction"] = (
                flops_per_token * res["tokens_per_step"] / (res["ms_per_step"] / 1000) / bench_gpu.PEAK_FLOPS
            )
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            with open(Path(args.out) / "step-results.jsonl", "a") as f:
                f.write(json.dumps(res) + "\n")
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
