"""The one training loop, `koala.train.run`, on tiny embedded workloads."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

from koala import optimizers, train, workloads
from koala.workloads import workload_class

TINY = workload_class("digits-mlp").Config.tiny()


def history(result: train.TrialResult) -> list[tuple[float, dict[str, float]]]:
    return [(e.train_loss, e.metrics) for e in result.epochs]


@pytest.mark.parametrize("optimizer", ["koala-m", "adam"])
def test_same_seed_same_metrics(optimizer: str) -> None:
    first = train.run("digits-mlp", optimizer, seed=3, epochs=2, workload_config=TINY, device="cpu")
    second = train.run("digits-mlp", optimizer, seed=3, epochs=2, workload_config=TINY, device="cpu")
    other = train.run("digits-mlp", optimizer, seed=4, epochs=2, workload_config=TINY, device="cpu")
    assert history(first) == history(second)
    assert history(first) != history(other)
    assert first.device == "cpu"
    assert not first.diverged


class SimulatedCrashError(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["koala-m", "koala-v", "momentum", "schedule-free-adamw"])
def test_resume_continues_exactly(optimizer: str, tmp_path: Path) -> None:
    config = {**workload_class("digits-cnn").Config.tiny(), "batch_size": 32}
    uninterrupted = train.run("digits-cnn", optimizer, seed=1, epochs=4, workload_config=config)

    def stop_after_two(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 2:
            raise SimulatedCrashError  # the process dies after the epoch-2 checkpoint was written

    with pytest.raises(SimulatedCrashError):
        train.run("digits-cnn", optimizer, seed=1, epochs=4, workload_config=config, checkpoint_dir=tmp_path,
                  report=stop_after_two)  # fmt: skip
    reported: list[int] = []
    resumed = train.run(
        "digits-cnn",
        optimizer,
        seed=1,
        epochs=4,
        workload_config=config,
        checkpoint_dir=tmp_path,
        report=lambda epoch, metrics: reported.append(epoch),
    )
    assert reported == [3, 4]
    assert history(resumed) == history(uninterrupted)


def test_divergence_is_reported_not_raised() -> None:
    result = train.run("digits-mlp", "sgd", {"lr": 1e4}, epochs=3, workload_config=TINY)
    assert result.diverged
    assert result.diverged_at == 1
    assert result.epochs == []


def test_report_receives_every_epoch() -> None:
    seen: list[tuple[int, dict[str, float]]] = []
    result = train.run("noisy-quadratic", "koala-v", epochs=3, workload_config={"dimension": 20},
                       report=lambda epoch, metrics: seen.append((epoch, metrics)))  # fmt: skip
    assert [epoch for epoch, _ in seen] == [1, 2, 3]
    for (_, metrics), epoch in zip(seen, result.epochs, strict=True):
        assert metrics["train_loss"] == epoch.train_loss
        assert metrics["val_excess_risk"] == epoch.metrics["val_excess_risk"]
        assert metrics["epoch_seconds"] > 0
    risks = [e.metrics["val_excess_risk"] for e in result.epochs]
    assert risks[-1] < risks[0]


@pytest.mark.parametrize("optimizer", optimizers.names())
def test_every_registered_optimizer_trains_through_the_same_loop(optimizer: str) -> None:
    result = train.run("digits-mlp", optimizer, epochs=2, workload_config=TINY)
    assert not result.diverged
    assert len(result.epochs) == 2
    assert 0.0 <= result.final("val_accuracy") <= 1.0


def test_loop_has_no_optimizer_specific_branch() -> None:
    source = inspect.getsource(train)
    for name in optimizers.names():
        assert f'"{name}"' not in source
    assert "Koala" not in source
    assert "isinstance(opt" not in source


def test_evaluation_goes_through_the_train_eval_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class Tracked(torch.optim.SGD):
        def train(self) -> None:
            calls.append("train")

        def eval(self) -> None:
            calls.append("eval")

    spec = optimizers.OptimizerSpec("tracked-sgd", lambda params, lr=0.1: Tracked(params, lr=lr), "spy")
    monkeypatch.setitem(optimizers._REGISTRY, "tracked-sgd", spec)
    train.run("digits-mlp", "tracked-sgd", epochs=2, workload_config=TINY)
    assert calls == ["train", "eval", "train"] * 2


def test_data_is_prepared_before_the_first_epoch_is_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop loads the workload's data before its clock starts: reading a dataset is not training time."""
    events: list[str] = []
    workload = workloads.get("digits-mlp", **TINY)
    prepare, batches = workload.prepare, workload.train_batches

    def spy_prepare() -> None:
        events.append("prepare")
        prepare()

    def spy_batches(epoch: int, generator: torch.Generator) -> Any:
        events.append(f"epoch {epoch}")
        return batches(epoch, generator)

    monkeypatch.setattr(workload, "prepare", spy_prepare)
    monkeypatch.setattr(workload, "train_batches", spy_batches)
    monkeypatch.setattr(train.time, "perf_counter", lambda: events.append("clock") or 0.0)
    train.run(workload, "sgd", {"lr": 0.1}, epochs=1)
    assert events[:3] == ["prepare", "clock", "epoch 0"]
    assert "_data" in vars(workload)  # the digits arrays were loaded by prepare()


def test_koala_m_metrics_are_taken_at_posterior_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """KOALA-M evaluates at x_k, not at the predicted x_k + p_k that training uses."""
    from koala import KoalaM

    modes: list[bool] = []
    original = KoalaM._switch

    def spy(self: KoalaM, *, train: bool) -> None:
        original(self, train=train)
        modes.append(self.param_groups[0]["train_mode"])

    monkeypatch.setattr(KoalaM, "_switch", spy)
    train.run("digits-mlp", "koala-m", epochs=1, workload_config=TINY)
    assert modes == [True, False, True]


def test_amp_bfloat16_runs() -> None:
    result = train.run(
        "digits-cnn", "koala-m", epochs=1, amp=True, workload_config=workload_class("digits-cnn").Config.tiny()
    )
    assert not result.diverged
    assert result.final("val_accuracy") is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, r"epochs: must be >= 1, got 0"),
        ({"optimizer": "lamb"}, r"unknown optimizer 'lamb'"),
        ({"hyperparams": {"lr": 0.1, "betas": 1}}, r"unknown hyperparameter\(s\) betas for optimizer 'adam'"),
        ({"workload_config": {"size": 3}}, r"unknown config key\(s\) size"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"optimizer": "adam", "epochs": 1, **kwargs}
    optimizer = arguments.pop("optimizer")
    with pytest.raises(ValueError, match=message):
        train.run("digits-mlp", optimizer, **arguments)
