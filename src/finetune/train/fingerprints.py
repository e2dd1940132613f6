"""What a checkpoint must match to be resumed: configuration, base model, tokenizer and data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from finetune.config import Settings
from finetune.data.templating import Encoded, chat_template_of, hf_tokenizer
from finetune.errors import FingerprintMismatch

# Fields that change how a run is operated, not what it computes: editing them keeps checkpoints resumable.
OPERATIONAL_FIELDS = frozenset(
    {
        "steps_per_report",
        "steps_per_checkpoint",
        "keep_checkpoints",
        "retries",
        "retry_delay_seconds",
        "use_openblas",
        "mirror_checkpoints",
        "mirror_every",
    }
)


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def config_fingerprint(settings: Settings) -> str:
    training = {k: v for k, v in settings.training.model_dump(mode="json").items() if k not in OPERATIONAL_FIELDS}
    return _sha({"lora": settings.lora.model_dump(mode="json"), "training": training})


def model_fingerprint(model_dir: Path) -> str:
    """config.json plus name, size and first/last MiB of each weight file: cheap even for large models."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")):
        size = weights.stat().st_size
        h.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = hf_tokenizer(tokenizer).get_vocab()
    return _sha({"vocab": sorted(vocab.items()), "chat_template": chat_template_of(tokenizer)})


def data_fingerprint(data: dict[str, list[Encoded]]) -> str:
    h = hashlib.sha256()
    for split in sorted(data):
        for row in data[split]:
            h.update(json.dumps([split, row.input_ids, row.loss_mask]).encode())
    return h.hexdigest()


def check_fingerprints(found: dict[str, str], expected: dict[str, str], where: Path) -> None:
    changed = sorted(k for k in expected if found.get(k) != expected[k])
    if changed:
        raise FingerprintMismatch(
            f"{where}: checkpoints were made with a different {', '.join(changed)}; "
            "refusing to resume. Use a new run id, or start fresh (finetune train --fresh) to discard them."
        )
