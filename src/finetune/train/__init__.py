"""LoRA training with exact resume, in a child process: batching, trainer, checkpoints, mirroring."""
