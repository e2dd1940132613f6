"""Reading configuration input: ``--set`` overrides, the YAML file's shape, validation errors as one line each.

Plain helpers without the settings models, so ``config`` stays one readable file of sections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

from finetune.errors import ConfigError


def _auto_or_bool(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError:  # one error naming the choices, not one per member of the union
        raise PydanticCustomError(
            "auto_or_bool", "expected auto, true or false, got {value}", {"value": repr(value)}
        ) from None


AutoOrBool = Annotated[Literal["auto"] | bool, WrapValidator(_auto_or_bool)]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["training.iters=10", "model.path=x"]`` into a nested dict; values are YAML scalars."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected section.key=value")
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part} is set twice")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return result


def check_yaml_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")


def describe_validation_error(exc: ValidationError, path: Path | None = None) -> str:
    """One line per problem, each naming the dotted key."""
    where = f" (config file {path}, environment FINETUNE_*, or --set)" if path else ""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}{where}")
        else:
            lines.append(f"config key {key!r}: {err['msg']}{where}")
    return "; ".join(lines)
