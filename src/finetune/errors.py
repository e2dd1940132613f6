"""The errors a user can fix, one class per concern under one base.

The CLI catches :class:`FinetuneError` and shows its message as one line. This
module imports nothing from the rest of the package, so any module can raise
these without pulling in MLX, boto3 or training code.
"""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem the user can fix; the message names the file, line or config key."""


class ConfigError(FinetuneError, ValueError):
    """A configuration problem, phrased as one line for the user."""


class DataError(FinetuneError, ValueError):
    """A dataset problem; the message names the file and line (or the config key)."""


class FetchError(DataError):
    """A source could not be fetched for a reason that may pass (network, 5xx): worth a retry."""


class TemplateError(FinetuneError, ValueError):
    """The chat template cannot render a conversation (the message says why)."""


class ModelError(FinetuneError, ValueError):
    """A base model reference that cannot be resolved (unknown builtin, missing directory)."""


class TrainingError(FinetuneError, RuntimeError):
    """A problem with the training inputs or the run directory; retrying will not help."""


class FingerprintMismatch(TrainingError):
    """The run directory's checkpoints were made from a different config, model or data."""


class RankMismatch(TrainingError):
    """Distributed ranks would train on different config, model, tokenizer or data (the message names which)."""


class TrainingChildError(FinetuneError, RuntimeError):
    """The training process died (signal, crash, timeout): worth a retry, which resumes."""


class EvaluationError(FinetuneError, ValueError):
    """An evaluation input problem, phrased for the user (names the file or config key)."""


class ExportError(FinetuneError, ValueError):
    """A bundle that cannot be exported as asked (corrupt bundle, unsupported architecture or type, failed check)."""


class StorageError(FinetuneError, RuntimeError):
    """A storage problem, phrased as one line naming the store (never its credentials)."""


class PublishError(StorageError):
    """A bundle that cannot be published as asked (bad run id, reserved fields, not published)."""


USER_ERRORS: tuple[type[BaseException], ...] = (FinetuneError, FileNotFoundError)
