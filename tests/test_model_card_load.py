"""The model card's `mlx_lm.load(..., adapter_path=...)` line works as written, for a local and an S3 store."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from mlx.utils import tree_flatten
from moto import mock_aws
from s3faults import raw_client
from test_eval_report import make_report
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config import StorageConfig, load_settings
from finetune.data.templating import chat_template_of
from finetune.evaluation.report import write_model_card
from finetune.layout import MODEL_CARD_FILE, run_ref
from finetune.publishing import publish_run
from finetune.publishing.bundle import build_bundle
from finetune.store import open_store
from finetune.train.lora import load_model
from finetune.train.outputs import write_adapter

BUCKET = "finetune-card-test"
RUN = "card-run"


def published_card(tmp_path: Path, tiny_model_dir: Path, storage: StorageConfig) -> str:
    """Publish a bundle whose adapter matches the tiny model's LoRA layers; return its README.md as published."""
    settings = load_settings(None, ["lora.rank=4", f"work_dir={tmp_path / 'work'}"])
    model, tokenizer, _ = load_model(settings, str(tiny_model_dir))
    adapter = write_adapter(
        tmp_path / "adapter", dict(tree_flatten(model.trainable_parameters())), settings, {"base_model": "x"}
    )
    store = open_store(storage)
    bundle = build_bundle(tmp_path / "bundle", adapter, chat_template_of(tokenizer), settings.public_dict(), {})
    write_model_card(
        bundle / MODEL_CARD_FILE,
        make_report(),
        base_model="builtin:tiny-llama",
        data_version="d1",
        hyperparameters={},
        run_id=RUN,
        bundle_uri=run_ref(store.uri, RUN),
        plot_file=None,
    )
    published = publish_run(store, RUN, bundle, {})
    return store.get_bytes(published.manifest["files"][MODEL_CARD_FILE]["key"]).decode()


def run_load_line(card: str, cwd: Path, tiny_model_dir: Path, monkeypatch) -> object:
    """Exec the card's python block's load line, with the base model where the card says to build it."""
    block = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    line = next(x for x in block.splitlines() if x.startswith("model, tokenizer = load("))
    build = re.search(r"finetune tiny-model (\S+)`", block).group(1)
    shutil.copytree(tiny_model_dir, cwd / build)  # what `finetune tiny-model` writes (tests/test_tiny_model.py)
    monkeypatch.chdir(cwd)
    scope: dict = {}
    exec("from mlx_lm import load\n" + line, scope)
    return scope["model"]


def lora_layers(model: object) -> int:
    return sum(type(m).__name__ in ("LoRALinear", "DoRALinear") for _, m in model.named_modules())


def test_local_store_card_loads_from_the_run_directory(tmp_path, tiny_model_dir, monkeypatch) -> None:
    card = published_card(tmp_path, tiny_model_dir, StorageConfig(uri=str(tmp_path / "store")))
    assert f'adapter_path="{tmp_path / "store" / "runs" / RUN}"' in card
    assert lora_layers(run_load_line(card, tmp_path / "user", tiny_model_dir, monkeypatch)) > 0


def test_s3_card_loads_after_finetune_pull(tmp_path, tiny_model_dir, monkeypatch) -> None:
    storage = ["--set", f"storage.uri=s3://{BUCKET}/team", "--set", "storage.region=us-east-1"]
    with mock_aws():
        raw_client().create_bucket(Bucket=BUCKET)
        card = published_card(tmp_path, tiny_model_dir, StorageConfig(uri=f"s3://{BUCKET}/team", region="us-east-1"))
        pull = re.search(r"`finetune pull (\S+) (\S+)`", card)
        user = tmp_path / "user"
        user.mkdir()
        monkeypatch.chdir(user)
        result = CliRunner().invoke(app, ["pull", pull.group(1), pull.group(2), *storage])
        assert result.exit_code == 0, result.output
        again = CliRunner().invoke(app, ["pull", pull.group(1), pull.group(2), *storage])
        assert again.exit_code == 2 and "already exists" in again.output
    assert (user / "bundle" / "adapters.safetensors").is_file()
    assert lora_layers(run_load_line(card, user, tiny_model_dir, monkeypatch)) > 0


@pytest.mark.parametrize("ref", ["runs/missing", "champion"])
def test_pull_of_nothing_is_one_line(tmp_path, ref) -> None:
    result = CliRunner().invoke(app, ["pull", ref, str(tmp_path / "out"), "--set", f"storage.uri={tmp_path / 's'}"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()
