"""The errors a user can fix: the CLI shows them as one line and exits non-zero."""

from finetune.child import TrainingChildError
from finetune.config import ConfigError
from finetune.data import DataError
from finetune.evaluation import EvaluationError
from finetune.storage import StorageError
from finetune.templating import TemplateError
from finetune.training import TrainingError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataError,
    EvaluationError,
    StorageError,
    TemplateError,
    TrainingError,
    TrainingChildError,
    FileNotFoundError,
)
