"""A sweep: one base configuration, a search space over its dotted fields, and the trials it expands to.

The expansion is a pure function of the file: grid points in the order written, random
draws from an RNG seeded by ``(sweep.seed, trial index)``. The same file therefore gives
the same trials, with the same run ids, on every machine and every re-run, which is what
makes a re-run resume its trials instead of starting new ones.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from finetune.config import SECTIONS, ConfigError, Settings, describe_validation_error, load_settings

# Trials must share one store (the sweep reads every trial's bundle from it) and one work directory layout.
UNSWEEPABLE = ("storage", "work_dir")
SIGNIFICANT_DIGITS = 4
SWEEP_KEY = "sweep"
# What the tokenized dataset depends on.
DATA_SECTIONS = ("dataset", "template", "model")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Uniform(_Spec):
    distribution: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        return self

    def draw(self, rng: random.Random) -> float:
        return _round(rng.uniform(self.low, self.high))


class LogUniform(Uniform):
    """Uniform in log space: as many draws between 1e-5 and 1e-4 as between 1e-4 and 1e-3 (learning rates)."""

    distribution: Literal["log_uniform"]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _positive(self) -> LogUniform:
        if self.low <= 0:
            raise ValueError(f"log_uniform needs low > 0 (got {self.low:g})")
        return self

    def draw(self, rng: random.Random) -> float:
        return _round(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))


class IntUniform(_Spec):
    distribution: Literal["int_uniform"]
    low: int
    high: int = Field(description="Inclusive.")

    @model_validator(mode="after")
    def _ordered(self) -> IntUniform:
        if not self.low <= self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


class Choice(_Spec):
    distribution: Literal["choice"]
    values: list[Any] = Field(min_length=1)

    def draw(self, rng: random.Random) -> Any:
        return rng.choice(self.values)


Distribution = Annotated[Uniform | LogUniform | IntUniform | Choice, Field(discriminator="distribution")]


class SweepSpec(_Spec):
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Sweep id (run ids derive from it); default: derived from the base config and the space.",
    )
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted field -> values, every combination.")
    random: dict[str, Distribution] = Field(default_factory=dict, description="Dotted field -> distribution.")
    max_trials: int | None = Field(
        None, gt=0, description="Number of trials when random draws are given; a cap otherwise."
    )
    seed: int = 0
    publish_all: bool = Field(
        False, description="Also publish the losing trials' bundles (never as champion candidates)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        for field, values in self.grid.items():
            if not values:
                raise ValueError(f"grid field {field!r} has no values")
        both = sorted(set(self.grid) & set(self.random))
        if both:
            raise ValueError(f"{both[0]!r} is in both grid and random")
        if not self.grid and not self.random:
            raise ValueError("the search space is empty: give sweep.grid and/or sweep.random")
        if self.random and self.max_trials is None:
            raise ValueError("random draws need max_trials (how many trials to draw)")
        return self


@dataclass(frozen=True)
class Trial:
    index: int
    run_id: str
    params: dict[str, Any]  # dotted field -> value, in the order of the space

    def label(self) -> str:
        return ", ".join(f"{k}={_show(v)}" for k, v in self.params.items())


@dataclass
class Sweep:
    sweep_id: str
    spec: SweepSpec
    base: dict[str, Any]  # the base sections as written (overrides for load_settings)
    trials: list[Trial]

    def settings(self, trial: Trial) -> Settings:
        return load_settings(overrides=trial_overrides(self.base, trial.params))

    def swept_fields(self) -> list[str]:
        return [*self.spec.grid, *self.spec.random]

    def data_groups(self) -> list[list[Trial]]:
        """Trials that read the same tokenized data: equal dataset, template and model sections."""
        groups: dict[str, list[Trial]] = {}
        for trial in self.trials:
            public = self.settings(trial).public_dict()
            key = json.dumps({name: public[name] for name in DATA_SECTIONS}, sort_keys=True)
            groups.setdefault(key, []).append(trial)
        return list(groups.values())


def _round(value: float) -> float:
    # A few significant digits: readable in the table, and identical on every platform's float formatting.
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else json.dumps(value) if not isinstance(value, str) else value


def _stable_hash(data: Any, length: int = 8) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:length]


def check_field(dotted: str, where: str) -> None:
    """``section.key`` must name a configuration field; the error names the field and lists the valid keys."""
    section, _, key = dotted.partition(".")
    if section in UNSWEEPABLE:
        raise ConfigError(f"{where} {dotted!r}: {section} cannot be swept (every trial shares it)")
    if section not in SECTIONS:
        raise ConfigError(
            f"{where} {dotted!r}: unknown config field (sections: {', '.join(s for s in SECTIONS if s not in UNSWEEPABLE)})"
        )
    fields = Settings.model_fields[section].annotation.model_fields  # type: ignore[union-attr]
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"did you mean {section}.{close[0]}?" if close else f"{section} has: {', '.join(fields)}"
        raise ConfigError(f"{where} {dotted!r}: unknown config field ({hint})")


def trial_overrides(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base sections with the trial's dotted values set (a deep copy; the base is not changed)."""
    merged = json.loads(json.dumps(base))
    for dotted, value in params.items():
        section, _, key = dotted.partition(".")
        merged.setdefault(section, {})[key] = value
    return merged


def sweep_id_for(base: dict[str, Any], spec: SweepSpec) -> str:
    if spec.name:
        return spec.name
    space = spec.model_dump(mode="json", include={"grid", "random", "max_trials", "seed"})
    return f"sweep-{_stable_hash({'base': base, 'space': space})}"


def trial_run_id(sweep_id: str, params: dict[str, Any]) -> str:
    """The trial's run id: the sweep id and a hash of its parameters (not of its position in the list)."""
    return f"{sweep_id}-{_stable_hash(params)}"


def expand(spec: SweepSpec, sweep_id: str) -> list[Trial]:
    """Grid points in the order written, each with its own random draws; duplicates collapse into one trial."""
    points = [dict(zip(spec.grid, values)) for values in itertools.product(*spec.grid.values())] or [{}]
    if not spec.random and spec.max_trials is not None and len(points) > spec.max_trials:
        raise ConfigError(f"sweep.grid has {len(points)} combinations, more than sweep.max_trials={spec.max_trials}")
    count = spec.max_trials if spec.random else len(points)
    trials: list[Trial] = []
    seen: set[str] = set()
    for index in range(count):  # type: ignore[arg-type]
        rng = random.Random(f"{spec.seed}:{index}")
        params = {**points[index % len(points)], **{f: dist.draw(rng) for f, dist in spec.random.items()}}
        run_id = trial_run_id(sweep_id, params)
        if run_id not in seen:
            seen.add(run_id)
            trials.append(Trial(len(trials), run_id, params))
    return trials


def _where(exc: ValidationError) -> str:
    return describe_validation_error(exc).replace("config key '", "config key 'sweep.")


def build_sweep(data: dict[str, Any], source: str = "sweep config") -> Sweep:
    """Validate a sweep mapping (base sections + ``sweep:``) and expand it; errors are one line naming the field."""
    if not isinstance(data, dict) or not isinstance(data.get(SWEEP_KEY), dict):
        raise ConfigError(f"{source}: no 'sweep:' section (grid, random, max_trials, seed)")
    base = {k: v for k, v in data.items() if k != SWEEP_KEY}
    try:
        spec = SweepSpec(**data[SWEEP_KEY])
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_where(exc)}") from None
    for dotted in spec.grid:
        check_field(dotted, f"{source}: sweep.grid")
    for dotted in spec.random:
        check_field(dotted, f"{source}: sweep.random")
    try:
        load_settings(overrides=base)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    sweep_id = sweep_id_for(base, spec)
    trials = expand(spec, sweep_id)
    for trial in trials:
        try:
            load_settings(overrides=trial_overrides(base, trial.params))
        except ConfigError as exc:
            raise ConfigError(f"{source}: trial {trial.index} ({trial.label()}): {exc}") from None
    return Sweep(sweep_id, spec, base, trials)


def sweep_mapping(path: Path | str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sweep YAML file as a mapping (the usual config sections plus ``sweep:``), with overrides merged in."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path}: not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"sweep file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path}: expected a mapping of sections at the top level")
    for section, values in (overrides or {}).items():
        data[section] = {**(data.get(section) or {}), **values} if isinstance(values, dict) else values
    return data


def load_sweep(path: Path | str, overrides: dict[str, Any] | None = None) -> Sweep:
    """Read and expand a sweep YAML file."""
    return build_sweep(sweep_mapping(path, overrides), f"sweep file {path}")
