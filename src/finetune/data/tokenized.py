"""Tokenized data: every split encoded once and packed into int arrays, stored as safetensors."""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import TemplateConfig
from finetune.data.schema import BadRow
from finetune.data.splits import SPLITS, BadRows, Splits
from finetune.data.templating import Encoded, chat_template_of, encode_row, template_fingerprint
from finetune.errors import DataError, TemplateError
from finetune.fsutil import atomic_path

TOKENIZED_FORMAT = "finetune-tokenized-1"


@dataclass
class TokenizedSplit:
    """One split's encoded rows, packed: all token ids back to back, row ``i`` at ``offsets[i]:offsets[i+1]``."""

    input_ids: Any  # np.ndarray int32
    loss_mask: Any  # np.ndarray uint8
    offsets: Any  # np.ndarray int64, len(rows) + 1
    truncated: Any  # np.ndarray uint8 per row

    @classmethod
    def from_encoded(cls, rows: Sequence[Encoded]) -> TokenizedSplit:
        """Pack encoded rows (e.g. built by hand in a test) into the stored layout."""
        import numpy as np

        return cls(
            np.asarray([t for row in rows for t in row.input_ids], np.int32),
            np.asarray([m for row in rows for m in row.loss_mask], np.uint8),
            np.cumsum([0, *(len(row.input_ids) for row in rows)], dtype=np.int64),
            np.asarray([row.truncated for row in rows], np.uint8),
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> Any:
        return self.offsets[1:] - self.offsets[:-1]

    def n_targets(self) -> Any:
        import numpy as np

        sums = np.concatenate([[0], np.cumsum(self.loss_mask, dtype=np.int64)])
        return sums[self.offsets[1:]] - sums[self.offsets[:-1]]

    def encoded(self) -> list[Encoded]:
        ids, mask, bounds = self.input_ids.tolist(), self.loss_mask.tolist(), self.offsets.tolist()
        return [
            Encoded(ids[a:b], mask[a:b], bool(t)) for a, b, t in zip(bounds[:-1], bounds[1:], self.truncated.tolist())
        ]


@dataclass
class TokenizedData:
    """Every split encoded once, under a version naming the rows, the template and the tokenizer."""

    version: str
    dataset_version: str
    chat_template: str
    splits: dict[str, TokenizedSplit]
    stats: dict[str, Any]

    def encoded(self) -> dict[str, list[Encoded]]:
        return {name: split.encoded() for name, split in self.splits.items()}

    @classmethod
    def from_encoded(cls, splits: Mapping[str, Sequence[Encoded]]) -> TokenizedData:
        """Rows built in memory (tests, benchmarks), packed and versioned by the sha256 of the packed arrays."""
        packed = {name: TokenizedSplit.from_encoded(rows) for name, rows in splits.items()}
        h = hashlib.sha256()
        for name in sorted(packed):
            for key in ("input_ids", "loss_mask", "offsets", "truncated"):
                h.update(f"{name}.{key}\0".encode() + getattr(packed[name], key).tobytes())
        return cls(h.hexdigest(), "", "", packed, {})


def tokenized_version(dataset_version: str, template_fp: str, on_bad_row: str) -> str:
    parts = {"format": TOKENIZED_FORMAT, "data": dataset_version, "template": template_fp, "on_bad_row": on_bad_row}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def tokenize_splits(splits: Splits, tokenizer: Any, cfg: TemplateConfig, on_bad_row: str = "fail") -> TokenizedData:
    """Encode every row of every split, applying ``cfg.truncation`` and rejecting rows with no target.

    A row the template cannot render, or left without a supervised token (a prompt
    that fills ``max_seq_length``), is a bad row: it fails the run, or with
    ``on_bad_row="skip"`` is dropped and counted.
    """
    bad_rows = BadRows(on_bad_row)
    packed, stats = {}, {}
    for name in SPLITS:
        packed[name], stats[name] = _tokenize_split(splits, name, tokenizer, cfg, bad_rows)
    for name in ("train", "valid"):
        if len(packed[name]) == 0:
            raise DataError(f"the {name} split has no usable rows after templating")
    stats |= {"bad_rows": bad_rows.count, "problems": bad_rows.examples, "max_seq_length": cfg.max_seq_length}
    return TokenizedData(
        version=tokenized_version(splits.version(), template_fingerprint(tokenizer, cfg), on_bad_row),
        dataset_version=splits.version(),
        chat_template=chat_template_of(tokenizer, cfg),
        splits=packed,
        stats=stats,
    )


def _tokenize_split(
    splits: Splits, name: str, tokenizer: Any, cfg: TemplateConfig, bad_rows: BadRows
) -> tuple[TokenizedSplit, dict[str, int]]:
    import numpy as np

    ids, mask, offsets, truncated = array("i"), array("B"), array("q", [0]), array("B")
    stats = {"rows_in": 0, "truncated": 0, "dropped_too_long": 0, "zero_target": 0, "template_errors": 0}
    for row, where in zip(splits.rows(name), splits.origins(name)):
        stats["rows_in"] += 1
        try:
            enc = encode_row(tokenizer, row, cfg)
        except TemplateError as exc:
            stats["template_errors"] += 1
            bad_rows.add(BadRow(where, str(exc)))
            continue
        if enc.truncated:
            if cfg.truncation == "fail":
                raise DataError(
                    f"{where}: longer than template.max_seq_length={cfg.max_seq_length} tokens (template.truncation=fail)"
                )
            if cfg.truncation == "drop":
                stats["dropped_too_long"] += 1
                continue
        if enc.n_targets == 0:
            stats["zero_target"] += 1
            bad_rows.add(
                BadRow(
                    where,
                    f"no supervised tokens within template.max_seq_length={cfg.max_seq_length} (the prompt fills it)",
                )
            )
            continue
        stats["truncated"] += int(enc.truncated)
        ids.extend(enc.input_ids)
        mask.extend(enc.loss_mask)
        offsets.append(len(ids))
        truncated.append(int(enc.truncated))
    packed = TokenizedSplit(
        np.asarray(ids, np.int32),
        np.asarray(mask, np.uint8),
        np.asarray(offsets, np.int64),
        np.asarray(truncated, np.uint8),
    )
    return packed, stats


def save_tokenized(path: Path | str, data: TokenizedData) -> Path:
    """Write a safetensors file of int arrays (never a pickle) atomically: temp file, fsync, rename."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {}
    for name, split in data.splits.items():
        for key in ("input_ids", "loss_mask", "offsets", "truncated"):
            tensors[f"{name}.{key}"] = getattr(split, key)
    metadata = {
        "format": TOKENIZED_FORMAT,
        "version": data.version,
        "dataset_version": data.dataset_version,
        "chat_template": data.chat_template,
        "stats": json.dumps(data.stats, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_tokenized(path: Path | str) -> TokenizedData:
    path = Path(path)
    metadata, tensors = _open_tokenized(path, with_tensors=True)
    splits = {
        name: TokenizedSplit(*(tensors[f"{name}.{key}"] for key in ("input_ids", "loss_mask", "offsets", "truncated")))
        for name in SPLITS
    }
    return TokenizedData(
        metadata["version"],
        metadata["dataset_version"],
        metadata["chat_template"],
        splits,
        json.loads(metadata["stats"]),
    )


def tokenized_metadata(path: Path | str) -> dict[str, Any]:
    """version, dataset_version, chat_template and stats of a tokenized file, without reading its arrays."""
    metadata, _ = _open_tokenized(Path(path), with_tensors=False)
    return {**metadata, "stats": json.loads(metadata["stats"])}


def _open_tokenized(path: Path, with_tensors: bool) -> tuple[dict[str, str], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != TOKENIZED_FORMAT:
                raise DataError(f"{path}: not a tokenized dataset (format {metadata.get('format')!r})")
            tensors = {key: f.get_tensor(key) for key in f.keys()} if with_tensors else {}
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{path}: cannot read tokenized dataset ({exc})") from None
    return metadata, tensors
