"""The GPU benchmarks still run against the library (on the tiny shape, CPU MLX): not a timing, a smoke test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from finetune.train.blas import preload_env

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env, _ = preload_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *args, "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_whole_run_and_step_benchmarks_run_on_the_tiny_shape(tmp_path):
    common = [
        "--shapes",
        "tiny",
        "--rows",
        "48",
        "--valid-rows",
        "4",
        "--steps",
        "2",
        "--rounds",
        "1",
        "--warmup-steps",
        "0",
    ]
    proc = _run(["benchmarks/bench_gpu.py", *common, "--trainers", "packed"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["trainer"] for r in runs] == ["finetune packed"]
    assert all("error" not in r and r["supervised_tok_s"] > 0 for r in runs)
    assert runs[0]["traces"]["grad"] == 1  # packed: one training shape

    proc = _run(
        ["benchmarks/bench_gpu_step.py", "--shape", "tiny", "--rows", "48", "--valid-rows", "4", "--steps", "1"]
        + ["--warm", "1", "--variants", "default,boolean+lora-f32+ops-50"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = [json.loads(x) for x in (tmp_path / "out" / "step-results.jsonl").read_text().splitlines()]
    assert [s["variant"] for s in steps] == ["default", "boolean+lora-f32+ops-50"]
    assert all(s["ms_per_step"] > 0 and s["batching"].startswith("packed") for s in steps), steps
    assert steps[0]["grad_only_ms"] > 0 and steps[0]["forward_only_ms"] > 0


def test_torch_job_holds_the_same_tokenized_rows(tmp_path, monkeypatch):
    """The PyTorch+PEFT worker (run on the GPU machine only) trains on exactly finetune's tokenized rows."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_gpu

    from finetune.data import read_tokenized

    model_dir = bench_gpu.make_model(tmp_path / "model", "tiny")
    _, token_file = bench_gpu.make_data(tmp_path, model_dir, 6, 2)
    job = json.loads(bench_gpu.write_torch_job(model_dir, token_file, tmp_path / "torch", 3).read_text())
    rows = read_tokenized(token_file).encoded()
    assert job["steps"] == 3 and job["model"] == str(model_dir)
    assert job["train"] == [[r.input_ids, r.loss_mask] for r in rows["train"]] and len(job["train"]) == 6
    assert len(job["valid"]) == 2 and all(sum(mask) > 0 for _, mask in job["valid"])
