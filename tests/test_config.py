"""Configuration layering: defaults < YAML < FINETUNE_* environment < --set."""

from __future__ import annotations

import json

import pytest

from finetune.config import ConfigError, Settings, load_settings, parse_overrides


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("training:\n  iters: 5\n  batch_size: 2\nstorage:\n  uri: s3://bucket/prefix\n")
    return path


def test_defaults_are_the_demo():
    settings = load_settings()
    assert settings.dataset.source == "builtin:capitals"
    assert settings.model.path == "builtin:tiny-llama"
    assert settings.model.trust_remote_code is False


def test_layers_in_order(config_file, monkeypatch):
    monkeypatch.setenv("FINETUNE_TRAINING__BATCH_SIZE", "3")
    monkeypatch.setenv("FINETUNE_TRAINING__ITERS", "7")
    settings = load_settings(config_file, ["training.iters=9", "lora.rank=4"])
    assert settings.training.iters == 9  # --set beats the environment
    assert settings.training.batch_size == 3  # the environment beats the file
    assert settings.storage.uri == "s3://bucket/prefix"  # the file beats the default
    assert settings.lora.rank == 4
    assert settings.training.learning_rate == Settings().training.learning_rate


def test_override_values_are_yaml_scalars():
    assert parse_overrides(["a.b=3", "a.c=true", "a.d=x y", "e=[1, 2]"]) == {
        "a": {"b": 3, "c": True, "d": "x y"},
        "e": [1, 2],
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.itres=3"], "unknown config key 'training.itres'"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["training.iters=many"], "config key 'training.iters': Input should be a valid integer"),
        (["training"], "expected section.key=value"),
        (["training.packing=fast"], "config key 'training.packing': expected auto, true or false, got 'fast'"),
        (["training.packing=null"], "config key 'training.packing': expected auto, true or false, got None"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_settings(None, overrides)


def test_packing_is_auto_by_default_and_takes_true_or_false_everywhere(tmp_path, monkeypatch):
    assert load_settings().training.packing == "auto"
    assert [load_settings(None, [f"training.packing={v}"]).training.packing for v in ("auto", "true", "false")] == [
        "auto",
        True,
        False,
    ]
    path = tmp_path / "config.yaml"
    path.write_text("training:\n  packing: false\n")
    assert load_settings(path).training.packing is False
    monkeypatch.setenv("FINETUNE_TRAINING__PACKING", "true")
    assert load_settings().training.packing is True
    with pytest.raises(ConfigError) as err:
        load_settings(None, ["training.packing=sometimes"])
    assert "\n" not in str(err.value) and str(err.value).count("training.packing") == 1  # one line, one error


def test_loss_chunk_is_auto_by_default_and_takes_a_size_or_null(monkeypatch):
    assert load_settings().training.loss_chunk_tokens == "auto"
    values = [
        load_settings(None, [f"training.loss_chunk_tokens={v}"]).training.loss_chunk_tokens for v in (512, "null")
    ]
    assert values == [512, None]
    monkeypatch.setenv("FINETUNE_TRAINING__LOSS_CHUNK_TOKENS", "1024")
    assert load_settings().training.loss_chunk_tokens == 1024
    for bad in ("0", "some"):
        with pytest.raises(ConfigError) as err:
            load_settings(None, [f"training.loss_chunk_tokens={bad}"])
        assert "\n" not in str(err.value) and "training.loss_chunk_tokens" in str(err.value)
    # How the loss is chunked changes float rounding, not what is computed: a run may resume under another value.
    assert load_settings().fingerprint() == load_settings(None, ["training.loss_chunk_tokens=64"]).fingerprint()


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  rnak: 8\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "lora.rnak" in str(info.value) and str(path) in str(info.value)


def test_unknown_nested_env_key(monkeypatch):
    monkeypatch.setenv("FINETUNE_TRAINING__ITRS", "3")
    with pytest.raises(ConfigError, match="training.itrs"):
        load_settings()


@pytest.mark.parametrize("content", ["[1, 2]", "a: [unclosed"])
def test_malformed_file(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=str(path)):
        load_settings(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


def test_secrets_are_secret(monkeypatch):
    monkeypatch.setenv("FINETUNE_STORAGE__SECRET_ACCESS_KEY", "SECRET-MARKER-123")
    settings = load_settings(None, ["storage.access_key_id=KEYID-MARKER-456"])
    assert settings.storage.secret_access_key.get_secret_value() == "SECRET-MARKER-123"
    for text in (repr(settings), str(settings), json.dumps(settings.public_dict()), settings.fingerprint()):
        assert "SECRET-MARKER-123" not in text and "KEYID-MARKER-456" not in text


OPERATIONAL_CHANGES = [
    "training.retries=7",
    "training.retry_delay_seconds=1",
    "training.steps_per_report=3",
    "training.steps_per_checkpoint=7",
    "training.keep_checkpoints=5",
    "training.mirror_checkpoints=true",
    "training.mirror_every=3",
    "training.use_openblas=off",
    "storage.read_timeout=5",
    "storage.endpoint_url=http://127.0.0.1:9000",
    "storage.max_attempts=9",
    "dataset.timeout_seconds=5",
    "dataset.max_download_bytes=1000",
    "evaluation.max_examples=3",
]
DEFINING_CHANGES = [
    "training.learning_rate=0.01",
    "training.iters=3",
    "training.seed=4",
    "training.steps_per_eval=7",
    "lora.rank=4",
    "template.max_seq_length=64",
    "model.path=other/model",
    "dataset.split_seed=9",
    "training.packing=false",  # it decides the batches, so the checkpoint cursor's meaning
]


@pytest.mark.parametrize("change", OPERATIONAL_CHANGES)
def test_operational_fields_are_outside_the_fingerprint(change):
    assert load_settings(None, [change]).fingerprint() == load_settings(None, []).fingerprint()


@pytest.mark.parametrize("change", DEFINING_CHANGES)
def test_what_defines_the_model_is_in_the_fingerprint(change):
    assert load_settings(None, [change]).fingerprint() != load_settings(None, []).fingerprint()


def test_fingerprint_tracks_config_not_secrets():
    a = load_settings(None, ["storage.secret_access_key=one"])
    b = load_settings(None, ["storage.secret_access_key=two"])
    c = load_settings(None, ["training.iters=3"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
