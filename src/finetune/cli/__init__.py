"""The ``finetune`` command line: ``main`` is the console script."""

from finetune.cli.main import app, main

__all__ = ["app", "main"]
