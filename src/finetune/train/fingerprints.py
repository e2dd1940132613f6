"""What a checkpoint must match to be resumed: configuration, base model, tokenizer and data."""

from __future__ import annotations

import hashlib
from pathlib import Path

from finetune.data.templating import tokenizer_fingerprint
from finetune.errors import FingerprintMismatch

__all__ = ["check_fingerprints", "model_fingerprint", "tokenizer_fingerprint"]


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


def check_fingerprints(found: dict[str, str], expected: dict[str, str], where: Path) -> None:
    changed = sorted(k for k in expected if found.get(k) != expected[k])
    if changed:
        raise FingerprintMismatch(
            f"{where}: checkpoints were made with a different {', '.join(changed)}; "
            "refusing to resume. Use a new run id, or start fresh (finetune train --fresh) to discard them."
        )
