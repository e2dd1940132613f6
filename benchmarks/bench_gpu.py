"""finetune (packed and bucketed) vs ``python -m mlx_lm lora`` vs PyTorch+PEFT, side by side on one GPU.

Every trainer gets the same random-init bf16 model (the same weights, written
once as safetensors: mlx-lm and transformers read the same names), the same
chat rows (one word = one token, so the token counts are identical), LoRA rank 8
(scale 20 = PEFT alpha 160) on all 7 linear layers of every block, batch 8,
AdamW at a constant learning rate without clipping, and the same number of steps.
finetune packs rows into fixed-length sequences (about 8 rows' worth of tokens
per step) or buckets them by length; mlx-lm batches consecutive rows; the
PyTorch loop is the plain one (shuffled batches of 8 padded to their longest
row, ``loss.item()`` every step), eager, on the machine's own torch,
transformers and peft (never a dependency of this project).

Each trainer runs in its own process, one after another, in one process tree;
the order alternates between rounds, and a short throwaway run first builds
MLX-CUDA's kernels. Figures per run:

- supervised tok/s over the training time (validation excluded, as mlx-lm
  does), whole run (compilation included) and second half;
- compile seconds (finetune: host time of calls that traced; all: the first 10
  steps' excess over the median 10-step window);
- peak GPU memory as nvidia-smi sees it (sampled every 0.2 s; the same yardstick
  for all, caches included);
- the fraction of bf16 peak (790 TFLOP/s measured through torch) used in the
  second half, counting 4·N·T (LoRA: forward 2NT + activation gradients 2NT) on
  real tokens T and matmul parameters N; attention scores are left out;
- final validation loss on the same validation rows.

Run on the GPU machine:  python3 benchmarks/bench_gpu.py --shapes qwen0.5b,llama8b --steps 200 --rounds 2 --out DIR
Smoke test anywhere (tiny shape, CPU MLX, no torch):  python benchmarks/bench_gpu.py --shapes tiny --steps 20 --trainers packed,bucketed,mlx_lm
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from unittest import mock

import numpy as np

BATCH, RANK, SCALE, LR, MAX_LEN = 8, 8, 20.0, 2e-4, 1024
PEAK_FLOPS = 790e12
LORA_KEYS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "qwen0.5b": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "llama8b": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
}
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]
WORD_CHARS = [chr(c) for c in [*range(65, 91), *range(97, 123)]]  # content: ASCII letters, one token each


def matmul_params(cfg: dict) -> int:
    d, i, h, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // h
    block = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * i
    return cfg["num_hidden_layers"] * block + d * cfg["vocab_size"]


# ---------------------------------------------------------------- model and data


def make_model(out: Path, shape: str) -> Path:
    """config.json (Hugging Face names), random bf16 weights, a word-level tokenizer with a ChatML template."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models import llama, qwen2
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from finetune.model.tiny import CHAT_TEMPLATE

    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        **SHAPES[shape],
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "eos_token_id": 2,
        "bos_token_id": None,
        "pad_token_id": 0,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    # Byte-level BPE without merges: one ASCII letter = one token. transformers 5 picks the tokenizer class by
    # model_type (Qwen2Tokenizer rebuilds a byte-level BPE from vocab and merges), so only a byte-level vocabulary
    # tokenizes the same under every class; a word-level one turned each message into one token.
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<pad>",
                "bos_token": None,
                "unk_token": "<pad>",
                "model_max_length": 4096,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    module = qwen2 if cfg["model_type"] == "qwen2" else llama
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    model.update(tree_map(lambda x: x.astype(mx.bfloat16), model.parameters()))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    del model, weights
    (out / "done").touch()
    return out


def chat_rows(n: int, seed: int) -> list[dict]:
    """Single-turn chats of 50-1,000 tokens in all (about 14 of them the template's), a third to half the prompt."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        chars = int(rng.integers(50, 1001)) - 14
        prompt = int(chars * rng.uniform(0.33, 0.5))
        ids = rng.integers(0, len(WORD_CHARS), chars)
        text = ["".join(WORD_CHARS[i] for i in ids[:prompt]), "".join(WORD_CHARS[i] for i in ids[prompt:])]
        rows.append({"messages": [{"role": "user", "content": text[0]}, {"role": "assistant", "content": text[1]}]})
    return rows


def make_data(work: Path, model_dir: Path, n_train: int, n_valid: int = 100) -> tuple[Path, Path]:
    """mlx-lm's jsonl directory and finetune's tokenized file of the same rows."""
    from mlx_lm import load

    from finetune.config import load_settings
    from finetune.data import Splits, save_tokenized, tokenize_splits

    data_dir = work / "data"
    token_file = work / "tokenized.safetensors"
    if token_file.exists():
        return data_dir, token_file
    data_dir.mkdir(parents=True, exist_ok=True)
    train, valid = chat_rows(n_train, 1), chat_rows(n_valid, 2)
    for name, rows in (("train", train), ("valid", valid)):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, tokenizer = load(str(model_dir))
    data = tokenize_splits(
        Splits(train, valid, []), tokenizer, load_settings(None, [f"template.max_seq_length={MAX_LEN}"]).template
    )
    lengths = [len(r.input_ids) for r in data.splits["train"].encoded()]
    print(
        f"tokenized rows: min {min(lengths)}, median {int(np.median(lengths))}, max {max(lengths)} tokens", flush=True
    )
    if not (40 <= min(lengths) and 400 <= np.median(lengths) <= 600 and max(lengths) <= MAX_LEN):
        raise SystemExit("the tokenizer does not give one token per character here: stopping before any training")
    save_tokenized(token_file, data)
    return data_dir, token_file


# ---------------------------------------------------------------- measuring


class GpuMemory:
    """Peak GPU memory in use (nvidia-smi, MiB) while the block runs, above what was in use before it."""

    def __enter__(self):
        self.peak, self.base, self._stop = 0.0, self._used(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _used() -> float:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            return float(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return float("nan")

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._used())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def gb(self) -> float:
        return (self.peak - self.base) * 1.048576 / 1000


def summarize(name: str, windows: list[dict], steps: int, cfg: dict, **extra) -> dict:
    """windows: per report window {step, seconds, supervised, tokens}; tokens may be None (mlx-lm)."""
    second = [w for w in windows if w["step"] > steps // 2]
    seconds = sum(w["seconds"] for w in windows)
    sup = sum(w["supervised"] for w in windows)
    sec2, sup2 = sum(w["seconds"] for w in second), sum(w["supervised"] for w in second)
    median = float(np.median([w["seconds"] for w in windows[1:]])) if len(windows) > 1 else 0.0
    out = {
        "trainer": name,
        "steps": steps,
        "seconds": seconds,
        "supervised_tok_s": sup / seconds,
        "second_half_supervised_tok_s": sup2 / sec2 if sec2 else float("nan"),
        "first_window_excess_s": windows[0]["seconds"] - median if windows else float("nan"),
        **extra,
    }
    tokens2 = sum(w["tokens"] for w in second) if all(w.get("tokens") is not None for w in second) else None
    if tokens2 is None and extra.get("real_per_supervised"):
        tokens2 = sup2 * extra["real_per_supervised"]
    out["second_half_peak_fraction"] = (
        4 * matmul_params(cfg) * tokens2 / sec2 / PEAK_FLOPS if tokens2 and sec2 else None
    )
    return out


def ours_overrides(steps: int, packed: bool, extra: Sequence[str] = ()) -> list[str]:
    """finetune's settings for the comparison: the shared hyperparameters, constant LR, one report per 10 steps."""
    return [
        f"training.iters={steps}",
        f"training.batch_size={BATCH}",
        f"training.learning_rate={LR}",
        "training.lr_schedule=constant",
        "training.warmup_steps=0",
        "training.grad_clip=null",
        f"training.packing={str(packed).lower()}",
        "training.steps_per_report=10",
        f"training.steps_per_eval={steps}",
        f"training.steps_per_checkpoint={steps}",
        f"lora.rank={RANK}",
        f"lora.scale={SCALE}",
        "lora.dropout=0.0",
        f"template.max_seq_length={MAX_LEN}",
        "training.val_batches=-1",
        *extra,
    ]


def run_ours(
    model_dir: Path,
    token_file: Path,
    run_dir: Path,
    steps: int,
    packed: bool,
    cfg: dict,
    extra_overrides: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
) -> dict:
    """One ``finetune train`` run in its child process; ``extra_env`` reaches that child only (MLX knobs)."""
    from finetune.config import load_settings
    from finetune.layout import TRAIN_EVENTS_FILE
    from finetune.train.child import run_training_child

    settings = load_settings(None, ours_overrides(steps, packed, extra_overrides))
    logs: list[str] = []
    with mock.patch.dict(os.environ, extra_env or {}), GpuMemory() as mem:
        result = run_training_child(settings, str(model_dir), token_file, run_dir, logs.append, fresh=True)
    events = [json.loads(x) for x in (run_dir / TRAIN_EVENTS_FILE).read_text().splitlines()]
    done = next(e for e in events if e["event"] == "done")
    windows = [
        {"step": e["step"], "seconds": e["seconds"], "supervised": e["supervised_tokens"], "tokens": e["tokens"]}
        for e in events
        if e["event"] == "train"
    ]
    real = sum(w["tokens"] for w in windows) / sum(w["supervised"] for w in windows)
    return summarize(
        "finetune packed" if packed else "finetune bucketed",
        windows,
        steps,
        cfg,
        compile_s=done.get("compile_seconds"),
        traces=done.get("traces"),
        peak_gpu_gb=mem.gb,
        mlx_peak_gb=max(e["peak_memory_gb"] for e in events if e["event"] == "train"),
        final_val_loss=result.final_val_loss,
        real_per_supervised=real,
        log=[x for x in logs if "batches on" in x or "packing" in x or "BLAS" in x or "backend" in x],
    )


def run_mlx_lm(
    model_dir: Path, data_dir: Path, out: Path, steps: int, cfg: dict, real_per_supervised: float | None
) -> dict:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model": str(model_dir),
        "train": True,
        "data": str(data_dir),
        "fine_tune_type": "lora",
        "optimizer": "adamw",
        "optimizer_config": {"adamw": {"weight_decay": 0.0}},
        "mask_prompt": True,
        "num_layers": -1,
        "batch_size": BATCH,
        "iters": steps,
        "val_batches": -1,
        "learning_rate": LR,
        "steps_per_report": 10,
        "steps_per_eval": steps,
        "save_every": 10 * steps,
        "adapter_path": str(out / "adapter"),
        "max_seq_length": MAX_LEN,
        "seed": 0,
        "lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.0},
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    with GpuMemory() as mem:
        proc = subprocess.run(
            [sys.executable, "-m", "mlx_lm", "lora", "-c", str(out / "config.yaml")], capture_output=True, text=True
        )
    text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    (out / "output.txt").write_text(text)
    if proc.returncode != 0:
        raise RuntimeError(f"mlx_lm lora failed:\n{text[-3000:]}")
    reports = re.findall(r"^\s*(\d+)\s+([\d.]+) [▼▲]\s+([\d,]+)\s+([\d.]+)k", text, re.M)
    vals = re.findall(r"^\s*(\d+)\s+val ([\d.]+)", text, re.M)
    windows, before = [], 0.0
    for it, _, tok_s, total_k in reports:
        supervised = float(total_k) * 1000 - before
        before = float(total_k) * 1000
        windows.append(
            {
                "step": int(it),
                "seconds": supervised / float(tok_s.replace(",", "")),
                "supervised": supervised,
                "tokens": None,
            }
        )
    return summarize(
        "mlx_lm lora",
        windows,
        steps,
        cfg,
        compile_s=None,
        peak_gpu_gb=mem.gb,
        final_val_loss=float(vals[-1][1]) if vals else None,
        real_per_supervised=real_per_supervised,
    )


def write_torch_job(model_dir: Path, token_file: Path, out: Path, steps: int) -> Path:
    """The torch worker's input: the model, the step count and finetune's tokenized rows, as JSON."""
    from finetune.data import read_tokenized

    out.mkdir(parents=True, exist_ok=True)
    data = read_tokenized(token_file).encoded()
    job = {
        "model": str(model_dir),
        "steps": steps,
        "out": str(out / "result.json"),
        "train": [[r.input_ids, r.loss_mask] for r in data["train"]],
        "valid": [[r.input_ids, r.loss_mask] for r in data["valid"]],
    }
    (out / "job.json").write_text(json.dumps(job))
    return out / "job.json"


def run_torch(model_dir: Path, token_file: Path, out: Path, steps: int, cfg: dict) -> dict:
    job = write_torch_job(model_dir, token_file, out, steps)
    with GpuMemory() as mem:
        proc = subprocess.run([sys.executable, __file__, "--torch-worker", str(job)], capture_output=True, text=True)
    (out / "output.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"torch worker failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    res = json.loads((out / "result.json").read_text())
    return summarize(
        "torch+peft eager",
        res["windows"],
        steps,
        cfg,
        compile_s=0.0,
        peak_gpu_gb=mem.gb,
        torch_peak_gb=res["peak_gb"],
        final_val_loss=res["val_loss"],
    )


def torch_worker(job_path: str) -> None:
    """The plain PyTorch+PEFT loop (runs in its own process)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    job = json.loads(Path(job_path).read_text())
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model = get_peft_model(
        model, LoraConfig(r=RANK, lora_alpha=RANK * SCALE, lora_dropout=0.0, target_modules=LORA_KEYS)
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)

    def batch(rows):
        width = max(len(r[0]) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (tokens, mask) in enumerate(rows):
            t = torch.tensor(tokens)
            ids[i, : len(t)], attn[i, : len(t)] = t, 1
            labels[i, : len(t)] = torch.where(torch.tensor(mask, dtype=torch.bool), t, -100)
        n_sup = int((labels[:, 1:] != -100).sum())
        return ids.cuda(), attn.cuda(), labels.cuda(), n_sup, int(attn[:, 1:].sum())

    rng = np.random.default_rng(0)
    train, order, pos = job["train"], [], 0
    windows, acc = [], {"seconds": 0.0, "supervised": 0, "tokens": 0}
    model.train()
    for step in range(1, job["steps"] + 1):
        if pos + BATCH > len(order):
            order, pos = rng.permutation(len(train)).tolist(), 0
        ids, attn, labels, n_sup, n_tok = batch([train[i] for i in order[pos : pos + BATCH]])
        pos += BATCH
        tic = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        acc["seconds"] += time.perf_counter() - tic
        acc["supervised"] += n_sup
        acc["tokens"] += n_tok
        if step % 10 == 0 or step == job["steps"]:
            windows.append({"step": step, **acc})
            acc = {"seconds": 0.0, "supervised": 0, "tokens": 0}
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        valid = job["valid"]
        for s in range(0, len(valid), BATCH):
            ids, attn, labels, n_sup, _ = batch(valid[s : s + BATCH])
            total += model(input_ids=ids, attention_mask=attn, labels=labels).loss.item() * n_sup
            count += n_sup
    Path(job["out"]).write_text(
        json.dumps({"windows": windows, "val_loss": total / count, "peak_gb": torch.cuda.max_memory_allocated() / 1e9})
    )


# ---------------------------------------------------------------- the comparison


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="qwen0.5b,llama8b")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--trainers", default="packed,bucketed,mlx_lm,torch")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--valid-rows", type=int, default=100)
    p.add_argument("--warmup-steps", type=int, default=10, help="the throwaway run that builds MLX's kernels; 0: none")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no run that would likely end after this")
    p.add_argument("--work", default="/tmp/bench-gpu")
    p.add_argument("--out", default=None, help="directory for results.jsonl (raw figures, one run a line)")
    p.add_argument("--ours-set", action="append", default=[], help="KEY=VALUE setting for finetune's runs")
    p.add_argument("--ours-env", action="append", default=[], help="NAME=VALUE environment for finetune's runs")
    p.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_worker:
        return torch_worker(args.torch_worker)
    ours = {"extra_overrides": args.ours_set, "extra_env": dict(kv.split("=", 1) for kv in args.ours_env)}
    started = time.perf_counter()
    work, out = Path(args.work), Path(args.out or args.work)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    trainers = args.trainers.split(",")
    results: list[dict] = []
    for shape in args.shapes.split(","):
        cfg = SHAPES[shape]
        tic = time.perf_counter()
        model_dir = make_model(work / shape / "model", shape)
        data_dir, token_file = make_data(work / shape, model_dir, args.rows, args.valid_rows)
        print(f"[{shape}] model and data ready in {time.perf_counter() - tic:.0f} s", flush=True)
        real_ratio = None
        if args.warmup_steps:
            tic = time.perf_counter()
            w = run_ours(model_dir, token_file, work / shape / "warm-ours", args.warmup_steps, True, cfg, **ours)
            if "mlx_lm" in trainers:
                run_mlx_lm(model_dir, data_dir, work / shape / "warm-mlx", args.warmup_steps, cfg, None)
            print(
                f"[{shape}] warm-up ({args.warmup_steps} steps, throwaway) {time.perf_counter() - tic:.0f} s; "
                f"{w['log']}",
                flush=True,
            )
        last_cost: dict[str, float] = {}
        for r in range(args.rounds):
            order = trainers if r % 2 == 0 else trainers[::-1]
            for name in order:
                elapsed = time.perf_counter() - started
                if elapsed + last_cost.get(name, 0.0) > args.budget_s:
                    print(f"[{shape}] round {r + 1}: {name} skipped (budget: {elapsed:.0f} s used)", flush=True)
                    continue
                tic = time.perf_counter()
                run_dir = work / shape / f"r{r}-{name}"
                try:
                    if name in ("packed", "bucketed"):
                        res = run_ours(model_dir, token_file, run_dir, args.steps, name == "packed", cfg, **ours)
                        real_ratio = res["real_per_supervised"]
                    elif name == "mlx_lm":
                        res = run_mlx_lm(model_dir, data_dir, run_dir, args.steps, cfg, real_ratio)
                    else:
                        res = run_torch(model_dir, token_file, run_dir, args.steps, cfg)
                except Exception as exc:  # one trainer's failure must not lose the others' figures
                    res = {"trainer": name, "error": str(exc)[-2000:]}
                last_cost[name] = time.perf_counter() - tic
                res.update({"shape": shape, "round": r + 1, "process_seconds": last_cost[name]})
                results.append(res)
                with open(results_file, "a") as f:
                    f.write(json.dumps(res) + "\n")
                print(f"[{shape}] round {r + 1} {json.dumps(res)}", flush=True)
    table(results)


def table(results: list[dict]) -> None:
    ok = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            print(f"FAILED {r['shape']} {r['trainer']}: {r['error'][-500:]}")
    for shape in dict.fromkeys(r["shape"] for r in ok):
        rows = [r for r in ok if r["shape"] == shape]
        names = list(dict.fromkeys(r["trainer"] for r in rows))
        mean = {
            n: {
                k: np.mean([r[k] for r in rows if r["trainer"] == n and r.get(k) is not None] or [np.nan])
                for k in (
                    "supervised_tok_s",
                    "second_half_supervised_tok_s",
                    "peak_gpu_gb",
                    "compile_s",
                    "first_window_excess_s",
                    "second_half_peak_fraction",
                    "final_val_loss",
                    "seconds",
                )
            }
            for n in names
        }
        print(f"\n== {shape}, {rows[0]['steps']} steps, means over {max(r['round'] for r in rows)} round(s)")
        print(
            f"{'trainer':20}{'tok/s':>9}{'2nd half':>10}{'train s':>9}{'compile s':>10}{'1st-10 excess':>14}"
            f"{'peak GB':>9}{'% bf16':>8}{'val loss':>10}"
        )
        for n, m in mean.items():
            print(
                f"{n:20}{m['supervised_tok_s']:9,.0f}{m['second_half_supervised_tok_s']:10,.0f}{m['seconds']:9.1f}"
                f"{m['compile_s']:10.1f}{m['first_window_excess_s']:14.1f}{m['peak_gpu_gb']:9.1f}"
                f"{100 * m['second_half_peak_fraction']:8.1f}{m['final_val_loss']:10.4f}"
            )
        base = mean.get("finetune packed")
        for other in ("finetune bucketed", "mlx_lm lora", "torch+peft eager"):
            if base and other in mean:
                o = mean[other]
                print(
                    f"finetune packed / {other}: whole run {base['supervised_tok_s'] / o['supervised_tok_s']:.2f}, "
                    f"second half {base['second_half_supervised_tok_s'] / o['second_half_supervised_tok_s']:.2f}, "
                    f"peak memory {base['peak_gpu_gb'] / o['peak_gpu_gb']:.2f}"
                )


if __name__ == "__main__":
    main()
