"""JobSpec validation: every error names the offending field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from service.jobspec import JobSpec, SpecError, load_jobspec
from service.limits import Limits

VALID: dict[str, Any] = {
    "workload": "digits-mlp",
    "epochs": 2,
    "seeds": 2,
    "optimizers": [
        {"name": "koala-m"},
        {"name": "sgd", "params": {"lr": 0.1}},
        {"name": "adam", "search": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}, "trials": 3},
    ],
}


def with_changes(**changes: Any) -> dict[str, Any]:
    return {**VALID, **changes}


def test_valid_spec_and_derived_values() -> None:
    spec = JobSpec.parse(VALID)
    assert spec.seed_list == [0, 1]
    assert spec.metric_name == "val_accuracy"
    assert spec.direction == "maximize"
    assert spec.planned_trials() == 2 + 2 + (3 + 2)
    assert JobSpec.parse(with_changes(metric="val_loss")).direction == "minimize"
    assert JobSpec.parse(with_changes(seeds=[5, 7])).seed_list == [5, 7]


def test_example_spec_loads() -> None:
    spec = load_jobspec(Path(__file__).parent.parent / "examples" / "digits.yaml")
    assert [entry.name for entry in spec.optimizers] == ["koala-m", "koala-v", "sgd", "adam"]


INVALID: list[tuple[dict[str, Any], str, str]] = [
    (with_changes(workload="mnist"), "workload", "unknown workload 'mnist'"),
    (with_changes(epochs=0), "epochs", "greater than or equal to 1"),
    (with_changes(seeds=0), "seeds", "greater than or equal to 1"),
    (with_changes(seeds=[1, 1]), "seeds", "distinct"),
    (with_changes(seeds=[]), "seeds", "must not be empty"),
    (with_changes(optimizers=[]), "optimizers", "at least 1 item"),
    (with_changes(optimizers=[{"name": "lion"}]), "optimizers.0.name", "unknown optimizer 'lion'"),
    (with_changes(optimizers=[{"name": "sgd"}, {"name": "sgd"}]), "optimizers", "duplicate entries for sgd"),
    (
        with_changes(optimizers=[{"name": "sgd", "params": {"betas": 1}}]),
        "optimizers.0",
        "unknown hyperparameter 'betas'",
    ),
    (
        with_changes(optimizers=[{"name": "adam", "search": {"lr": {"low": 0.1, "high": 0.01}}, "trials": 2}]),
        "optimizers.0.search.lr",
        r"low \(0.1\) must be < high \(0.01\)",
    ),
    (
        with_changes(
            optimizers=[{"name": "adam", "search": {"lr": {"low": 0.0, "high": 1.0, "log": True}}, "trials": 2}]
        ),
        "optimizers.0.search.lr",
        "log scale needs low > 0",
    ),
    (
        with_changes(optimizers=[{"name": "adam", "search": {"lr": {"low": 1e-4, "high": 1e-1}}}]),
        "optimizers.0",
        "needs trials",
    ),
    (with_changes(optimizers=[{"name": "adam", "trials": 3}]), "optimizers.0", "only meaningful with search"),
    (
        with_changes(optimizers=[{"name": "adam", "search": {}, "trials": 1}]),
        "optimizers.0",
        "at least one hyperparameter",
    ),
    (with_changes(optimizers=[{"name": "sgd", "typo": 1}]), "optimizers.0.typo", "Extra inputs are not permitted"),
    (with_changes(scheduler="hyperband"), "scheduler", "'none' or 'asha'"),
    (with_changes(scheduler="asha", optimizers=[{"name": "sgd"}]), "scheduler", "no optimizer is tuned"),
    (with_changes(metric="val_f1"), "metric", "'val_f1' is not reported by digits-mlp"),
    (with_changes(workload_config={"hiden": 3}), "workload_config", r"unknown config key\(s\) hiden"),
    (with_changes(resources={"cpu": 0}), "resources.cpu", "greater than 0"),
    (with_changes(resources={"gpu": -1}), "resources.gpu", "greater than or equal to 0"),
    (with_changes(max_concurrent_trials=0), "max_concurrent_trials", "greater than or equal to 1"),
    (with_changes(colour="red"), "colour", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("data", "field", "message"), INVALID)
def test_invalid_specs_name_the_field(data: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        JobSpec.parse(data)
    errors = caught.value.errors
    assert any(e["field"] == field for e in errors), errors
    assert any(re.search(message, e["message"]) for e in errors), errors


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        (Limits(max_epochs=1), "epochs"),
        (Limits(max_seeds=1), "seeds"),
        (Limits(max_trials=2), "optimizers.2.trials"),
        (Limits(max_total_trials=5), "optimizers"),
        (Limits(max_cpu=0.5), "resources.cpu"),
    ],
)
def test_limits_name_the_field(limits: Limits, field: str) -> None:
    with pytest.raises(SpecError) as caught:
        JobSpec.parse(VALID, limits)
    assert [e["field"] for e in caught.value.errors] == [field]


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must hold a mapping"):
        load_jobspec(tmp_path / "list.yaml")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(SpecError, match="not valid YAML/JSON"):
        load_jobspec(tmp_path / "broken.json")
