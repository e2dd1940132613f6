"""SmolLM2-135M from its Q4_1 GGUF: kept quantized (4/8-bit) vs dequantized to float32, on this machine's backend.

Why ``model.dtype: auto`` picks float32 on MLX's CPU backend. Both variants in one process, alternated;
per variant: a LoRA training step (8 adapted layers, batch 4 x 64 tokens, forward + backward + Adam)
and greedy decoding, after one untimed warm-up each. Prints tokens/s and the ratio.

Run by hand:  .venv/bin/python benchmarks/bench_gguf_dtype.py [--steps 3] [--decode 24]
"""

from __future__ import annotations

import argparse
import time

from finetune.model.resolve import resolve_model
from finetune.train.blas import reexec_with_openblas

BATCH, LENGTH, LORA_LAYERS = 4, 64, 8


def train_step_seconds(model_dir: str, steps: int) -> float:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    model, _ = load(model_dir)
    model.freeze()
    linear_to_lora_layers(model, LORA_LAYERS, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    optimizer = optim.Adam(learning_rate=1e-4)
    tokens = mx.random.randint(0, 49152, (BATCH, LENGTH + 1))

    def loss(m, x, y):
        return nn.losses.cross_entropy(m(x), y).mean()

    grad = nn.value_and_grad(model, loss)

    def step() -> None:
        value, grads = grad(model, tokens[:, :-1], tokens[:, 1:])
        optimizer.update(model, grads)
        mx.eval(value, model.trainable_parameters(), optimizer.state)

    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def decode_tokens_per_second(model_dir: str, max_tokens: int) -> float:
    from mlx_lm import load, stream_generate

    model, tokenizer = load(model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three capital cities in Europe."}], add_generation_prompt=True
    )
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=4):  # warm-up
        pass
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))
    return responses[-1].generation_tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--decode", type=int, default=24, help="tokens to decode")
    args = parser.parse_args()
    reexec_with_openblas()
    import mlx.core as mx

    dirs = {d: str(resolve_model("builtin:smollm2-135m-instruct", None, ".finetune", d)) for d in ("keep", "float32")}
    print(
        f"MLX default device: {mx.default_device()}; LoRA step: batch {BATCH} x {LENGTH} tokens, {LORA_LAYERS} layers"
    )
    results: dict[str, dict[str, float]] = {d: {} for d in dirs}
    for dtype, path in dirs.items():
        results[dtype]["train_tok_s"] = BATCH * LENGTH / train_step_seconds(path, args.steps)
    for dtype, path in reversed(dirs.items()):
        results[dtype]["decode_tok_s"] = decode_tokens_per_second(path, args.decode)
    print(f"{'':28}{'4-bit (keep)':>14}{'float32':>14}{'float32/4-bit':>15}")
    for key, label in (("train_tok_s", "LoRA training tokens/s"), ("decode_tok_s", "greedy decoding tokens/s")):
        q, f = results["keep"][key], results["float32"][key]
        print(f"{label:28}{q:>14,.1f}{f:>14,.1f}{f / q:>15.1f}x")


if __name__ == "__main__":
    main()
