"""Canonical rows: the one shape every source is mapped to, validated field by field.

A canonical row is ``{"messages": [...], "tools"?: [...]}`` or ``{"text": ...}``;
:func:`canonical_line` is its one serialization (what is hashed, stored and read back).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune.config import DatasetConfig
from finetune.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")


def canonical_line(row: Mapping[str, Any]) -> bytes:
    """The one serialization of a canonical row: what is hashed, stored and read back."""
    return json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class BadRow:
    """A row-level problem a reader found; the loader fails or skips per ``dataset.on_bad_row``."""

    where: str
    message: str


class Canonicalizer:
    """Maps source records to canonical rows, detecting the schema from the first good row."""

    def __init__(self, cfg: DatasetConfig) -> None:
        self.cfg = cfg
        self.schema: str | None = None if cfg.row_schema == "auto" else cfg.row_schema
        self.detected_at = "dataset.row_schema"
        self.templates = {name: _compile_template(name, text) for name, text in cfg.templates.items()}

    def __call__(self, record: Any, where: str) -> dict[str, Any]:
        if not isinstance(record, dict):
            raise bad_row(where, f"expected a JSON object, got {_type_name(record)}")
        schema = self.schema or self._detect(record, where)
        row = {"chat": self._chat, "prompt_completion": self._prompt_completion, "text": self._text}[schema](
            record, where
        )
        self.schema = schema
        return row

    def _available(self, record: dict[str, Any], name: str) -> bool:
        return name in self.templates or self.cfg.field_map.get(name, name) in record

    def _detect(self, record: dict[str, Any], where: str) -> str:
        for schema, needs in (
            ("chat", ("messages",)),
            ("prompt_completion", ("prompt", "completion")),
            ("text", ("text",)),
        ):
            if all(self._available(record, name) for name in needs):
                self.detected_at = where
                return schema
        raise bad_row(
            where,
            f"cannot tell the row schema from the keys {sorted(record)}: expected messages, prompt+completion or "
            "text; map other columns with dataset.field_map or dataset.templates",
        )

    def _get(self, record: dict[str, Any], name: str, where: str, required: bool = True) -> Any:
        if name in self.templates:
            try:
                return self.templates[name].render({**record, "row": record})
            except Exception as exc:  # jinja2 undefined/security/type errors: a problem with this row
                raise bad_row(where, f"dataset.templates.{name}: {exc}") from None
        column = self.cfg.field_map.get(name, name)
        if column not in record and required:
            mapped = f" (column {column!r})" if column != name else ""
            raise bad_row(
                where,
                f"missing field {name!r}{mapped} for schema {self.schema or '?'} (detected at {self.detected_at})",
            )
        return record.get(column)

    def _chat(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        messages = self._get(record, "messages", where)
        if isinstance(messages, str):  # e.g. a CSV column holding JSON
            try:
                messages = json.loads(messages)
            except (ValueError, RecursionError):
                raise bad_row(where, "messages is a string that is not a JSON list") from None
        row: dict[str, Any] = {"messages": _check_messages(messages, where)}
        tools = record.get(self.cfg.field_map.get("tools", "tools"))
        if tools is not None:
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise bad_row(where, f"tools must be a list of objects, got {_type_name(tools)}")
            row["tools"] = tools
        return row

    def _prompt_completion(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        prompt = _string(self._get(record, "prompt", where), "prompt", where)
        completion = _string(self._get(record, "completion", where), "completion", where)
        if not completion.strip():
            raise bad_row(where, "empty completion: nothing to train on")
        system = self._get(record, "system", where, required=False)
        messages = [{"role": "system", "content": _string(system, "system", where)}] if system else []
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return {"messages": messages}

    def _text(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        text = _string(self._get(record, "text", where), "text", where)
        if not text.strip():
            raise bad_row(where, "empty text")
        return {"text": text}


def _compile_template(name: str, text: str) -> Any:
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)
    try:
        return env.from_string(text)
    except TemplateSyntaxError as exc:
        raise DataError(
            f"dataset.templates.{name}: invalid Jinja2 template ({exc.message}, line {exc.lineno})"
        ) from None


def _check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise bad_row(
            where,
            f"messages must be a non-empty list, got {_type_name(messages) if messages != [] else 'an empty list'}",
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_row(where, f"messages[{i}] must be an object, got {_type_name(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise bad_row(where, f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if not (isinstance(content, str) or (content is None and role == "assistant" and tool_calls)):
            raise bad_row(where, f"messages[{i}].content must be a string, got {_type_name(content)}")
        if role == "assistant" and not ((content or "").strip() or tool_calls):
            raise bad_row(where, f"messages[{i}] is an empty assistant answer")
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise bad_row(where, f"messages[{i}].tool_calls must be a list, got {_type_name(tool_calls)}")
        out.append({key: message[key] for key in MESSAGE_KEYS if message.get(key) is not None})
    if out[-1]["role"] != "assistant":
        raise bad_row(where, f"the last message must be the assistant's answer, not {out[-1]['role']!r}")
    return out


def _string(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise bad_row(where, f"{name} must be a string, got {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


class BadRowError(Exception):
    def __init__(self, bad: BadRow) -> None:
        self.bad = bad


def bad_row(where: str, message: str) -> BadRowError:
    return BadRowError(BadRow(where, message))
