"""A model reference (``builtin:tiny-llama``, a local directory, a Hugging Face id) as a local directory."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import ModelError
from finetune.layout import models_dir
from finetune.model.tiny import BUILTIN_PREFIX, TINY_NAME, ensure_tiny_model

BUILTIN_TINY = BUILTIN_PREFIX + TINY_NAME


def resolve_model(ref: str, revision: str | None, work_dir: Path | str) -> Path:
    """The local directory of ``ref``: built (the tiny model), as given (a directory) or downloaded (a hub id).

    Training fingerprints the directory's files, and every later stage loads the same directory.
    """
    if ref == BUILTIN_TINY:
        return ensure_tiny_model(models_dir(work_dir))
    if ref.startswith(BUILTIN_PREFIX):
        raise ModelError(f"model.path: unknown builtin model {ref!r} (known: {BUILTIN_TINY})")
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    if local.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelError(f"model.path {ref!r}: no such model directory, and not a Hugging Face id (owner/name)")
    # mlx_lm.load resolves hub ids the same way (a snapshot in the Hugging Face cache).
    from mlx_lm.utils import _download

    return Path(_download(ref, revision=revision))
