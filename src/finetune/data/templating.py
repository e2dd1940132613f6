"""Chat templating shared by training, evaluation and generation.

One code path turns a conversation into tokens. The rendered text is cut at
the assistant-turn boundaries and each piece is tokenized on its own, so the
tokens of a generation prompt are, by construction, exactly the tokens that
precede that answer in training (whole-string tokenization can merge across a
boundary and break that equality for some tokenizers).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import TemplateConfig
from finetune.errors import TemplateError

log = logging.getLogger(__name__)

# Used when a tokenizer ships no chat template (base models).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Bump when the encoding below changes: it is part of every tokenized-data version.
ENCODING_VERSION = "2"

Message = dict[str, Any]
Row = Mapping[str, Any]


@dataclass(frozen=True)
class Encoded:
    """Token ids and a 0/1 mask marking the supervised (target) tokens."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False

    @property
    def n_targets(self) -> int:
        return sum(self.loss_mask)


def hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside mlx-lm's TokenizerWrapper (or the tokenizer itself)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


_warned_no_template: set[int] = set()


def chat_template_of(tokenizer: Any, cfg: TemplateConfig | None = None) -> str:
    """The Jinja2 chat template in use: the configured one, the tokenizer's, or ChatML."""
    if cfg is not None and cfg.chat_template:
        return cfg.chat_template
    template = getattr(hf_tokenizer(tokenizer), "chat_template", None)
    if isinstance(template, dict):  # some tokenizers ship named templates
        template = template.get("default")
    if not template:
        if id(tokenizer) not in _warned_no_template:
            _warned_no_template.add(id(tokenizer))
            log.warning("tokenizer has no chat template; falling back to ChatML")
        return CHATML_TEMPLATE
    return template


def with_system_prompt(messages: Sequence[Message], cfg: TemplateConfig) -> list[Message]:
    if cfg.system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": cfg.system_prompt}, *messages]
    return list(messages)


def render(
    tokenizer: Any,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
    cfg: TemplateConfig | None = None,
) -> str:
    try:
        return hf_tokenizer(tokenizer).apply_chat_template(
            list(messages),
            tools=tools,
            chat_template=chat_template_of(tokenizer, cfg),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as exc:  # jinja2 errors and raise_exception() calls inside templates
        raise TemplateError(f"the chat template rejected the conversation: {exc}") from None


def _assistant_spans(
    tokenizer: Any, messages: list[Message], text: str, tools: list | None, cfg: TemplateConfig
) -> list[tuple[int, int]]:
    """Character spans of the assistant answers (content and end-of-turn marker) in ``text``.

    Templates that render earlier turns differently from the last one (e.g. ones
    that strip reasoning from history) break the prefix property; then only the
    final answer can be located, and only it is supervised.
    """
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = render(tokenizer, messages[:i], True, tools, cfg)
        end_text = text if i == len(messages) - 1 else render(tokenizer, messages[: i + 1], False, tools, cfg)
        if not (text.startswith(end_text) and end_text.startswith(start_text)):
            return _last_turn_span(tokenizer, messages, text, tools, cfg)
        # Trailing whitespace after the end-of-turn marker is not something the model must emit.
        spans.append((len(start_text), max(len(start_text), len(end_text.rstrip()))))
    return spans


def _last_turn_span(
    tokenizer: Any, messages: list[Message], text: str, tools: list | None, cfg: TemplateConfig
) -> list[tuple[int, int]]:
    if messages[-1]["role"] != "assistant":
        return []
    start_text = render(tokenizer, messages[:-1], True, tools, cfg)
    if not text.startswith(start_text):
        raise TemplateError(
            "the chat template does not render the conversation before the last answer as a prefix of the "
            "whole conversation, so the answer cannot be located"
        )
    log.debug("chat template is not prefix-consistent across turns; supervising the final answer only")
    return [(len(start_text), max(len(start_text), len(text.rstrip())))]


def _pieces(
    tokenizer: Any, messages: list[Message], add_generation_prompt: bool, tools: list | None, cfg: TemplateConfig
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_answer) pieces, empty pieces dropped."""
    text = render(tokenizer, messages, add_generation_prompt, tools, cfg)
    pieces, pos = [], 0
    for start, end in _assistant_spans(tokenizer, messages, text, tools, cfg):
        pieces += [(text[pos:start], False), (text[start:end], True)]
        pos = end
    pieces.append((text[pos:], False))
    return [(piece, answer) for piece, answer in pieces if piece]


def _tokenize_pieces(tokenizer: Any, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids of the concatenated pieces and a 0/1 flag per token: inside an assistant answer."""
    if not pieces:
        return [], []
    encoded = hf_tokenizer(tokenizer)([piece for piece, _ in pieces], add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    flags: list[int] = []
    for piece_ids, (_, answer) in zip(encoded, pieces):
        ids += piece_ids
        flags += [int(answer)] * len(piece_ids)
    return ids, flags


@functools.lru_cache(maxsize=8)
def _control_pattern(tokens: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def check_no_control_tokens(tokenizer: Any, texts: Iterable[str]) -> None:
    """Refuse text that spells a control token: it would be tokenized as one and break the turn structure."""
    hf = hf_tokenizer(tokenizer)
    added = getattr(hf, "added_tokens_decoder", {}) or {}
    tokens = {str(t) for t in hf.all_special_tokens} | {
        t.content for t in added.values() if getattr(t, "special", False)
    }
    pattern = _control_pattern(tuple(sorted(tokens)))
    for text in texts:
        match = pattern.search(text) if pattern and isinstance(text, str) else None
        if match:
            raise TemplateError(f"the text contains the tokenizer's control token {match.group()!r}")


def encode_prompt(
    tokenizer: Any, messages: Sequence[Message], cfg: TemplateConfig, tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Tokens of a generation prompt: the conversation so far plus the opened assistant turn."""
    pieces = _pieces(tokenizer, with_system_prompt(messages, cfg), True, tools, cfg)
    return _tokenize_pieces(tokenizer, pieces)[0]


def encode_chat(
    tokenizer: Any, messages: Sequence[Message], cfg: TemplateConfig, tools: list[dict[str, Any]] | None = None
) -> Encoded:
    """Tokenize a whole conversation; supervise every assistant turn (or every token if not mask_prompt)."""
    check_no_control_tokens(tokenizer, (m.get("content") or "" for m in messages))
    ids, flags = _tokenize_pieces(tokenizer, _pieces(tokenizer, with_system_prompt(messages, cfg), False, tools, cfg))
    mask = flags if cfg.mask_prompt else [1] * len(ids)
    return _finish(ids, mask, cfg)


def encode_text(tokenizer: Any, text: str, cfg: TemplateConfig) -> Encoded:
    """Plain-text (continued pretraining) row: every token after the first is a target, ending with EOS."""
    check_no_control_tokens(tokenizer, [text])
    hf = hf_tokenizer(tokenizer)
    ids = list(hf(text, add_special_tokens=True)["input_ids"])
    eos = hf.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return _finish(ids, [1] * len(ids), cfg)


def _finish(ids: list[int], mask: list[int], cfg: TemplateConfig) -> Encoded:
    # Token 0 has nothing before it to be predicted from.
    mask = [0, *mask[1:]] if mask else mask
    limit = cfg.max_seq_length
    return Encoded(ids[:limit], mask[:limit], truncated=len(ids) > limit)


def encode_row(tokenizer: Any, row: Row, cfg: TemplateConfig) -> Encoded:
    """Encode one canonical row: ``{"messages": [...], "tools"?: [...]}`` or ``{"text": ...}``."""
    if "messages" in row:
        return encode_chat(tokenizer, row["messages"], cfg, row.get("tools"))
    if "text" in row:
        return encode_text(tokenizer, row["text"], cfg)
    raise TemplateError(f"not a canonical row (expected 'messages' or 'text'): keys {sorted(row)}")


def load_tokenizer(model_path: str | Path) -> Any:
    """Only the tokenizer of a local model directory or Hugging Face repo (no weights are loaded)."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    return mlx_load_tokenizer(Path(model_path) if Path(model_path).exists() else model_path)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides token ids: the vocabulary/merges/normalizer and the special tokens."""
    hf = hf_tokenizer(tokenizer)
    backend = getattr(hf, "backend_tokenizer", None)
    h = hashlib.sha256()
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(hf.get_vocab().items())).encode())
    specials = {"eos": hf.eos_token_id, "bos": hf.bos_token_id, "added": sorted(str(t) for t in hf.all_special_tokens)}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


def template_fingerprint(tokenizer: Any, cfg: TemplateConfig) -> str:
    """sha256 of everything that turns a canonical row into tokens, besides the row itself."""
    parts = {
        "encoding": ENCODING_VERSION,
        "chat_template": chat_template_of(tokenizer, cfg),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": cfg.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
