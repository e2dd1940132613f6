"""Loading base + adapter with mlx-lm, and greedy generation (batched, and streamed one at a time)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune.config import TemplateConfig
from finetune.data.templating import encode_prompt
from finetune.errors import EvaluationError
from finetune.layout import ADAPTER_CONFIG_FILE, ADAPTER_FILES


def load_for_eval(
    model_path: str,
    adapter_dir: Path | str | None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from mlx-lm, with the adapter applied on the base (no fuse), in eval mode."""
    import mlx_lm

    if adapter_dir is not None:
        check_adapter_dir(Path(adapter_dir))
    model, tokenizer = mlx_lm.load(
        model_path,
        adapter_path=str(adapter_dir) if adapter_dir is not None else None,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    model.eval()
    return model, tokenizer


def check_adapter_dir(adapter_dir: Path) -> None:
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise EvaluationError(f"adapter {adapter_dir}: missing {', '.join(missing)}")
    try:
        json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"adapter {adapter_dir / ADAPTER_CONFIG_FILE}: not valid JSON ({exc})") from None


def split_prompt_reference(row: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """A canonical chat row as (conversation before the final answer, the final answer)."""
    messages = row["messages"]
    return list(messages[:-1]), messages[-1]["content"]


def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[dict[str, Any]]],
    template: TemplateConfig,
    max_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers to each conversation, generated in batches."""
    prompts = [encode_prompt(tokenizer, conv, template) for conv in conversations]
    return generate_from_tokens(model, tokenizer, prompts, max_tokens, batch_size)


def generate_from_tokens(
    model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_tokens: int, batch_size: int = 32
) -> list[str]:
    from mlx_lm.generate import batch_generate

    if not prompts:
        return []
    response = batch_generate(
        model,
        tokenizer,
        [list(p) for p in prompts],
        max_tokens=max_tokens,
        completion_batch_size=batch_size,
        prefill_batch_size=min(8, batch_size),
        return_token_ids=True,
    )
    return [detokenize(tokenizer, ids) for ids in response.token_ids]


def detokenize(tokenizer: Any, token_ids: Iterable[int]) -> str:
    """Text exactly as ``mlx_lm.generate`` assembles it (its detokenizer trims a leading space)."""
    detokenizer = tokenizer.detokenizer
    for token in token_ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


def generate_one(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    template: TemplateConfig,
    max_tokens: int,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """One greedy answer via ``mlx_lm.stream_generate``; ``on_text`` receives each new piece (for streaming)."""
    from mlx_lm.generate import stream_generate

    prompt = encode_prompt(tokenizer, messages, template)
    pieces = []
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        pieces.append(response.text)
        if on_text is not None and response.text:
            on_text(response.text)
    return "".join(pieces)
