"""Base models: resolving a model reference, loading it, importing GGUF files, the tiny test model."""
