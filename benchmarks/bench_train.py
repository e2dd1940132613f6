"""finetune's trainer vs ``python -m mlx_lm lora``, side by side, then the demo with and without OpenBLAS.

Two models: the tiny random-init Llama (all layers adapted) and the real SmolLM2-135M-Instruct
(``builtin:smollm2-135m-instruct``, the float32 copy MLX's CPU backend trains fastest, the demo's
LoRA settings: 8 layers, batch 4, max length 128). Both trainers get the same model, the same mixed-length chat data (one
epoch: every row once, so both see the same tokens), the same optimizer
(Adam, constant learning rate, no clipping), LoRA rank/scale, batch size and
sequence limit, and the same BLAS. Figures:

- supervised tokens/s and all (non-padding) tokens/s over the training time
  (validation excluded, as mlx-lm does; compilation included for both);
- padded fraction of the computed tokens (mlx-lm's from its own batching of
  the same data, replayed with its ``iterate_batches``);
- peak resident memory of a training process; final validation loss, both
  as each trainer reports it and through one evaluator (finetune's) on the
  same supervised tokens.

Ours runs packed (``training.packing=true``) and on length buckets (``false``);
the default, ``auto``, always resolves to one of the two, so it is not run a
third time: the benchmark prints what it picks for each seed and why, and
reports the default's ratio to mlx-lm from that column.

Validation loss after one epoch of a random-init model varies by ~0.15
between seeds, so each trainer runs with several seeds (interleaved, as the
machine may be shared) and the means are compared.

mlx-lm's ``mask_prompt`` also supervises the newline after the final
``<|im_end|>`` (one token per row that finetune leaves out), so its supervised
count is slightly higher for the same rows.

Run by hand:  .venv/bin/python benchmarks/bench_train.py [--iters 100] [--seeds 3] [--skip-demo]
                  [--smollm2-iters 20] [--smollm2-seeds 1] [--models tiny,smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from finetune.config import load_settings
from finetune.data import Splits, TokenizedData, load_splits, save_tokenized, tokenize_splits
from finetune.evaluation.evaluate import evaluate_loss
from finetune.evaluation.generate import load_for_eval
from finetune.layout import TRAIN_EVENTS_FILE as METRICS_FILE
from finetune.model.resolve import resolve_model
from finetune.model.tiny import ensure_tiny_model
from finetune.train.blas import preload_env, reexec_with_openblas
from finetune.train.child import run_training_child
from finetune.train.trainer import Trainer


@dataclass(frozen=True)
class Hyper:
    """What both trainers are given."""

    batch: int
    rank: int
    scale: float
    lr: float
    max_len: int
    num_layers: int  # -1: all
    max_questions: int  # per mixed row


TINY = Hyper(batch=8, rank=8, scale=20.0, lr=2e-3, max_len=512, num_layers=-1, max_questions=14)
# The demo's LoRA shape; rows of 1..3 questions keep the real model's rows within 128 tokens.
SMOLLM2 = Hyper(batch=4, rank=8, scale=20.0, lr=2e-4, max_len=128, num_layers=8, max_questions=3)


def mixed_rows(source: list[dict], n: int, seed: int, max_questions: int = 14) -> list[dict]:
    """Chats asking about 1..max_questions capitals at once (heavy-tailed), so row lengths vary widely."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        k = int(min(max_questions, 1 + rng.lognormal(0.7, 0.9)))
        picks = [source[i]["messages"] for i in rng.choice(len(source), k, replace=False)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": " ".join(m[0]["content"] for m in picks)},
                    {"role": "assistant", "content": " ".join(m[1]["content"] for m in picks)},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def tokenize(model: str, splits: Splits, path: Path, overrides: list[str]) -> tuple[Path, TokenizedData]:
    """The tokenized-data file the training child reads."""
    from mlx_lm import load

    _, tokenizer = load(model)
    data = tokenize_splits(splits, tokenizer, load_settings(None, overrides).template)
    return save_tokenized(path, data), data


def common_val_loss(model: str, adapter_dir: Path, valid: list) -> float:
    """One definition for both adapters: finetune's evaluator, finetune's supervised tokens."""
    return evaluate_loss(load_for_eval(model, adapter_dir)[0], valid)["loss"]


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the peak resident set of a running process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def our_overrides(iters: int, seed: int, hp: Hyper, packing: str) -> list[str]:
    return [
        f"training.iters={iters}",
        f"training.packing={packing}",
        f"training.batch_size={hp.batch}",
        f"training.learning_rate={hp.lr}",
        "training.lr_schedule=constant",
        "training.warmup_steps=0",
        "training.grad_clip=null",
        f"training.seed={seed}",
        f"training.steps_per_report={iters}",
        f"training.steps_per_eval={iters}",
        f"training.steps_per_checkpoint={iters}",
        f"lora.rank={hp.rank}",
        f"lora.scale={hp.scale}",
        f"lora.num_layers={hp.num_layers}",
        f"template.max_seq_length={hp.max_len}",
    ]


def auto_choice(model: str, data: TokenizedData, work: Path, seed: int, hp: Hyper) -> tuple[bool, str]:
    """What ``training.packing: auto`` (the default) picks for this model, these rows and seed, and why."""
    settings = load_settings(None, our_overrides(1, seed, hp, "auto"))
    plan = Trainer(settings, model, data, work / f"auto-probe-{seed}").plan
    return plan.packed, plan.note or plan.describe()


def run_ours(model: str, data_file: Path, run_dir: Path, iters: int, seed: int, hp: Hyper, packing: str) -> dict:
    settings = load_settings(None, our_overrides(iters, seed, hp, packing))
    peak = []

    def on_event(event: dict) -> None:
        if event["event"] == "done":  # the child is still alive right after its last training step
            pids = subprocess.run(["pgrep", "-f", str(run_dir / "train-request.json")], capture_output=True, text=True)
            peak.extend(peak_rss_mb(int(pid)) for pid in pids.stdout.split())

    started = time.perf_counter()
    result = run_training_child(settings, model, data_file, run_dir, lambda line: None, on_event=on_event)
    wall = time.perf_counter() - started
    events = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    windows = [e for e in events if e["event"] == "train"]
    tokens = sum(e["tokens"] for e in windows)
    return {
        "seconds": sum(e["seconds"] for e in windows),
        "tokens": tokens,
        "supervised": sum(e["supervised_tokens"] for e in windows),
        "computed": sum(e["tokens"] / (1 - e["padded_fraction"]) for e in windows),
        "wall_seconds": wall,
        "compile_seconds": windows[-1]["compile_seconds"],  # host time of the steps that traced
        "peak_rss_mb": max(peak, default=float("nan")),
        "final_val_loss": result.final_val_loss,
        "adapter_dir": result.adapter_dir,
    }


def mlx_lm_batches(model: str, data_dir: Path, hp: Hyper) -> dict:
    """Replay mlx-lm's own batching of the same data for one epoch: tokens, supervised tokens, computed positions."""
    from types import SimpleNamespace

    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.tuner.trainer import iterate_batches

    _, tokenizer = load(model)
    train, _, _ = load_local_dataset(data_dir, tokenizer, SimpleNamespace(mask_prompt=True))
    real = supervised = computed = 0
    for batch, lengths in iterate_batches(CacheDataset(train), hp.batch, hp.max_len, loop=False, seed=0):
        offsets, lens = np.array(lengths[:, 0]), np.array(lengths[:, 1])
        computed += batch.shape[0] * (batch.shape[1] - 1)
        real += int((lens - 1).sum())
        supervised += int((lens - np.maximum(offsets, 1)).sum())
    return {"tokens": real, "supervised": supervised, "computed": computed}


def run_mlx_lm(model: str, data_dir: Path, out: Path, iters: int, seed: int, batches: dict, hp: Hyper) -> dict:
    out.mkdir()
    config = {
        "model": model,
        "train": True,
        "data": str(data_dir),
        "fine_tune_type": "lora",
        "optimizer": "adam",
        "mask_prompt": True,
        "num_layers": hp.num_layers,
        "batch_size": hp.batch,
        "iters": iters,
        "val_batches": -1,
        "learning_rate": hp.lr,
        "steps_per_report": iters,
        "steps_per_eval": iters,
        "save_every": 10 * iters,
        "adapter_path": str(out / "adapter"),
        "max_seq_length": hp.max_len,
        "seed": seed,
        "lora_parameters": {"rank": hp.rank, "scale": hp.scale, "dropout": 0.0},
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    env, _ = preload_env()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "lora", "-c", str(out / "config.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    output = re.sub(r"\x1b\[[0-9;]*m", "", output)  # rich colours even when piped
    if proc.returncode != 0:
        raise SystemExit(f"mlx_lm lora failed:\n{output}")
    train = re.findall(r"^\s*(\d+)\s+([\d.]+) [▼▲]\s+([\d,]+)\s+([\d.]+)k", output, re.M)
    vals = re.findall(r"^\s*(\d+)\s+val ([\d.]+)", output, re.M)
    if not train or not vals:
        raise SystemExit(f"could not parse mlx_lm output:\n{output}")
    supervised_per_second = float(train[-1][2].replace(",", ""))
    return {
        # One report window spans the whole epoch, so its tokens/s gives the training time.
        "seconds": batches["supervised"] / supervised_per_second,
        **batches,
        "wall_seconds": wall,
        "compile_seconds": float("nan"),  # not reported by mlx-lm
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "final_val_loss": float(vals[-1][1]),
        "adapter_dir": out / "adapter",
    }


def side_by_side(model: str, work: Path, iters: int, seeds: int, hp: Hyper) -> None:
    splits = load_splits(load_settings().dataset)
    data_dir = work / "mixed"
    data_dir.mkdir()
    train_rows = mixed_rows(list(splits.train), iters * hp.batch, seed=1, max_questions=hp.max_questions)
    valid_rows = mixed_rows([*splits.valid, *splits.test], 8 * hp.batch, seed=2, max_questions=hp.max_questions)
    write_jsonl(data_dir / "train.jsonl", train_rows)
    write_jsonl(data_dir / "valid.jsonl", valid_rows)

    data_file, data = tokenize(
        model,
        Splits(train_rows, valid_rows, []),
        work / "tokenized.safetensors",
        [f"template.max_seq_length={hp.max_len}"],
    )
    lengths = [int(n) for n in data.splits["train"].lengths()]
    print(
        f"data: {len(train_rows)} train rows, {len(valid_rows)} valid rows; tokens per row min {min(lengths)}, "
        f"median {int(np.median(lengths))}, max {max(lengths)}; {iters} steps of {hp.batch} = one epoch"
    )

    batches = mlx_lm_batches(model, data_dir, hp)
    valid = data.splits["valid"].encoded()
    # auto always resolves to one of the two, so it is not run again: the default is whichever it picks.
    auto = [auto_choice(model, data, work, seed, hp) for seed in range(seeds)]
    for seed, (_, line) in enumerate(auto):
        print(f"  seed {seed} default (training.packing: auto): {line}")
    default = "finetune packed" if auto[0][0] else "finetune bucketed"
    if any(packed != auto[0][0] for packed, _ in auto):
        print("  (auto chose differently for different seeds: 'default' below is seed 0's choice)")
    runs: dict[str, list[dict]] = {"finetune packed": [], "finetune bucketed": [], "mlx_lm lora": []}
    for seed in range(seeds):  # interleaved, so both see the same load on a shared machine
        for name, run in (
            (
                "finetune packed",
                lambda seed=seed: run_ours(model, data_file, work / f"packed-{seed}", iters, seed, hp, "true"),
            ),
            (
                "finetune bucketed",
                lambda seed=seed: run_ours(model, data_file, work / f"bucketed-{seed}", iters, seed, hp, "false"),
            ),
            (
                "mlx_lm lora",
                lambda seed=seed: run_mlx_lm(model, data_dir, work / f"mlx-{seed}", iters, seed, batches, hp),
            ),
        ):
            result = run()
            result["common_val_loss"] = common_val_loss(model, result["adapter_dir"], valid)
            runs[name].append(result)
            print(
                f"  seed {seed} {name:17} {result['supervised'] / result['seconds']:8,.0f} supervised tok/s  "
                f"val loss {result['common_val_loss']:.4f}"
            )
    summary = {name: summarize(results) for name, results in runs.items()}
    packed, bucketed, theirs = summary["finetune packed"], summary["finetune bucketed"], summary["mlx_lm lora"]
    ours = summary[default]
    print(f"\ndefault (auto) = {default}")
    print(f"{'':34}{'packed':>12}{'bucketed':>12}{'mlx_lm lora':>14}{'default/mlx_lm':>16}{'packed/bucketed':>17}")
    for label, key, fmt in [
        ("supervised tokens/s", "supervised_tok_s", "{:,.0f}"),
        ("all tokens/s (non-padding)", "all_tok_s", "{:,.0f}"),
        ("padded fraction", "padded_fraction", "{:.1%}"),
        ("training seconds (sum)", "seconds", "{:.1f}"),
        ("  of which compiling (sum)", "compile_seconds", "{:.1f}"),
        ("process wall seconds (sum)", "wall_seconds", "{:.1f}"),
        ("peak RSS of a training process MB", "peak_rss_mb", "{:,.0f}"),
        ("val loss, own definition (mean)", "final_val_loss", "{:.4f}"),
        ("val loss, same evaluator (mean)", "common_val_loss", "{:.4f}"),
    ]:
        p, c, b, d = packed[key], bucketed[key], theirs[key], ours[key]
        print(f"{label:34}{fmt.format(p):>12}{fmt.format(c):>12}{fmt.format(b):>14}{d / b:>16.2f}{p / c:>17.2f}")
    for name, s in summary.items():
        print(f"{name}: val loss (same evaluator) per seed {', '.join(f'{v:.4f}' for v in s['val_losses'])}")


def summarize(results: list[dict]) -> dict:
    keys = ("seconds", "tokens", "supervised", "computed", "wall_seconds", "compile_seconds")
    total = {k: sum(r[k] for r in results) for k in keys}
    return {
        **total,
        "supervised_tok_s": total["supervised"] / total["seconds"],
        "all_tok_s": total["tokens"] / total["seconds"],
        "padded_fraction": 1 - total["tokens"] / total["computed"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "final_val_loss": float(np.mean([r["final_val_loss"] for r in results])),
        "common_val_loss": float(np.mean([r["common_val_loss"] for r in results])),
        "val_losses": [r["common_val_loss"] for r in results],
    }


def demo_blas(model: str, work: Path) -> None:
    """The demo's default training, with Debian OpenBLAS preloaded and without."""
    settings = load_settings()
    data_file, _ = tokenize(model, load_splits(settings.dataset), work / "demo.safetensors", [])
    figures = {}
    for mode in ("auto", "off"):
        s = load_settings(None, [f"training.use_openblas={mode}"])
        logs: list[str] = []
        started = time.perf_counter()
        result = run_training_child(s, model, data_file, work / f"demo-{mode}", logs.append)
        wall = time.perf_counter() - started
        events = [json.loads(x) for x in (work / f"demo-{mode}" / METRICS_FILE).read_text().splitlines()]
        windows = [e for e in events if e["event"] == "train"]
        seconds = sum(e["seconds"] for e in windows)
        figures[mode] = (
            wall,
            sum(e["tokens"] for e in windows) / seconds,
            sum(e["supervised_tokens"] for e in windows) / seconds,
            result.final_val_loss,
            logs[0],
        )
    print(f"\ndemo training ({settings.training.iters} steps, default config):")
    for wall, tok, sup, loss, line in figures.values():
        print(
            f"  {line}\n    wall {wall:.1f} s, {tok:,.0f} tokens/s ({sup:,.0f} supervised), final val loss {loss:.4f}"
        )
    (wa, ta, *_), (wo, to, *_) = figures["auto"], figures["off"]
    print(f"  OpenBLAS speed-up: {ta / to:.2f}x tokens/s, {wo / wa:.2f}x wall time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100, help="steps (one epoch of iters*8 rows)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per trainer (seeds 0..N-1); single runs are noisy")
    parser.add_argument("--skip-demo", action="store_true", help="skip the OpenBLAS on/off demo measurement")
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--smollm2-iters", type=int, default=20, help="SmolLM2 steps (one epoch of iters*4 rows)")
    parser.add_argument("--smollm2-seeds", type=int, default=1, help="SmolLM2 runs per trainer")
    args = parser.parse_args()
    models = set(args.models.split(","))
    # Children get OpenBLAS from their launchers (or not, for the "off" run): an inherited preload would blur that.
    reexec_with_openblas()  # for the in-process evaluation; the children decide for themselves
    os.environ.pop("LD_PRELOAD", None)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        if "tiny" in models:
            print("== tiny random-init Llama ==")
            model = str(ensure_tiny_model(work / "models"))
            (work / "tiny").mkdir()
            side_by_side(model, work / "tiny", args.iters, args.seeds, TINY)
            if not args.skip_demo:
                demo_blas(model, work / "tiny")
        if "smollm2" in models:
            print("\n== SmolLM2-135M-Instruct (float32 copy of the Q4_1 GGUF) ==")
            # The demo's model cache, so a machine that ran the demo downloads nothing.
            model = str(resolve_model("builtin:smollm2-135m-instruct", None, ".finetune", "float32"))
            (work / "smollm2").mkdir()
            side_by_side(model, work / "smollm2", args.smollm2_iters, args.smollm2_seeds, SMOLLM2)


if __name__ == "__main__":
    main()
