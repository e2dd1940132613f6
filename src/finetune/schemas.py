"""JSON schemas given in the configuration (``evaluation.json_schema``), loaded and checked once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.errors import EvaluationError


def load_json_schema(value: dict[str, Any] | Path) -> dict[str, Any]:
    """``evaluation.json_schema`` as a checked JSON schema (inline mapping or a .json file)."""
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    where = "evaluation.json_schema"
    if isinstance(value, Path):
        where = f"evaluation.json_schema file {value}"
        try:
            value = json.loads(value.read_text(encoding="utf-8"))
        except OSError as exc:
            raise EvaluationError(f"{where}: cannot read ({exc.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EvaluationError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise EvaluationError(f"{where}: a JSON schema must be an object")
    try:
        validator_for(value).check_schema(value)
    except SchemaError as exc:
        raise EvaluationError(f"{where}: not a valid JSON schema ({exc.message})") from None
    return dict(value)
