"""Export a trained bundle where it is served, each format proven to compute what the adapter computed.

``export_bundle(bundle_dir, fmt, out_dir)`` writes one of

- ``fused``: the base with the LoRA deltas merged (mlx-lm model directory, the base's dtype);
- ``gguf``: that fused model as GGUF (F16 and/or Q8_0) for llama.cpp / Ollama / LM Studio;
- ``peft``: the adapter in Hugging Face PEFT's format, for transformers + peft and vLLM;

verifies it, and writes ``export.json`` (the verification figures) beside the files. Everything is
written in a temporary directory beside ``out_dir`` and renamed into place: on any error ``out_dir``
is left as it was.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import StorageConfig
from finetune.errors import ExportError
from finetune.fsutil import atomic_dir, file_digest, write_json_atomic

FORMATS = ("fused", "gguf", "peft")
REPORT_FILE = "export.json"
VERIFY_PROMPTS = 8


@dataclass(frozen=True)
class ExportedFile:
    size: int
    sha256: str


@dataclass
class ExportResult:
    format: str
    out_dir: Path
    base_model: str
    files: dict[str, ExportedFile]
    verification: dict[str, Any]  # per check: figures, tolerance; all passed when a result exists
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())


def export_bundle(
    bundle_dir: Path | str,
    fmt: str,
    out_dir: Path | str,
    *,
    work_dir: Path | str = ".finetune",
    storage: StorageConfig | None = None,
    rows: Sequence[dict[str, Any]] | None = None,
    gguf_types: Sequence[str] = ("f16",),
    requantize: bool = False,
    tolerance: float | None = None,
    base_model: str | None = None,
    base_model_id: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export the bundle in ``fmt`` to ``out_dir``; raise ExportError (nothing written) if it cannot be proven equal.

    ``rows``: canonical rows for the verification prompts (default: the first rows of the validation split
    of the dataset the bundle was trained on). ``base_model``: the base to load instead of the one the
    bundle names. ``base_model_id``: what PEFT's config names as the base (default: the bundle's model.path).
    """
    from finetune.export import source as src

    started = time.monotonic()
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ExportError(f"export output {out_dir}: exists and is not empty (choose a new directory or overwrite)")
    gguf_types = tuple(t.lower() for t in gguf_types)
    bundle = src.open_bundle(bundle_dir, work_dir, base_model)
    if fmt == "gguf":
        from finetune.export.gguf import check_supported

        check_supported(_base_config(bundle.base_dir), gguf_types)
    model, tokenizer, config = src.load_adapted(bundle)
    if rows is None and fmt != "peft":
        rows = src.validation_rows(bundle, storage, work_dir, VERIFY_PROMPTS)
    with atomic_dir(out_dir) as tmp:
        if fmt == "fused":
            verification, details = _fused(bundle, model, tokenizer, config, rows, tmp, requantize, tolerance)
        elif fmt == "gguf":
            verification, details = _gguf(bundle, model, tokenizer, config, rows, tmp, gguf_types, tolerance)
        else:
            verification, details = _peft(bundle, model, config, tmp, base_model_id)
        files = {
            p.name: ExportedFile(d.size, d.sha256)
            for p in sorted(tmp.iterdir())
            if p.is_file() and (d := file_digest(p))
        }
        result = ExportResult(
            fmt, out_dir, bundle.base_ref, files, verification, round(time.monotonic() - started, 2), details
        )
        write_json_atomic(tmp / REPORT_FILE, result.to_dict())
    return result


def _base_config(base_dir: Path) -> dict[str, Any]:
    import json

    path = base_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"base model {base_dir}: no config.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _prompts(tokenizer: Any, rows: Sequence[dict[str, Any]], bundle: Any) -> list[list[int]]:
    from finetune.export.source import encode_prompts

    prompts = [p for p in encode_prompts(tokenizer, rows, bundle.template) if p]
    if not prompts:
        raise ExportError("verification prompts: every row encoded to no tokens")
    return prompts


def _fused(bundle, model, tokenizer, config, rows, out: Path, requantize: bool, tolerance: float | None):
    from finetune.export.fused import fuse_verified, save_fused

    fused = fuse_verified(model, config, _prompts(tokenizer, rows, bundle), requantize=requantize, tolerance=tolerance)
    save_fused(fused, tokenizer, bundle.base_dir, out, bundle.chat_template)
    return {"fused_vs_adapter": fused.figures}, {"dtype": fused.dtype, "requantized": fused.figures["requantized"]}


def _gguf(bundle, model, tokenizer, config, rows, out: Path, gguf_types: tuple[str, ...], tolerance: float | None):
    from mlx.utils import tree_flatten

    from finetune.export.fused import fuse_verified
    from finetune.export.gguf import GGUF_RELATIVE_TOLERANCE, file_name, tokenizer_metadata, verify_gguf, write_gguf

    prompts = _prompts(tokenizer, rows, bundle)
    fused = fuse_verified(model, config, prompts)
    reference = _reference_logits(fused.model, prompts)
    meta = tokenizer_metadata(bundle.base_dir, config["vocab_size"], bundle.chat_template)
    weights = dict(tree_flatten(fused.model.parameters()))
    name = Path(bundle.base_ref).name.removesuffix(".gguf") or "model"
    verification: dict[str, Any] = {"fused_vs_adapter": fused.figures}
    for gguf_type in gguf_types:
        path = out / file_name(gguf_type)
        write_gguf(path, weights, fused.config, meta, gguf_type, name)
        scale = fused.figures["max_abs_logit"]
        limit = GGUF_RELATIVE_TOLERANCE[gguf_type] * scale if tolerance is None else tolerance
        verification[f"gguf_{gguf_type}_vs_fused"] = verify_gguf(
            path, fused.config, prompts, reference, limit, tokenizer
        )
    return verification, {"types": list(gguf_types), "tokenizer_pre": meta["pre"], "dtype": fused.dtype}


def _reference_logits(model: Any, prompts: list[list[int]]) -> list[Any]:
    from finetune.export.source import logits_of

    return logits_of(model, prompts)


def _peft(bundle, model, config, out: Path, base_model_id: str | None):
    from finetune.export.peft import write_peft

    model_cfg = bundle.run_config.get("model") or {}
    base_id = base_model_id or (bundle.base_ref if not bundle.base_ref.startswith("builtin:") else str(bundle.base_dir))
    figures = write_peft(model, config, bundle.adapter_config, out, base_id, model_cfg.get("revision"))
    return {"peft_layers_vs_mlx": figures}, {"base_model_name_or_path": base_id}


EXPORTS_DIR = "exports"  # inside a bundle: exports/<format>/...


@dataclass(frozen=True)
class BundleExport:
    """One format exported into a bundle: its bundle-relative directory and files, its checks, its time."""

    format: str
    path: str  # bundle-relative, e.g. exports/gguf
    files: dict[str, ExportedFile]  # by bundle-relative name
    verification: dict[str, Any]
    seconds: float

    @classmethod
    def of(cls, result: ExportResult, rel_dir: str) -> BundleExport:
        files = {f"{rel_dir}/{name}": entry for name, entry in result.files.items()}
        return cls(result.format, rel_dir, files, result.verification, result.seconds)

    def to_dict(self) -> dict[str, Any]:
        """What the manifest records."""
        return asdict(self)


def export_into_bundle(bundle_dir: Path | str, settings: Any) -> list[BundleExport]:
    """The flow's export stage: each of ``settings.export.formats`` into ``<bundle>/exports/<format>``.

    Returns one summary per format (bundle-relative files with sha256, verification figures, seconds)
    for the manifest and the model card. A re-run replaces earlier exports of the same bundle.
    """
    cfg = settings.export
    summaries = []
    for fmt in cfg.formats:
        result = export_bundle(
            bundle_dir,
            fmt,
            Path(bundle_dir) / EXPORTS_DIR / fmt,
            work_dir=settings.work_dir,
            storage=settings.storage,
            gguf_types=tuple(cfg.gguf_types),
            requantize=cfg.requantize,
            base_model_id=cfg.peft_base_model_id,
            overwrite=True,
        )
        summaries.append(BundleExport.of(result, f"{EXPORTS_DIR}/{fmt}"))
    return summaries
