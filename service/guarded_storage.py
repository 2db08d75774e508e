"""The Optuna storage a job's driver writes through: retried through a busy database, and fenced.

Optuna writes a trial in many small calls; a driver that loses its job between two of them must not write the rest,
and a database that is briefly busy (a locked SQLite file, a restarting PostgreSQL) must not fail the job.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from typing import Any, TypeVar

import optuna
from optuna._typing import JSONSerializable
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

from service.retry import DEFAULT_BUDGET_SECONDS, retry

T = TypeVar("T")


class GuardedStorage(optuna.storages.BaseStorage):
    """The Optuna storage a Recorder writes through: every call is retried through a busy database (a locked SQLite
    file, a restarting PostgreSQL) for at most `retry_seconds`, and every write is preceded by `fence()`, the
    driver's check that the job is still its own (it raises, or ends the driver, once another driver took over)."""

    def __init__(
        self,
        inner: optuna.storages.BaseStorage,
        fence: Callable[[], None] | None = None,
        retry_seconds: float = DEFAULT_BUDGET_SECONDS,
    ) -> None:
        self.inner = inner
        self.fence = fence
        self.retry_seconds = retry_seconds

    def __getattr__(self, name: str) -> Any:  # anything beyond BaseStorage (e.g. an RDBStorage's engine)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _read(self, what: str, call: Callable[[], T]) -> T:
        return retry(call, what=f"reading {what}", budget=self.retry_seconds)

    def _write(self, what: str, call: Callable[[], T]) -> T:
        def attempt() -> T:
            if self.fence is not None:
                self.fence()
            return call()

        return retry(attempt, what=f"recording {what}", budget=self.retry_seconds)

    # ---- writes --------------------------------------------------------------------------------------------------

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self._write("a study", lambda: self.inner.create_new_study(directions, study_name))

    def delete_study(self, study_id: int) -> None:
        self._write("a study deletion", lambda: self.inner.delete_study(study_id))

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._write("a study attribute", lambda: self.inner.set_study_user_attr(study_id, key, value))

    def set_study_system_attr(self, study_id: int, key: str, value: JSONSerializable) -> None:
        self._write("a study attribute", lambda: self.inner.set_study_system_attr(study_id, key, value))

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._write("a new trial", lambda: self.inner.create_new_trial(study_id, template_trial))

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        self._write(
            "a trial parameter",
            lambda: self.inner.set_trial_param(trial_id, param_name, param_value_internal, distribution),
        )

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        attempts = 0

        def call() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return self.inner.set_trial_state_values(trial_id, state, values)
            except UpdateFinishedTrialError:
                # A retry after a commit whose acknowledgement was lost: the trial already has this state.
                if attempts > 1 and self.inner.get_trial(trial_id).state == state:
                    return True
                raise

        return self._write("a trial state", call)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._write(
            "an epoch's metric", lambda: self.inner.set_trial_intermediate_value(trial_id, step, intermediate_value)
        )

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write(f"trial attribute {key}", lambda: self.inner.set_trial_user_attr(trial_id, key, value))

    def set_trial_system_attr(self, trial_id: int, key: str, value: JSONSerializable) -> None:
        self._write(f"trial attribute {key}", lambda: self.inner.set_trial_system_attr(trial_id, key, value))

    # ---- reads ---------------------------------------------------------------------------------------------------

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._read("a study", lambda: self.inner.get_study_id_from_name(study_name))

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._read("a study", lambda: self.inner.get_study_name_from_id(study_id))

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._read("a study", lambda: self.inner.get_study_directions(study_id))

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._read("a study", lambda: self.inner.get_study_user_attrs(study_id))

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._read("a study", lambda: self.inner.get_study_system_attrs(study_id))

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._read("the studies", self.inner.get_all_studies)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._read("a trial", lambda: self.inner.get_trial_id_from_study_id_trial_number(study_id, trial_number))

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._read("a trial", lambda: self.inner.get_trial_number_from_id(trial_id))

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        return self._read("a trial", lambda: self.inner.get_trial_param(trial_id, param_name))

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._read("a trial", lambda: self.inner.get_trial(trial_id))

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._read("the trials", lambda: self.inner.get_all_trials(study_id, deepcopy, states))

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._read("the trials", lambda: self.inner.get_n_trials(study_id, state))

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._read("the best trial", lambda: self.inner.get_best_trial(study_id))

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self._read("a trial", lambda: self.inner.get_trial_params(trial_id))

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._read("a trial", lambda: self.inner.get_trial_user_attrs(trial_id))

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._read("a trial", lambda: self.inner.get_trial_system_attrs(trial_id))

    def remove_session(self) -> None:
        self.inner.remove_session()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self.inner.check_trial_is_updatable(trial_id, trial_state)
