"""The real-model round trip: SmolLM2 GGUF in, fine-tune, GGUF out, imported again, answering as the adapter did.

The work runs in a child process with OpenBLAS preloaded (as the CLI does): with the wheel's reference
BLAS the same steps take several times longer on this machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

QUESTIONS = 3
OVERRIDES = [
    "model.path=builtin:smollm2-135m-instruct",
    "training.iters=3",
    "training.batch_size=2",
    "training.steps_per_eval=3",
    "training.steps_per_checkpoint=3",
    "training.learning_rate=0.0005",
    "training.warmup_steps=0",
    "lora.num_layers=2",
    "lora.rank=4",
]


def round_trip(root: Path) -> dict:
    """Import the GGUF, fine-tune a few steps, export GGUF F16, import that file again, answer held-out questions."""
    from finetune.config import load_settings
    from finetune.data import load_splits
    from finetune.data.templating import chat_template_of, encode_chat
    from finetune.evaluation.generate import generate_one, load_for_eval, split_prompt_reference
    from finetune.export import export_bundle
    from finetune.model.resolve import resolve_model
    from finetune.publishing.bundle import build_bundle
    from finetune.train.trainer import train

    work = root / ".finetune"
    settings = load_settings(None, [*OVERRIDES, f"work_dir={work}"])
    base_dir = resolve_model(settings.model.path, None, work, settings.model.dtype)
    splits = load_splits(settings.dataset)
    _, tokenizer = load_for_eval(str(base_dir), None)
    data = {
        "train": [encode_chat(tokenizer, r["messages"], settings.template) for r in splits.train[:6]],
        "valid": [encode_chat(tokenizer, r["messages"], settings.template) for r in splits.valid[:2]],
    }
    trained = train(settings, str(base_dir), data, root / "run")
    template = chat_template_of(tokenizer, settings.template)
    bundle = build_bundle(root / "bundle", trained.adapter_dir, template, settings.public_dict(), {})

    exported = export_bundle(bundle, "gguf", root / "gguf", work_dir=work, rows=list(splits.valid[:2]))
    reimported = resolve_model(f"gguf:{root / 'gguf' / 'model-f16.gguf'}", None, work, "float32")
    adapted, adapted_tokenizer = load_for_eval(str(base_dir), bundle)
    served, served_tokenizer = load_for_eval(str(reimported), None)
    answers = []
    for row in splits.test[:QUESTIONS]:
        messages, _ = split_prompt_reference(row)
        answers.append(
            {
                "question": messages[-1]["content"],
                "adapter": generate_one(adapted, adapted_tokenizer, messages, settings.template, 12),
                "gguf": generate_one(served, served_tokenizer, messages, settings.template, 12),
            }
        )
    base, _ = load_for_eval(str(base_dir), None)
    base_answers = [generate_one(base, tokenizer, split_prompt_reference(r)[0], settings.template, 12)
                    for r in splits.test[:QUESTIONS]]  # fmt: skip
    return {
        "export": exported.to_dict(),
        "answers": answers,
        "base_answers": base_answers,
        "val_loss": [trained.initial_val_loss, trained.best_val_loss],
    }


@pytest.mark.slow
def test_smollm2_gguf_round_trip_answers_like_the_adapter(tmp_path):
    from finetune.train.blas import preload_env

    env, _ = preload_env()
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    check = result["export"]["verification"]["gguf_f16_vs_fused"]
    fused = result["export"]["verification"]["fused_vs_adapter"]
    print(
        f"SmolLM2 round trip {time.monotonic() - started:.0f} s; export {result['export']['seconds']} s, "
        f"F16 {check['size']:,} B, max |Δlogit| fused {fused['max_abs_logit_error']:.3g}, GGUF {check['max_abs_logit_error']:.3g}"
    )
    assert fused["max_abs_logit_error"] < fused["tolerance"]
    assert check["max_abs_logit_error"] < check["tolerance"] and check["tokenizer_agrees"]
    assert result["val_loss"][1] < result["val_loss"][0]  # the adapter learned something
    for answer in result["answers"]:
        assert answer["adapter"] and answer["gguf"] == answer["adapter"], answer
    # The adapter changed the model's answers, so agreeing with it is not agreeing with the base.
    assert [a["adapter"] for a in result["answers"]] != result["base_answers"]


if __name__ == "__main__":
    print(json.dumps(round_trip(Path(sys.argv[1])), default=str))
