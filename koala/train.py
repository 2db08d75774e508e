"""The one training loop: every trial of every comparison, for every optimizer, runs through `run()`.

There is no optimizer-specific branch. The per-sample losses reach the optimizer through the closure protocol that
every `torch.optim.Optimizer` supports: `opt.step(lambda: losses)`. Plain optimizers call the closure and ignore its
value; KOALA reads its measurement from it. Optimizers that evaluate at other weights than they train at (KOALA-M,
Schedule-Free) expose `train()`/`eval()`, which the loop calls around evaluation when they exist.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from koala import optimizers, workloads
from koala.workloads import Workload

Report = Callable[[int, dict[str, float]], None]
CHECKPOINT_FILE = "checkpoint.pt"


@dataclasses.dataclass
class EpochResult:
    """One finished epoch (epochs count from 1)."""

    epoch: int
    train_loss: float
    metrics: dict[str, float]
    seconds: float  # training time of the epoch
    eval_seconds: float


@dataclasses.dataclass
class TrialResult:
    """What `run` returns: the per-epoch history and whether (and when) the trial diverged."""

    workload: str
    optimizer: str
    hyperparams: dict[str, Any]
    seed: int
    device: str
    epochs: list[EpochResult]
    diverged: bool = False
    diverged_at: int | None = None  # the epoch in which the loss or the metric became NaN/inf

    def final(self, metric: str) -> float | None:
        """The metric after the last finished epoch, None if no epoch finished."""
        return self.epochs[-1].metrics.get(metric) if self.epochs else None


def default_device() -> torch.device:
    """CUDA when torch sees a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(
    workload: str | Workload,
    optimizer: str,
    hyperparams: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    epochs: int = 10,
    workload_config: Mapping[str, Any] | None = None,
    report: Report | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> TrialResult:
    """Train `workload` with `optimizer` for `epochs` epochs and return the per-epoch metrics.

    Args:
        workload: a registry name (configured by `workload_config`) or a built `Workload`.
        optimizer: a `koala.optimizers` name; `hyperparams` go to its factory (library defaults otherwise).
        seed: seeds model initialisation, data order and augmentation; the same seed gives the same metrics on CPU.
        report: called after every epoch as `report(epoch, metrics)`; metrics hold `train_loss`, the workload's
            validation metrics and `epoch_seconds`.
        checkpoint_dir: where to save model, optimizer, RNG and history after every epoch; if it already holds a
            checkpoint the run resumes from it and continues exactly as an uninterrupted run would.
        device: defaults to CUDA when available, else the CPU.
        amp: bfloat16 autocast for the forward pass (no loss scaling needed with bfloat16).

    Returns:
        A `TrialResult`. A NaN/inf training loss or metric stops the trial, marked diverged at that epoch; the
        exception-free return is part of the contract (a diverging baseline must not crash a comparison).

    Raises:
        ValueError: unknown workload, optimizer, hyperparameter or config key, or epochs < 1.
    """
    if epochs < 1:
        raise ValueError(f"epochs: must be >= 1, got {epochs}")
    if isinstance(workload, str):
        workload = workloads.get(workload, **(workload_config or {}))
    workload.prepare()  # data loading is not training time; a missing dataset fails here
    hyperparams = dict(hyperparams or {})
    device = torch.device(device) if device is not None else default_device()

    seed_everything(seed)
    model = workload.build_model().to(device)
    opt = optimizers.create(optimizer, model.parameters(), **hyperparams)
    result = TrialResult(workload.name, optimizer, hyperparams, seed, str(device), epochs=[])
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if checkpoint is not None and checkpoint.exists():
        _restore(checkpoint, model, opt, result, device)
        if result.diverged:
            return result

    for epoch in range(len(result.epochs), epochs):
        started = time.perf_counter()
        train_loss = _train_epoch(workload, model, opt, epoch, seed, device, amp)
        seconds = time.perf_counter() - started
        if not math.isfinite(train_loss):
            result.diverged, result.diverged_at = True, epoch + 1
            break
        started = time.perf_counter()
        metrics = _evaluate(workload, model, opt)
        eval_seconds = time.perf_counter() - started
        result.epochs.append(EpochResult(epoch + 1, train_loss, metrics, seconds, eval_seconds))
        if not all(math.isfinite(v) for v in metrics.values()):
            result.diverged, result.diverged_at = True, epoch + 1
        if checkpoint is not None:
            _save(checkpoint, model, opt, result)
        if report is not None:
            report(epoch + 1, {"train_loss": train_loss, **metrics, "epoch_seconds": seconds})
        if result.diverged:
            break
    return result


def _train_epoch(
    workload: Workload,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    epoch: int,
    seed: int,
    device: torch.device,
    amp: bool,
) -> float:
    """One epoch; returns the mean per-sample training loss, or NaN as soon as a minibatch loss is not finite."""
    model.train()
    _switch(opt, "train")
    # Data order and augmentation depend only on (seed, epoch): a resumed run sees exactly the same batches.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for batch in workload.train_batches(epoch, generator):
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = workload.losses(model, batch).float()
        mean = losses.mean()
        if not torch.isfinite(mean):
            return math.nan
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(mean)
        measured = losses.detach()
        opt.step(lambda measured=measured: measured)  # type: ignore[misc]
        total += measured.sum(dtype=torch.float64)
        count += measured.numel()
    return float(total) / max(count, 1)


@torch.no_grad()
def _evaluate(workload: Workload, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
    model.eval()
    _switch(opt, "eval")
    try:
        return {k: float(v) for k, v in workload.evaluate(model).items()}
    finally:
        _switch(opt, "train")
        model.train()


def _switch(opt: torch.optim.Optimizer, mode: str) -> None:
    """Call the optimizer's `train()`/`eval()` if it has them (KOALA-M, Schedule-Free): the generic hook."""
    method = getattr(opt, mode, None)
    if callable(method):
        method()


def _save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, result: TrialResult) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epochs": [dataclasses.asdict(e) for e in result.epochs],
        "diverged": result.diverged,
        "diverged_at": result.diverged_at,
        "rng": _rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # atomic: a crash leaves the previous checkpoint intact


def _restore(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, result: TrialResult, device: torch.device
) -> None:
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    result.epochs = [EpochResult(**e) for e in state["epochs"]]
    result.diverged, result.diverged_at = state["diverged"], state["diverged_at"]
    _set_rng_state(state["rng"])


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(_as_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_as_byte_tensor(s) for s in state["cuda"]])


def _as_byte_tensor(state: Tensor) -> Tensor:
    return state.to("cpu", torch.uint8)
