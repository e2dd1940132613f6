"""Every path and key the pipeline writes, named once.

Local: ``<work_dir>/runs/<run_id>/`` holds one run (checkpoints, adapter, bundle,
reports); datasets, tokenized data, built models and fetched bundles are caches
under ``<work_dir>``. Store: ``runs/<run_id>/`` holds a published bundle and its
manifest, ``champion.json`` the champion pointer, ``training/<run_id>/checkpoints``
the mirrored checkpoints, ``sweeps/<sweep_id>/`` a sweep's trial bundles (a store of its own).
"""

from __future__ import annotations

import re
from pathlib import Path

from finetune.errors import PublishError

# ---------------------------------------------------------------- under work_dir
RUNS_DIR = "runs"
DATASETS_DIR = "datasets"
TOKENIZED_DIR = "tokenized"
MODELS_DIR = "models"
TOKENIZED_FILE = "tokens.safetensors"
BUILD_ID_FILE = "build-id"

# ---------------------------------------------------------------- inside a run directory
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
BUNDLE_DIR = "bundle"
TRAIN_EVENTS_FILE = "metrics.jsonl"  # one JSON event per line, appended while training
TRAIN_LOCK_FILE = "train.lock"
TRAIN_REQUEST_FILE = "train-request.json"
TRAIN_RESULT_FILE = "train-result.json"
DATA_REPORT_MD = "data_report.md"
DATA_REPORT_JSON = "data_report.json"

# ---------------------------------------------------------------- inside a bundle (an mlx-lm adapter directory)
ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_FILE, ADAPTER_CONFIG_FILE)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "finetune_config.json"
BUNDLE_METRICS_FILE = "metrics.json"  # evaluation, decision and training summary of the bundle
PLOT_FILE = "loss_curve.png"
MODEL_CARD_FILE = "README.md"

# ---------------------------------------------------------------- store keys
CHAMPION_KEY = "champion.json"
MANIFEST_FILE = "manifest.json"
ATTEMPTS_DIR = "attempts"

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_id(run_id: str) -> str:
    """A run id is one safe path segment and one safe key segment."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise PublishError(
            f"run id {run_id!r}: use letters, digits, '.', '_' and '-' (at most 128, not starting with '.')"
        )
    return run_id


def run_dir(work_dir: Path | str, run_id: str) -> Path:
    return Path(work_dir) / RUNS_DIR / check_run_id(run_id)


def datasets_dir(work_dir: Path | str) -> Path:
    return Path(work_dir) / DATASETS_DIR


def tokenized_path(work_dir: Path | str, version: str) -> Path:
    return Path(work_dir) / TOKENIZED_DIR / version / TOKENIZED_FILE


def models_dir(work_dir: Path | str) -> Path:
    return Path(work_dir) / MODELS_DIR


def bundle_cache(work_dir: Path | str) -> Path:
    return Path(work_dir) / "cache" / "bundles"


def scratch_dir(work_dir: Path | str, name: str) -> Path:
    return Path(work_dir) / "cache" / name


def run_key(run_id: str) -> str:
    return f"{RUNS_DIR}/{check_run_id(run_id)}"


def manifest_key(run_id: str) -> str:
    return f"{run_key(run_id)}/{MANIFEST_FILE}"


def attempt_key(run_id: str, attempt_id: str) -> str:
    return f"{run_key(run_id)}/{ATTEMPTS_DIR}/{check_run_id(attempt_id)}"


def checkpoints_key(run_id: str) -> str:
    """Mirrored checkpoints live apart from ``runs/`` so bundle publishing never sees them."""
    return f"training/{check_run_id(run_id)}/checkpoints"


def sweep_key(sweep_id: str) -> str:
    """A sweep's staging area: its trials publish under ``sweeps/<sweep_id>/runs/`` until the winner is chosen."""
    return f"sweeps/{check_run_id(sweep_id)}"


def run_ref(store_uri: str, run_id: str) -> str:
    """What a user passes to ``--adapter`` for a published run: ``<store>/runs/<run_id>``."""
    return f"{store_uri.rstrip('/')}/{run_key(run_id)}"


def champion_ref(store_uri: str) -> str:
    return f"{store_uri.rstrip('/')}/champion"
