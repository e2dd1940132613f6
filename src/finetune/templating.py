"""Chat templating shared by training, evaluation and generation.

One code path renders a conversation with the tokenizer's chat template, so
the prompt tokens seen at generation equal the prompt tokens seen in training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from finetune.config import TemplateConfig

log = logging.getLogger(__name__)

# Used when a tokenizer ships no chat template (base models).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Message = dict[str, Any]


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


def chat_template_of(tokenizer: Any) -> str:
    template = getattr(hf_tokenizer(tokenizer), "chat_template", None)
    if not template:
        log.warning("tokenizer has no chat template; falling back to ChatML")
        return CHATML_TEMPLATE
    return template


def with_system_prompt(messages: list[Message], cfg: TemplateConfig) -> list[Message]:
    if cfg.system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": cfg.system_prompt}, *messages]
    return messages


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    return hf_tokenizer(tokenizer).apply_chat_template(
        messages,
        chat_template=chat_template_of(tokenizer),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def encode_prompt(tokenizer: Any, messages: list[Message], cfg: TemplateConfig) -> list[int]:
    """Tokens of a generation prompt: the conversation so far plus the opened assistant turn."""
    text = render(tokenizer, with_system_prompt(messages, cfg), add_generation_prompt=True)
    return hf_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer: Any, messages: list[Message], cfg: TemplateConfig) -> Encoded:
    """Tokenize a whole conversation; supervise every assistant turn (or all tokens if not mask_prompt)."""
    messages = with_system_prompt(messages, cfg)
    text = render(tokenizer, messages)
    spans = _assistant_spans(tokenizer, messages, text) if cfg.mask_prompt else [(0, len(text))]
    enc = hf_tokenizer(tokenizer)(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [int(any(s <= start and end <= e for s, e in spans) and end > start) for start, end in enc["offset_mapping"]]
    truncated = len(ids) > cfg.max_seq_length
    return Encoded(ids[: cfg.max_seq_length], mask[: cfg.max_seq_length], truncated)


def _assistant_spans(tokenizer: Any, messages: list[Message], text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant answer (content and end-of-turn) in the rendered text."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        end_text = render(tokenizer, messages[: i + 1])
        if not text.startswith(end_text):
            raise ValueError("chat template does not render conversations as prefixes of each other")
        end = len(end_text.rstrip("\n"))
        spans.append((start, end))
    return spans
