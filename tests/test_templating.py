"""Templating: train/serve parity, loss masks on every assistant turn, truncation, fallbacks."""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import pytest

from finetune.config import TemplateConfig
from finetune.data.templating import (
    CHATML_TEMPLATE,
    Encoded,
    TemplateError,
    chat_template_of,
    encode_chat,
    encode_prompt,
    encode_row,
    hf_tokenizer,
    load_tokenizer,
    render,
    template_fingerprint,
    tokenizer_fingerprint,
)

MULTI_TURN = [
    {"role": "system", "content": "Answer with the city only."},
    {"role": "user", "content": "Capital of Ghana?"},
    {"role": "assistant", "content": "Accra"},
    {"role": "user", "content": "And of Peru?"},
    {"role": "assistant", "content": "Lima"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(tiny_model_dir)


def demo_rows() -> list[dict]:
    text = resources.files("finetune.demo_data").joinpath("valid.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def decoded_targets(tokenizer, enc: Encoded) -> str:
    return hf_tokenizer(tokenizer).decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m])


@pytest.mark.parametrize("system_prompt", [None, "You are terse."])
def test_generation_prompt_tokens_equal_training_prompt_tokens(tiny_model_dir: Path, system_prompt: str | None) -> None:
    """Train/serve parity with the model's own loaded tokenizer, for every turn of every conversation."""
    import mlx_lm

    _, tokenizer = mlx_lm.load(str(tiny_model_dir))
    cfg = TemplateConfig(system_prompt=system_prompt, max_seq_length=1024)
    conversations = [row["messages"] for row in demo_rows()] + [MULTI_TURN]
    checked = 0
    for messages in conversations:
        enc = encode_chat(tokenizer, messages, cfg)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = encode_prompt(tokenizer, messages[:turn], cfg)
            assert enc.input_ids[: len(prompt)] == prompt
            # Inside the prompt only earlier answers are supervised; this answer's first token is.
            earlier = "".join(m["content"] + "<|im_end|>" for m in messages[:turn] if m["role"] == "assistant")
            assert decoded_targets(tokenizer, Encoded(prompt, enc.loss_mask[: len(prompt)])) == earlier
            assert enc.loss_mask[len(prompt)] == 1
            checked += 1
    assert checked == len(conversations) + 1


def test_parity_holds_where_whole_string_tokenization_would_merge_across_the_boundary(tokenizer) -> None:
    """A template that glues the answer to the prompt: BPE merges "cap"+"ital" when the text is tokenized whole."""
    cfg = TemplateConfig(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    messages = [{"role": "user", "content": "The cap"}, {"role": "assistant", "content": "ital"}]
    hf = hf_tokenizer(tokenizer)
    whole = hf(render(tokenizer, messages, cfg=cfg), add_special_tokens=False)["input_ids"]
    whole_prompt = hf(render(tokenizer, messages[:1], True, cfg=cfg), add_special_tokens=False)["input_ids"]
    assert whole[: len(whole_prompt)] != whole_prompt  # the naive way breaks parity here
    enc = encode_chat(tokenizer, messages, cfg)
    prompt = encode_prompt(tokenizer, messages[:1], cfg)
    assert enc.input_ids[: len(prompt)] == prompt
    assert decoded_targets(tokenizer, enc) == "ital"


def test_every_assistant_turn_is_supervised_and_nothing_else(tokenizer) -> None:
    enc = encode_chat(tokenizer, MULTI_TURN, TemplateConfig())
    assert decoded_targets(tokenizer, enc) == "Accra<|im_end|>Lima<|im_end|>"
    assert enc.loss_mask[0] == 0 and len(enc.loss_mask) == len(enc.input_ids)
    assert not enc.truncated


def test_mask_prompt_off_supervises_all_but_the_first_token_with_the_same_ids(tokenizer) -> None:
    masked = encode_chat(tokenizer, MULTI_TURN, TemplateConfig())
    unmasked = encode_chat(tokenizer, MULTI_TURN, TemplateConfig(mask_prompt=False))
    assert unmasked.input_ids == masked.input_ids
    assert unmasked.loss_mask == [0] + [1] * (len(unmasked.input_ids) - 1)


def test_system_prompt_is_added_only_when_the_conversation_has_none(tokenizer) -> None:
    cfg = TemplateConfig(system_prompt="Be brief.")
    added = render(tokenizer, [{"role": "system", "content": "Be brief."}, *MULTI_TURN[1:]])
    assert hf_tokenizer(tokenizer).decode(encode_chat(tokenizer, MULTI_TURN[1:], cfg).input_ids) == added
    assert "Be brief." not in hf_tokenizer(tokenizer).decode(encode_chat(tokenizer, MULTI_TURN, cfg).input_ids)


def test_truncation_keeps_the_head_and_flags_the_row(tokenizer) -> None:
    full = encode_chat(tokenizer, MULTI_TURN, TemplateConfig(max_seq_length=1024))
    cut = encode_chat(tokenizer, MULTI_TURN, TemplateConfig(max_seq_length=20))
    assert cut.truncated and len(cut.input_ids) == 20
    assert cut.input_ids == full.input_ids[:20] and cut.loss_mask == full.loss_mask[:20]


def test_a_prompt_filling_max_seq_length_leaves_zero_supervised_tokens(tokenizer) -> None:
    messages = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    enc = encode_chat(tokenizer, messages, TemplateConfig(max_seq_length=32))
    assert enc.truncated and enc.n_targets == 0


def test_encode_row_handles_chat_and_text_rows(tokenizer) -> None:
    cfg = TemplateConfig()
    chat = encode_row(tokenizer, {"messages": MULTI_TURN}, cfg)
    assert chat == encode_chat(tokenizer, MULTI_TURN, cfg)
    text = encode_row(tokenizer, {"text": "Accra is the capital of Ghana."}, cfg)
    hf = hf_tokenizer(tokenizer)
    assert text.input_ids[-1] == hf.eos_token_id
    assert hf.decode(text.input_ids[:-1]) == "Accra is the capital of Ghana."
    assert text.loss_mask == [0] + [1] * (len(text.input_ids) - 1)
    with pytest.raises(TemplateError, match="not a canonical row"):
        encode_row(tokenizer, {"prompt": "x"}, cfg)


def test_tools_reach_the_chat_template(tokenizer) -> None:
    cfg = TemplateConfig(
        chat_template="{% if tools %}TOOLS:{{ tools | map(attribute='name') | join(',') }}\n{% endif %}"
        + CHATML_TEMPLATE
    )
    enc = encode_row(tokenizer, {"messages": MULTI_TURN[1:3], "tools": [{"name": "lookup_capital"}]}, cfg)
    assert hf_tokenizer(tokenizer).decode(enc.input_ids).startswith("TOOLS:lookup_capital\n")


def test_tokenizer_without_template_falls_back_to_chatml_with_a_warning(tiny_model_dir: Path, caplog) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    hf_tokenizer(tokenizer).chat_template = None
    with caplog.at_level(logging.WARNING, logger="finetune.data.templating"):
        assert chat_template_of(tokenizer) == CHATML_TEMPLATE
        enc = encode_chat(tokenizer, MULTI_TURN, TemplateConfig())
    assert "falling back to ChatML" in caplog.text
    assert decoded_targets(tokenizer, enc) == "Accra<|im_end|>Lima<|im_end|>"


def test_template_that_rewrites_history_supervises_only_the_final_answer(tokenizer) -> None:
    # Like templates that strip reasoning from earlier turns: earlier turns render differently once not last.
    cfg = TemplateConfig(
        chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}[old]{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    enc = encode_chat(tokenizer, MULTI_TURN, cfg)
    assert decoded_targets(tokenizer, enc) == "Lima<|im_end|>"
    prompt = encode_prompt(tokenizer, MULTI_TURN[:-1], cfg)
    assert enc.input_ids[: len(prompt)] == prompt


def test_template_errors_are_template_errors(tokenizer) -> None:
    cfg = TemplateConfig(chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        encode_chat(tokenizer, MULTI_TURN, cfg)


def test_fingerprints_change_with_what_changes_the_tokens(tokenizer) -> None:
    base = template_fingerprint(tokenizer, TemplateConfig())
    assert base == template_fingerprint(tokenizer, TemplateConfig())
    assert base != template_fingerprint(tokenizer, TemplateConfig(max_seq_length=256))
    assert base != template_fingerprint(tokenizer, TemplateConfig(system_prompt="x"))
    assert base != template_fingerprint(tokenizer, TemplateConfig(chat_template=CHATML_TEMPLATE + " "))
    assert len(tokenizer_fingerprint(tokenizer)) == 64
