"""A model reference (``builtin:…``, ``gguf:/path/model.gguf``, a local directory, a Hugging Face id) as a local directory."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import ModelError
from finetune.layout import models_dir
from finetune.model.builtin import BUILTIN_NAMES, BUILTIN_TINY, resolve_builtin
from finetune.model.gguf import import_gguf
from finetune.model.tiny import BUILTIN_PREFIX

GGUF_PREFIX = "gguf:"
__all__ = ["BUILTIN_NAMES", "BUILTIN_TINY", "GGUF_PREFIX", "resolve_model"]


def resolve_model(ref: str, revision: str | None, work_dir: Path | str, dtype: str = "auto") -> Path:
    """The local directory of ``ref``: built or imported (builtins, GGUF files), as given (a directory) or downloaded.

    ``dtype`` applies to imported GGUF files (``model.dtype``). Training fingerprints the directory's
    files, and every later stage loads the same directory.
    """
    if ref.startswith(BUILTIN_PREFIX):
        return resolve_builtin(ref, models_dir(work_dir), dtype)
    if ref.startswith(GGUF_PREFIX):
        return import_gguf(Path(ref.removeprefix(GGUF_PREFIX)).expanduser(), models_dir(work_dir), dtype)
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    if local.is_file() and local.suffix == ".gguf":
        raise ModelError(f"model.path {ref!r}: a GGUF file; write it as gguf:{ref}")
    if local.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelError(f"model.path {ref!r}: no such model directory, and not a Hugging Face id (owner/name)")
    # mlx_lm.load resolves hub ids the same way (a snapshot in the Hugging Face cache).
    from mlx_lm.utils import _download

    return Path(_download(ref, revision=revision))
