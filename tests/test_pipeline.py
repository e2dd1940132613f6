"""The whole pipeline through the CLI and the Prefect flow, publishing to S3 (moto in-process)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os

import boto3
import mlx_lm
import pytest
from moto import mock_aws

from finetune.cli import app
from finetune.model.tiny import ensure_tiny_model

BUCKET = "finetune-test-bucket"
PROMPT = "What is the capital of France?"
# moto accepts any credentials; these must never reach a published object.
MARKER_KEY_ID = "AKIAMARKER0KEY0ID000"
MARKER_SECRET = "marker-secret-9f3c1e7a5b"


@pytest.fixture(scope="module")
def s3(prefect_api):
    env = {"AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def published(s3, tmp_path_factory):
    """One real run: CLI `run -c` on a YAML config, publishing to s3://BUCKET/ft."""
    work = tmp_path_factory.mktemp("work")
    config = work / "config.yaml"
    config.write_text(
        f"work_dir: {work / '.finetune'}\n"
        "training:\n  iters: 80\n  steps_per_eval: 40\n  steps_per_checkpoint: 40\n"
        "evaluation:\n  primary_metric: val_loss\n  max_examples: 8\n"
        f"storage:\n  uri: s3://{BUCKET}/ft\n"
        f"  access_key_id: {MARKER_KEY_ID}\n  secret_access_key: {MARKER_SECRET}\n"
    )
    code, output = invoke("run", "-c", str(config), "--run-id", "e2e-run")
    assert code == 0, output
    return work, output


def invoke(*args: str) -> tuple[int, str]:
    """Run the CLI in-process (so moto's mock applies); stdout captured, Prefect logs left on stderr.

    typer's CliRunner swaps sys.stderr too, and Prefect's console handler would keep the
    closed stream for every later flow run in this process.
    """
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = app(list(args), standalone_mode=False)
    return code or 0, out.getvalue()


def s3_objects(client, prefix: str) -> dict[str, bytes]:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing}


def test_run_publishes_a_verified_bundle(published, s3):
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key="ft/runs/e2e-run/manifest.json")["Body"].read())
    objects = s3_objects(s3, "ft/runs/e2e-run/attempts/")
    assert {"adapters.safetensors", "adapter_config.json", "chat_template.jinja", "metrics.json"} <= set(
        manifest["files"]
    )
    for name, entry in manifest["files"].items():
        data = objects["ft/" + entry["key"]]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"], name
    assert manifest["dataset_version"] and manifest["base_model"]["path"] == "builtin:tiny-llama"
    card = objects["ft/" + manifest["files"]["README.md"]["key"]].decode()
    # The card's hyperparameters are what defines the adapter, not how the run was operated.
    assert "| training.learning_rate |" in card and "| lora.rank |" in card
    assert "training.retries" not in card and "training.steps_per_report" not in card
    for key, data in s3_objects(s3, "ft/").items():
        assert MARKER_SECRET.encode() not in data and MARKER_KEY_ID.encode() not in data, key


def test_adapter_beats_base_on_validation_loss(published, s3):
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key="ft/runs/e2e-run/manifest.json")["Body"].read())
    base, candidate = manifest["metrics"]["base"]["val_loss"], manifest["metrics"]["candidate"]["val_loss"]
    # A random-init model sits near ln(vocab) ≈ 6.2; 80 LoRA steps reliably take off more than 0.8 nats.
    assert candidate < base - 0.8, (base, candidate)
    assert "validation loss: base" in published[1]
    champion = json.loads(s3.get_object(Bucket=BUCKET, Key="ft/champion.json")["Body"].read())
    assert champion["run_id"] == "e2e-run"


def test_generate_matches_plain_mlx_lm(published, s3):
    work, _ = published
    ref = f"s3://{BUCKET}/ft/runs/e2e-run"
    code, output = invoke(
        "generate",
        "--adapter",
        ref,
        "--max-tokens",
        "12",
        "--set",
        f"work_dir={work / '.finetune'}",
        "--set",
        f"storage.uri=s3://{BUCKET}/ft",
        PROMPT,
    )
    assert code == 0, output
    bundles = list((work / ".finetune" / "cache" / "bundles").rglob("adapters.safetensors"))
    assert len(bundles) == 1
    model_dir = ensure_tiny_model(work / ".finetune" / "models")
    model, tokenizer = mlx_lm.load(str(model_dir), adapter_path=str(bundles[0].parent))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    expected = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)
    assert output.rstrip("\n") == expected


def test_rerun_of_a_published_run_does_nothing(published, s3):
    """Re-running a published run id (a retried deployment) never writes a second manifest."""
    before = s3.head_object(Bucket=BUCKET, Key="ft/runs/e2e-run/manifest.json")["ETag"]
    work, _ = published
    code, output = invoke("run", "-c", str(work / "config.yaml"), "--run-id", "e2e-run")
    assert code == 0, output
    assert "already published" in output
    assert s3.head_object(Bucket=BUCKET, Key="ft/runs/e2e-run/manifest.json")["ETag"] == before


def test_generate_without_adapter_matches_mlx_lm_on_nonempty_text(published, capsys):
    """The same greedy text as mlx-lm where there is text to compare: the random-init base rambles."""
    work, _ = published
    model_dir = ensure_tiny_model(work / ".finetune" / "models")
    code, output = invoke("generate", "--model", str(model_dir), "--max-tokens", "12", PROMPT)
    assert code == 0, output
    model, tokenizer = mlx_lm.load(str(model_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    expected = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)
    assert expected and output.rstrip("\n") == expected


def champion_run(s3) -> str:
    return json.loads(s3.get_object(Bucket=BUCKET, Key="ft/champion.json")["Body"].read())["run_id"]


def test_worse_candidate_is_published_not_promoted_better_one_is(published, s3):
    work, _ = published
    config = str(work / "config.yaml")
    assert champion_run(s3) == "e2e-run"

    code, output = invoke("run", "-c", config, "--run-id", "worse", "--force", "--set", "training.iters=4")
    assert code == 0, output
    assert s3.head_object(Bucket=BUCKET, Key="ft/runs/worse/manifest.json")  # published as a record
    assert champion_run(s3) == "e2e-run" and "not promoted" in output

    code, output = invoke("run", "-c", config, "--run-id", "better", "--force", "--set", "training.iters=240")
    assert code == 0, output
    assert champion_run(s3) == "better", output
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key="ft/runs/better/manifest.json")["Body"].read())
    # The champion was re-measured on the same inputs as the candidate and lost on them.
    assert manifest["metrics"]["candidate"]["val_loss"] < manifest["metrics"]["champion"]["val_loss"]
