"""Datasets: fetch a source, validate every row, split, version by content, template and tokenize once."""

from finetune.data.schema import BadRow, canonical_line
from finetune.data.sources import BUILTIN_CAPITALS, SPLITS, builtin_dir, display_url
from finetune.data.splits import RowFile, Splits, load_splits
from finetune.data.templating import Encoded
from finetune.data.tokenized import (
    TokenizedData,
    TokenizedSplit,
    read_tokenized,
    save_tokenized,
    tokenize_splits,
    tokenized_metadata,
    tokenized_version,
)
from finetune.errors import DataError, FetchError

__all__ = [
    "BUILTIN_CAPITALS",
    "SPLITS",
    "BadRow",
    "DataError",
    "Encoded",
    "FetchError",
    "RowFile",
    "Splits",
    "TokenizedData",
    "TokenizedSplit",
    "builtin_dir",
    "canonical_line",
    "display_url",
    "load_splits",
    "read_tokenized",
    "save_tokenized",
    "tokenize_splits",
    "tokenized_metadata",
    "tokenized_version",
]
