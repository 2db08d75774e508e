"""JobSpec: what a user asks the service to compare (docs/architecture.md "JobSpec"), with validation that names fields.

name: digits, KOALA vs tuned baselines
workload: digits-mlp
epochs: 10
seeds: 3                       # n (seeds 0..n-1) or an explicit list
optimizers:
  - name: koala-m              # fixed: library defaults, every seed
  - name: adam                 # tuned: TPE over `search` for `trials` trials, then the best re-run on every seed
    search: {lr: {low: 1.0e-4, high: 1.0e-1, log: true}}
    trials: 8
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from koala import optimizers, workloads
from service.limits import (
    DEFAULT_LIMITS,
    MAX_KEYS,
    MAX_NAME,
    MAX_OPTIMIZERS,
    MAX_SECONDS,
    MAX_SEED,
    Finite,
    Limits,
)
from service.search_space import Choice, FloatRange, SearchDimension

TRUSTED = "trusted"  # validation context key: the spec comes from the user's own machine (`koala run`)
UPLOAD_DIGEST = r"^sha256:[0-9a-f]{64}$"
# "package.module:Class", as a workload inside an upload is named (checked for its form only: never imported here)
MODULE_CLASS = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)


class OptimizerEntry(BaseModel):
    """One optimizer of the comparison: fixed (params, or the library defaults) or tuned (search + trials)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(max_length=MAX_NAME)]
    params: dict[str, Any] = Field(default_factory=dict, max_length=MAX_KEYS)
    search: dict[str, SearchDimension] | None = Field(default=None, max_length=MAX_KEYS)
    trials: Annotated[int, Field(ge=1, le=100_000)] | None = None

    @property
    def tuned(self) -> bool:
        return self.search is not None

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in optimizers.names():
            raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(optimizers.names())}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> OptimizerEntry:
        valid = optimizers.get(self.name).hyperparameters()
        for key in [*self.params, *(self.search or {})]:
            if key not in valid:
                raise ValueError(
                    f"unknown hyperparameter {key!r} for optimizer {self.name!r}; valid: {', '.join(sorted(valid))}"
                )
        for key, value in self.params.items():
            _check_hyperparameter(self.name, key, value)
        for key, dimension in (self.search or {}).items():
            for value in _search_examples(dimension):
                _check_hyperparameter(self.name, key, value)
        if self.search is not None:
            if not self.search:
                raise ValueError("search must name at least one hyperparameter")
            if self.trials is None:
                raise ValueError("a tuned optimizer (with search) needs trials")
            overlap = sorted(set(self.search) & set(self.params))
            if overlap:
                raise ValueError(f"hyperparameter(s) {', '.join(overlap)} both fixed in params and searched")
        elif self.trials is not None:
            raise ValueError("trials is only meaningful with search")
        return self


class Resources(BaseModel):
    """Per-trial resources; gpu may be fractional (several trials share a GPU)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: Annotated[float, Field(gt=0, le=1024, description="CPUs per trial (at least the operator's min_cpu)")] = 1
    gpu: Annotated[float, Field(ge=0, le=64, description="GPUs per trial; fractions share a GPU")] = 0


class JobSpec(BaseModel):
    """A comparison job. Build with `JobSpec.parse(mapping)` or `load_jobspec(path)` to get field-named errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="", max_length=MAX_NAME)
    upload: str | None = Field(
        default=None,
        pattern=UPLOAD_DIGEST,
        description="The digest (`sha256:...`) of a workload pack stored with POST /v1/uploads: its code runs on the "
        "Ray nodes with the job, and `workload` may then name `package.module:Class` inside it",
    )
    workload: str = Field(
        max_length=MAX_NAME,
        description="A registered workload name (GET /v1/workloads), or with `upload` a `package.module:Class` in it",
    )
    workload_config: dict[str, Any] = Field(default_factory=dict, max_length=MAX_KEYS)
    epochs: Annotated[int, Field(ge=1, le=100_000)] = 10
    seeds: (
        Annotated[int, Field(ge=1, le=10_000)]
        | Annotated[list[Annotated[int, Field(ge=0, le=MAX_SEED)]], Field(max_length=10_000)]
    ) = 3
    metric: str | None = Field(default=None, max_length=MAX_NAME)
    target: Finite | None = None
    scheduler: Literal["none", "asha"] = "none"
    max_concurrent_trials: Annotated[int, Field(ge=1, le=10_000)] = 2
    resources: Resources = Field(default_factory=Resources)
    trial_time_limit_s: Annotated[float, Field(gt=0, le=MAX_SECONDS)] | None = Field(
        default=None, description="Wall-clock seconds a trial may run (at most the server's limit)"
    )
    job_time_limit_s: Annotated[float, Field(gt=0, le=MAX_SECONDS)] | None = Field(
        default=None, description="Wall-clock seconds the whole job may run (at most the server's limit)"
    )
    optimizers: list[OptimizerEntry] = Field(min_length=1, max_length=MAX_OPTIMIZERS)
    # An uploaded workload's default metric and the direction of each metric, once a check on the cluster has read
    # them (`with_checked_workload`): the process holding this spec never imports the uploaded code.
    _checked_workload: tuple[str, dict[str, str]] | None = PrivateAttr(default=None)

    @field_validator("workload")
    @classmethod
    def _known_workload(cls, name: str, info: ValidationInfo) -> str:
        # Only a spec from the user's own machine may name "module:Class" (which imports it); a spec sent to the
        # service names a registered workload, and an unknown name is refused without importing anything. With an
        # upload, "module:Class" names code inside it, which is checked where it runs (on the Ray nodes), never here.
        if info.data.get("upload") is not None and name not in workloads.registry():
            if not MODULE_CLASS.fullmatch(name):
                raise ValueError(
                    f"with an upload, workload is 'package.module:Class' (a Workload subclass in the upload) or a "
                    f"registered name; got {name!r}"
                )
            return name
        try:
            workloads.workload_class(name, allow_import=_trusted(info))  # raises ValueError listing the valid names
        except ValueError as error:
            if _trusted(info) or not MODULE_CLASS.fullmatch(name):
                raise
            raise ValueError(f"{error}; or send its code with the job (`koala submit --workload-dir DIR`)") from None
        return name

    @property
    def uploaded_workload(self) -> bool:
        """Whether the workload is code from the job's upload (known only where the upload is unpacked)."""
        return self.upload is not None and self.workload not in workloads.registry()

    def with_checked_workload(self, metric: str, modes: Mapping[str, str]) -> JobSpec:
        """This spec, knowing its uploaded workload's default `metric` and the direction of each metric (`modes`),
        as a check of the workload on the cluster reported them."""
        checked = self.model_copy()
        checked._checked_workload = (metric, dict(modes))
        return checked

    def _workload_metrics(self) -> tuple[str, dict[str, str]]:
        if self._checked_workload is not None:
            return self._checked_workload
        if self.uploaded_workload:
            raise ValueError(f"the uploaded workload {self.workload!r} is known only once checked on the cluster")
        cls = workloads.workload_class(self.workload)
        return cls.metric, dict(cls.metric_modes())

    @field_validator("workload_config")
    @classmethod
    def _plain_config(cls, config: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        for key, value in config.items():
            if not (isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value))):
                raise ValueError(f"{key}: must be a number, a boolean or a string, got {type(value).__name__}")
            if isinstance(value, str) and len(value) > MAX_NAME:
                raise ValueError(f"{key}: at most {MAX_NAME} characters")
        return config

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: int | list[int]) -> int | list[int]:
        if isinstance(seeds, list):
            if not seeds:
                raise ValueError("seeds must not be empty")
            if len(set(seeds)) != len(seeds):
                raise ValueError("seeds must be distinct")
        return seeds

    def cross_check(self, *, trusted: bool = False) -> list[tuple[str, str]]:
        """Checks that involve several fields, as (field, message) pairs (empty when the spec is consistent).

        Unless `trusted`, the workload config may not name a path: a server reads datasets from its own data
        directory, never from where a client points it. An uploaded workload's config and metric are checked where
        its code runs (the job's first step on the cluster), not here."""
        problems = []
        if trusted and self.upload is not None:
            message = "names a pack stored on a server; to run here, put the workload's package on PYTHONPATH instead"
            problems.append(("upload", message))
        if self.uploaded_workload:
            problems += self._plain_checks()
            return problems
        if not trusted:
            cls = workloads.workload_class(self.workload, allow_import=False)
            for key in sorted(set(cls.Config.path_fields()) & set(self.workload_config)):
                message = (
                    "a job sent to the service may not name a path (datasets are read from KOALA_DATA_DIR/datasets)"
                )
                problems.append((f"workload_config.{key}", message))
        cls = workloads.workload_class(self.workload)
        try:
            cls.Config.from_mapping(self.workload, self.workload_config)  # unknown keys, types, ranges
        except ValueError as error:
            problems.append(("workload_config", str(error)))
        known = cls.metric_modes()
        if self.metric is not None and self.metric not in known:
            problems.append(
                ("metric", f"{self.metric!r} is not reported by {self.workload}; valid: {', '.join(known)}")
            )
        return problems + self._plain_checks()

    def _plain_checks(self) -> list[tuple[str, str]]:
        """The cross-field checks that do not involve the workload."""
        problems = []
        names = [entry.name for entry in self.optimizers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(("optimizers", f"duplicate entries for {', '.join(duplicates)}"))
        if self.scheduler == "asha" and not any(entry.tuned for entry in self.optimizers):
            problems.append(("scheduler", "asha early-stops tuning trials, but no optimizer is tuned"))
        return problems

    # ---- derived values --------------------------------------------------------------------------------------------

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def metric_name(self) -> str:
        return self.metric or self._workload_metrics()[0]

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        """The metric's direction, as the workload declares it."""
        mode = self._workload_metrics()[1][self.metric_name]
        return "maximize" if mode == "max" else "minimize"

    def trials_of(self, entry: OptimizerEntry) -> int:
        """The trials planned for one optimizer: its tuning trials (if tuned), then one evaluation per seed."""
        return (entry.trials or 0) + len(self.seed_list)

    def planned_trials(self) -> int:
        """Every trial of the job."""
        return sum(self.trials_of(entry) for entry in self.optimizers)

    def check_limits(self, limits: Limits = DEFAULT_LIMITS) -> list[tuple[str, str]]:
        """The limits the job exceeds, as (field, message) pairs."""
        problems = []
        if self.epochs > limits.max_epochs:
            problems.append(("epochs", f"at most {limits.max_epochs}, got {self.epochs}"))
        if len(self.seed_list) > limits.max_seeds:
            problems.append(("seeds", f"at most {limits.max_seeds} seeds, got {len(self.seed_list)}"))
        for i, entry in enumerate(self.optimizers):
            if entry.trials is not None and entry.trials > limits.max_trials:
                problems.append((f"optimizers.{i}.trials", f"at most {limits.max_trials}, got {entry.trials}"))
        if self.planned_trials() > limits.max_total_trials:
            problems.append(
                ("optimizers", f"{self.planned_trials()} trials planned, at most {limits.max_total_trials}")
            )
        if self.max_concurrent_trials > limits.max_concurrent_trials:
            problems.append(
                ("max_concurrent_trials", f"at most {limits.max_concurrent_trials}, got {self.max_concurrent_trials}")
            )
        if self.resources.cpu < limits.min_cpu:
            problems.append(("resources.cpu", f"at least {limits.min_cpu:g}, got {self.resources.cpu:g}"))
        if self.resources.cpu > limits.max_cpu:
            problems.append(("resources.cpu", f"at most {limits.max_cpu}, got {self.resources.cpu}"))
        if self.resources.gpu > limits.max_gpu:
            problems.append(("resources.gpu", f"at most {limits.max_gpu}, got {self.resources.gpu}"))
        return problems

    @classmethod
    def parse(cls, data: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS, *, trusted: bool = False) -> JobSpec:
        """Validate `data`; raise SpecError whose errors name each offending field.

        `trusted`: the spec comes from the user's own machine (`koala run`), so it may name a workload as
        "module:Class" (imported here) and a data_dir path. Specs a server receives are never trusted."""
        try:
            spec = cls.model_validate(data, context={TRUSTED: trusted})
        except ValidationError as error:
            raise SpecError.from_validation(error) from None
        problems = spec.cross_check(trusted=trusted) + spec.check_limits(limits)
        if problems:
            raise SpecError([{"field": field, "message": message} for field, message in problems])
        return spec


class SpecError(ValueError):
    """Invalid JobSpec. `errors` is a list of {"field": dotted path, "message": what is allowed}."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field'] or '(spec)'}: {e['message']}" for e in errors))

    @classmethod
    def from_validation(cls, error: ValidationError) -> SpecError:
        errors = []
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            errors.append({"field": cls.from_loc(item["loc"]), "message": message})
        return cls(errors)

    @staticmethod
    def from_loc(loc: Sequence[Any]) -> str:
        """The dotted field path of a pydantic error location, without pydantic's union-member tags."""
        return ".".join(str(part) for part in loc if not _is_union_tag(part))


def _is_union_tag(part: Any) -> bool:
    # pydantic inserts the tried member of a union into the location ("FloatRange", "int", "list[...]").
    return isinstance(part, str) and (part[:1].isupper() or part in {"int", "str", "float", "bool"} or "[" in part)


def _trusted(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(TRUSTED))


@functools.cache
def _type_checker(optimizer: str, key: str) -> TypeAdapter[Any]:
    annotation = optimizers.get(optimizer).annotations()[key]
    return TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True, allow_inf_nan=False))


def _check_hyperparameter(optimizer: str, key: str, value: Any) -> None:
    """Refuse a value the optimizer's signature does not declare (as JSON: a list stands for a tuple)."""
    checker = _type_checker(optimizer, key)
    try:
        checker.validate_json(json.dumps(value, allow_nan=True), strict=True)
    except (ValidationError, ValueError):
        expected = _type_name(optimizers.get(optimizer).annotations()[key])
        raise ValueError(f"hyperparameter {key!r} of {optimizer!r} must be {expected}, got {value!r}") from None


def _search_examples(dimension: FloatRange | Choice) -> list[Any]:
    if isinstance(dimension, Choice):
        return list(dimension.choices)
    if dimension.int:
        return [int(dimension.low), int(dimension.high)]
    return [dimension.low, dimension.high]


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def type_name(optimizer: str, key: str) -> str:
    """The declared type of a hyperparameter, as the catalogue shows it (e.g. "float | None")."""
    return _type_name(optimizers.get(optimizer).annotations()[key])


def load_jobspec(path: str | Path, limits: Limits = DEFAULT_LIMITS, *, trusted: bool = True) -> JobSpec:
    """Read a JobSpec from a YAML or JSON file (trusted by default: it is the user's own file, run locally)."""
    text = Path(path).read_text()
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise SpecError([{"field": "", "message": f"{path} is not valid YAML/JSON: {error}"}]) from None
    if not isinstance(data, Mapping):
        raise SpecError([{"field": "", "message": f"{path} must hold a mapping, got {type(data).__name__}"}])
    return JobSpec.parse(data, limits, trusted=trusted)
