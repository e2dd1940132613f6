"""Fetch + validate throughput and peak memory on a generated chat JSONL.

Each measurement runs in a fresh child process so its peak RSS is its own.
Two sizes show whether memory grows with the dataset; a "read it all into
a list" baseline (what mlx-lm does) is measured for comparison.

    .venv/bin/python benchmarks/bench_data.py [--rows 200000] [--tokenize MODEL_DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

WORDS = "the capital of city country river mountain which is largest north south east west old new".split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def write_dataset(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            messages = []
            if rng.random() < 0.3:
                messages.append({"role": "system", "content": sentence(rng, 5, 15)})
            for _ in range(rng.choice((1, 1, 2))):
                messages.append({"role": "user", "content": sentence(rng, 5, 40)})
                messages.append({"role": "assistant", "content": sentence(rng, 10, 80)})
            f.write(json.dumps({"messages": messages}) + "\n")


CHILD = {
    "stream": """
        from finetune.config import DatasetConfig
        from finetune.data import load_splits
        splits = load_splits(DatasetConfig(source=SOURCE), work_dir=WORK)
        rows = sum(splits.counts().values())
    """,
    "list": """
        import json
        with open(SOURCE, encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
        rows = len(data)
    """,
    "tokenize": """
        from finetune.config import DatasetConfig, TemplateConfig
        from finetune.data import load_splits, save_tokenized, tokenize_splits
        from finetune.data.templating import load_tokenizer
        splits = load_splits(DatasetConfig(source=SOURCE), work_dir=WORK)
        tokenizer = load_tokenizer(MODEL)
        start = time.perf_counter()
        data = tokenize_splits(splits, tokenizer, TemplateConfig())
        save_tokenized(WORK + "/tokens.safetensors", data)
        rows = sum(len(s) for s in data.splits.values())
    """,
}


def measure(kind: str, source: Path, work: Path, model: str | None = None) -> dict[str, float]:
    body = textwrap.dedent(CHILD[kind]).strip().replace("\n", "\n    ")
    code = f"""
import json, resource, time
SOURCE, WORK, MODEL = {str(source)!r}, {str(work)!r}, {model!r}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import finetune.data, finetune.data.templating  # imports are not the dataset's memory
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if True:
    {body}
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"rows": rows, "seconds": elapsed, "peak_rss_mb": peak / 1024, "after_imports_mb": base / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--tokenize", metavar="MODEL_DIR", help="also time templating with this model's tokenizer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp_path = Path(tmp)
        for rows in sorted({args.rows // 4, args.rows}):
            source = tmp_path / f"chat-{rows}.jsonl"
            write_dataset(source, rows)
            size_mb = source.stat().st_size / 1e6
            for kind in ("stream", "list"):
                r = measure(kind, source, tmp_path / f"work-{kind}-{rows}")
                print(
                    f"{kind:>8} {rows:>7} rows ({size_mb:.0f} MB): {r['rows'] / r['seconds']:,.0f} rows/s, "
                    f"{r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
                    f"(+{r['peak_rss_mb'] - r['after_imports_mb']:.0f} MB over imports)"
                )
        if args.tokenize:
            r = measure("tokenize", source, tmp_path / "work-tok", args.tokenize)
            print(
                f"tokenize {args.rows:>7} rows: {r['rows'] / r['seconds']:,.0f} rows/s, {r['seconds']:.1f} s, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB"
            )


if __name__ == "__main__":
    main()
