"""One typed configuration for the whole pipeline.

Layering, lowest to highest: defaults < YAML file < FINETUNE_* environment
variables (nested with ``__``) < ``--set section.key=value`` overrides.
Unknown keys are errors that name the key.

Two kinds of setting: what defines the model (the dataset, template, model, lora and
training sections) and how a run operates (evaluation, storage, and the fields marked
``operational``: retries, report and checkpoint intervals, mirroring, BLAS, download
limits). :meth:`Settings.fingerprint` covers the first kind only, so editing an
operational field neither forces a retrain nor refuses a resume.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from finetune.config_files import AutoOrBool, check_yaml_file, describe_validation_error, parse_overrides
from finetune.errors import ConfigError
from finetune.schemas import load_json_schema

__all__ = ["ConfigError", "Settings", "describe_validation_error", "load_settings", "parse_overrides"]


# Marks a field that changes how a run operates, not what it computes (see Settings.fingerprint).
OPERATIONAL = {"operational": True}
SECRET_FIELDS = ("access_key_id", "secret_access_key", "session_token")  # never parameters, logs or bundles


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def defining_fields(self) -> dict[str, Any]:
        """This section as JSON, without its operational fields."""
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if (type(self).model_fields[k].json_schema_extra or {}) != OPERATIONAL}


class DatasetConfig(Section):
    source: str = Field(
        "builtin:capitals",
        description="Local file, directory or archive (.tar, .tar.gz, .zip), file://, s3://bucket/key, https://…, "
        "hf:<dataset id>[@revision], or builtin:capitals. A directory or archive may hold train/valid/test files.",
    )
    format: Literal["auto", "jsonl", "json", "csv", "parquet"] = Field(
        "auto", description="File format; auto picks it from each file's extension."
    )
    row_schema: Literal["auto", "chat", "prompt_completion", "text"] = Field(
        "auto",
        description="Row shape; auto detects it from the first row and holds every later row to it.",
    )
    field_map: dict[Literal["messages", "prompt", "completion", "text", "system", "tools"], str] = Field(
        default_factory=dict,
        description="Canonical field -> source column, e.g. {prompt: question, completion: answer}.",
    )
    templates: dict[Literal["prompt", "completion", "text", "system"], str] = Field(
        default_factory=dict,
        description="Canonical field -> Jinja2 template over the row's columns, "
        "e.g. {prompt: '{{instruction}}\\n\\n{{input}}', completion: '{{output}}'}.",
    )
    split_seed: int = 0
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Carved from train when there is no valid file.")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Carved from train when there is no test file.")
    on_bad_row: Literal["fail", "skip"] = Field(
        "fail", description="fail: the first bad row stops the run; skip: drop bad rows and report how many."
    )
    max_line_bytes: int = Field(1 << 20, gt=0, description="Largest accepted line (JSONL/CSV) or canonical row.")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$", description="Expected sha256 of a downloaded https:// source."
    )
    max_download_bytes: int = Field(
        10 << 30, gt=0, description="Size cap for an https:// download.", json_schema_extra=OPERATIONAL
    )
    max_archive_bytes: int = Field(
        10 << 30, gt=0, description="Cap on the total extracted size of an archive.", json_schema_extra=OPERATIONAL
    )
    max_archive_members: int = Field(
        10_000, gt=0, description="Cap on the number of files in an archive.", json_schema_extra=OPERATIONAL
    )
    timeout_seconds: float = Field(
        60.0, gt=0, description="Network timeout for https:// sources.", json_schema_extra=OPERATIONAL
    )


class TemplateConfig(Section):
    system_prompt: str | None = Field(None, description="Prepended to conversations that have no system message.")
    chat_template: str | None = Field(
        None, description="Jinja2 chat template replacing the tokenizer's (default: the tokenizer's, else ChatML)."
    )
    max_seq_length: int = Field(512, gt=8)
    mask_prompt: bool = Field(True, description="Train only on assistant tokens (every assistant turn).")
    truncation: Literal["truncate", "drop", "fail"] = Field(
        "truncate",
        description="Rows longer than max_seq_length: keep the first max_seq_length tokens, drop the row, or fail. "
        "A row left with no supervised token is a bad row (dataset.on_bad_row).",
    )


class ModelConfig(Section):
    path: str = Field(
        "builtin:tiny-llama",
        description="Hugging Face repo id, local MLX model directory, gguf:/path/model.gguf (llama or qwen2, imported "
        "once into the work dir), builtin:smollm2-135m-instruct (a real chat model) or builtin:tiny-llama (tests).",
    )
    dtype: Literal["auto", "keep", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Imported GGUF weights: keep (Q4/Q8 stay quantized) or dense; auto: float32 on CPU, else keep.",
    )
    revision: str | None = None
    trust_remote_code: bool = False


class LoraConfig(Section):
    fine_tune_type: Literal["lora", "dora"] = "lora"
    num_layers: int = Field(-1, description="Blocks to adapt, counted from the top; -1 for all.")
    rank: int = Field(8, gt=0)
    scale: float = Field(20.0, description="The LoRA multiplier itself (mlx-lm convention), not PEFT's alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Not named "keys": a pydantic field called keys makes dict(model) fail, which Prefect does on task inputs.
    layer_keys: list[str] | None = Field(
        None, description="Module keys to adapt, e.g. self_attn.q_proj; default: all linear layers."
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the LoRA products, weights kept float32; auto: the base's 16-bit dtype on CUDA (LoRA).",
        json_schema_extra=OPERATIONAL,  # rounding only, float32 master weights: a run may resume under another
    )


class TrainingConfig(Section):
    iters: int = Field(200, gt=0, description="Optimizer steps (ignored when epochs is set).")
    learning_rate: float = Field(2e-3, gt=0, description="Peak learning rate (after warmup).")
    epochs: float | None = Field(None, gt=0, description="Train for this many passes over the data instead of iters.")
    batch_size: int = Field(8, gt=0)
    warmup_steps: int = Field(10, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine decays to learning_rate * min_lr_ratio.")
    sort_window_batches: int = Field(
        64, gt=0, description="Rows are length-sorted within shuffled windows of this many batches (less padding)."
    )
    final_adapter: Literal["best", "last"] = Field(
        "best", description="Publish the adapter of the best validation loss, or of the last step."
    )
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accumulation_steps: int = Field(1, gt=0)
    seed: int = 0
    steps_per_report: int = Field(10, gt=0, json_schema_extra=OPERATIONAL)
    steps_per_eval: int = Field(50, gt=0)
    steps_per_checkpoint: int = Field(50, gt=0, json_schema_extra=OPERATIONAL)
    keep_checkpoints: int = Field(2, gt=0, json_schema_extra=OPERATIONAL)
    val_batches: int = Field(-1, description="-1 evaluates the whole validation split.")
    early_stopping_patience: int | None = Field(None, gt=0)
    retries: int = Field(
        2, ge=0, description="Task retries after a crashed training attempt.", json_schema_extra=OPERATIONAL
    )
    retry_delay_seconds: float = Field(5.0, ge=0, json_schema_extra=OPERATIONAL)
    mirror_checkpoints: bool = Field(
        False,
        description="Copy checkpoints to storage.uri (training/<run_id>/checkpoints/) so any machine can resume.",
        json_schema_extra=OPERATIONAL,
    )
    mirror_every: int = Field(
        1,
        gt=0,
        description="Mirror every K-th checkpoint; the last ones are always mirrored.",
        json_schema_extra=OPERATIONAL,
    )
    packing: AutoOrBool = Field("auto", description="Pack rows (block-diagonal attention); auto: if cheaper.")
    pack_length: int | None = Field(None, gt=0, description="Default: the longest row, rounded up to 64.")
    batch_tokens: int | None = Field(None, gt=0, description="Packed: tokens a micro-batch (default ~batch_size rows).")
    loss_chunk_tokens: Annotated[int, Field(gt=0)] | Literal["auto"] | None = Field(
        "auto",
        description="Loss over chunks of this many tokens (null: all logits at once; auto: all on CUDA, 2048 elsewhere).",
        json_schema_extra=OPERATIONAL,
    )
    grad_checkpoint: bool = Field(False, description="Recompute blocks in backward.", json_schema_extra=OPERATIONAL)
    use_openblas: Literal["auto", "off"] = Field(
        "auto", description="Linux, MLX on CPU: preload Debian's OpenBLAS if present.", json_schema_extra=OPERATIONAL
    )
    # Distributed training changes where rows are computed, not what is computed: a run may resume on other ranks.
    hosts: str | None = Field(
        None,
        description="mlx.launch hostfile (JSON) naming the machines of a data-parallel run, one rank per entry; "
        "IP addresses, not host names, for the ring backend. None: one process.",
        json_schema_extra=OPERATIONAL,
    )
    distributed_backend: Literal["ring", "jaccl", "jaccl-ring", "nccl", "mpi"] = Field(
        "ring",
        description="mx.distributed backend: ring (TCP: Ethernet, Thunderbolt bridge), jaccl (RDMA over "
        "Thunderbolt 5), nccl (CUDA), mpi.",
        json_schema_extra=OPERATIONAL,
    )
    distributed_port: int | None = Field(
        None,
        gt=0,
        lt=65536,
        description="First ring/jaccl port (one per rank); default a free one when every host is 127.0.0.1, "
        "else 32323.",
        json_schema_extra=OPERATIONAL,
    )
    distributed_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="A rank whose collective waits longer than this for the others gives up, failing the attempt.",
        json_schema_extra=OPERATIONAL,
    )

    @field_validator("use_openblas", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare off/on as a boolean.
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


# Metric names the evaluation measures; "val"/"test" are the loss splits.
LossMetric = Literal["val_loss", "val_ppl", "test_loss", "test_ppl"]
ScoreMetric = Literal["exact_match", "correct_fact", "contains", "token_f1", "regex_pass", "json_valid"]
EvalMetric = LossMetric | ScoreMetric
DEFAULT_FACT_REGEX = r"^(?:The capital of .+? is )?(.+?)(?: is the capital of .+)?\.?$"


class EvaluationConfig(Section):
    max_tokens: int = Field(32, gt=0, description="Greedy answer length limit, in tokens.")
    max_examples: int = Field(50, gt=0, description="Questions answered by each model (the first N of the test split).")
    batch_size: int = Field(8, gt=0, description="Sequences per forward pass for loss evaluation.")
    generation_batch_size: int = Field(32, gt=0, description="Prompts decoded together by batched generation.")
    primary_metric: Literal["auto"] | EvalMetric = Field(
        "auto", description="Metric that decides promotion; auto: exact_match for question→answer data, else val_loss."
    )
    promotion_margin: float = Field(
        0.0,
        ge=0.0,
        description="How much the candidate must beat the champion by, in the primary metric's units: a gain "
        "equal to the margin promotes; with 0, any strict improvement does.",
    )
    require_beat_base: bool = Field(True, description="Never promote a candidate no better than the base model.")
    floors: dict[EvalMetric, float] = Field(
        default_factory=dict,
        description="Absolute bounds the candidate must meet to be promoted: at least the value for scores "
        "(exact_match: 0.5), at most for losses (val_loss: 2.0). Non-finite metrics always fail.",
    )
    answer_regex: str | None = Field(
        None, description="regex_pass: share of answers in which this pattern is found (re.search)."
    )
    fact_regex: str | None = Field(
        DEFAULT_FACT_REGEX,
        description="correct_fact: an answer containing the reference's key span (this regex's first group) as whole "
        "words, normalised like exact match. The default picks the city out of the capitals answers; null: off.",
    )
    json_schema: dict[str, Any] | Path | None = Field(
        None,
        description="json_valid: share of answers that parse as JSON and satisfy this schema (inline or a .json file).",
    )
    samples_in_report: int = Field(5, ge=0, description="Example generations shown next to their references.")

    @field_validator("answer_regex", "fact_regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return value

    @field_validator("json_schema")
    @classmethod
    def _schema_is_valid(cls, value: dict[str, Any] | Path | None) -> dict[str, Any] | Path | None:
        if value is not None:
            load_json_schema(value)
        return value


class StorageOptions(Section):  # no credentials: safe to show, log and pass as a flow parameter
    uri: str = Field("finetune-store", description="Local directory, file://… or s3://bucket/prefix.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2, moto).")
    region: str | None = None
    credentials_block: str | None = Field(
        None, description="Prefect Secret block holding the credentials (JSON object)", json_schema_extra=OPERATIONAL
    )
    checksum_mode: Literal["when_supported", "when_required"] = Field(
        "when_supported", description="when_required for providers that reject the SDK's default checksums."
    )
    max_attempts: int = Field(3, gt=0, description="HTTP attempts per S3 call (botocore standard retries).")
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="S3 addressing; path for MinIO and other endpoints without bucket DNS names."
    )
    multipart_threshold_mib: int = Field(16, gt=4, description="Files at least this large upload in parts.")
    multipart_chunk_mib: int = Field(16, ge=5, description="Part size (S3 minimum 5 MiB).")
    max_concurrency: int = Field(4, gt=0, description="Parallel part uploads/downloads per file.")
    step_attempts: int = Field(
        3,
        gt=0,
        description="Attempts of a whole publish step for what the SDK does not retry "
        "(409 conflicts, failed verification, an upload that gave up).",
    )
    step_retry_wait_seconds: float = Field(2.0, ge=0, description="First wait between step attempts (doubles).")
    verify_read_back: bool = Field(
        False,
        description="Also download each uploaded file and compare its sha256, for stores that do not "
        "validate checksums themselves (real S3 does; moto and some S3-compatible servers do not).",
    )


class StorageConfig(StorageOptions):  # plus credentials: a config file, the environment or a Secret block
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None


class ExportConfig(Section):
    """Optional export stage: each format is verified against the adapter and published in the bundle."""

    formats: list[Literal["fused", "gguf", "peft"]] = Field(
        [], description="Export the trained bundle as: fused (mlx-lm), gguf (llama.cpp/Ollama), peft (HF PEFT)."
    )
    gguf_types: list[Literal["f16", "q8_0"]] = Field(["f16"], min_length=1, description="GGUF tensor types to write.")
    requantize: bool = Field(False, description="fused on a quantized base: quantize the merged layers back.")
    peft_base_model_id: str | None = Field(
        None, description="base_model_name_or_path for PEFT (default: model.path); a Hugging Face id."
    )


SECTIONS = ("dataset", "template", "model", "lora", "training", "evaluation", "storage", "export")
# The sections that define the model; evaluation and storage only say how a run is judged and where it goes.
MODEL_SECTIONS = ("dataset", "template", "model", "lora", "training")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FINETUNE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    work_dir: Path = Field(Path(".finetune"), description="Run directories, caches and built models.")
    dataset: DatasetConfig = DatasetConfig()
    template: TemplateConfig = TemplateConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    storage: StorageConfig = StorageConfig()
    export: ExportConfig = ExportConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = _YAML_FILE.get("path")
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if yaml_file is not None:
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file),)
        return sources

    def public_dict(self) -> dict[str, Any]:
        """The configuration without secrets, for manifests, logs and fingerprints."""
        return self.model_dump(mode="json", exclude={"storage": set(SECRET_FIELDS)})

    def model_definition(self) -> dict[str, Any]:
        """What defines the model: the model sections without their operational fields."""
        return {name: getattr(self, name).defining_fields() for name in MODEL_SECTIONS}

    def fingerprint(self) -> str:
        """The one configuration fingerprint, for resuming checkpoints and for "nothing changed" (sha256)."""
        return hashlib.sha256(json.dumps(self.model_definition(), sort_keys=True).encode()).hexdigest()


# pydantic-settings builds sources from the class; the YAML path is per call.
_YAML_FILE: dict[str, Path | None] = {}


def load_settings(
    config_file: Path | str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Settings:
    """Build Settings from defaults, a YAML file, the environment and overrides."""
    path = Path(config_file) if config_file is not None else None
    if path is not None:
        check_yaml_file(path)
    init = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    _YAML_FILE["path"] = path
    try:
        return Settings(**init)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, path)) from None
    finally:
        _YAML_FILE.pop("path", None)
