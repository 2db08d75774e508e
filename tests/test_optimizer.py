"""The torch optimizer-test categories for KoalaV and KoalaM, plus KOALA's edge cases, through the public API."""

from __future__ import annotations

import copy
import io
import os
import pickle
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from koala import KoalaDiag, KoalaM, KoalaV
from koala import functional as F
from tests.optimizer_cases import (
    PATHS,
    SHARED_BASE,
    Factory,
    parametrize_opt,
    parametrize_shared,
    path_name,
    trained_weights,
)

DTYPES = [torch.float32, torch.float64]


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batch(k: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + k % 8)
    x = torch.randn(16, 5, generator=gen, dtype=dtype)
    teacher = torch.tensor([[1.0, -2.0, 0.5, 0.0, 1.0], [0.0, 1.0, -1.0, 2.0, 0.0], [-1.0, 0.0, 0.0, -1.0, 1.5]])
    return x, (x @ teacher.to(dtype).T).argmax(1)  # labels from a fixed linear teacher: learnable


def train_step(model: nn.Module, opt: torch.optim.Optimizer, k: int) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    x, y = batch(k, dtype)
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    opt.zero_grad()
    losses.mean().backward()
    opt.step(loss=losses)
    return losses.detach()


def run(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> list[float]:
    return [float(train_step(model, opt, k).mean()) for k in range(start, start + steps)]


def full_loss(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    dtype = next(model.parameters()).dtype
    opt.eval()  # type: ignore[attr-defined]
    with torch.no_grad():
        value = sum(float(nn.functional.cross_entropy(model(batch(k, dtype)[0]), batch(k, dtype)[1])) for k in range(8))
    opt.train()  # type: ignore[attr-defined]
    return value


@parametrize_opt
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("foreach", [False, True])
def test_loss_decreases(factory: Factory, dtype: torch.dtype, foreach: bool) -> None:
    model = make_model(dtype)
    opt = factory(model.parameters(), foreach=foreach)
    before = full_loss(model, opt)
    for _ in range(5):
        run(model, opt, 8)
    assert full_loss(model, opt) < 0.7 * before


@parametrize_opt
@pytest.mark.parametrize("dtype", DTYPES)
def test_foreach_matches_for_loop(factory: Factory, dtype: torch.dtype) -> None:
    """Params and state agree between the loop, the foreach kernels and the fused CPU kernels (parallel and serial
    sizes, several groups, a block with zero gradient on some steps)."""
    results = []
    for path, options in PATHS.items():
        torch.manual_seed(3)
        # 419,899 elements: the parallel CPU kernels, over 26 chunks, the last one ending in a partial lane group.
        big = nn.Parameter(torch.randn(701, 599, dtype=dtype) * 0.01)
        small = nn.Parameter(torch.randn(7, dtype=dtype))
        extra = nn.Parameter(torch.randn(3, 3, dtype=dtype))
        opt = factory([{"params": [big, small]}, {"params": [extra], "lr": 0.5, "weight_decay": 1e-3}], **options)
        gen = torch.Generator().manual_seed(5)
        data = torch.randn(32, 599, generator=gen, dtype=dtype)
        for k in range(12):
            losses = (data @ big.T).pow(2).mean(1) + (small.sum() - k) ** 2 + extra.pow(2).sum() * (k % 3 != 0)
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses.detach())
            assert path_name(opt) == path
        results.append(([p.detach().clone() for p in (big, small, extra)], copy.deepcopy(opt.state_dict()["state"])))
    (params_loop, state_loop), *others = results
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-13}
    for params_other, state_other in others:
        for a, b in zip(params_loop, params_other, strict=True):
            torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(state_loop, state_other, **tol)


@parametrize_opt
def test_param_groups_lr_and_weight_decay(factory: Factory) -> None:
    """A group with lr=0 does not move; per-group weight decay changes the trajectory of its group only."""
    model = make_model()
    first, second = model[0], model[2]
    opt = factory([{"params": first.parameters(), "lr": 0.0}, {"params": second.parameters()}])
    frozen = [p.detach().clone() for p in first.parameters()]
    run(model, opt, 5)
    assert all(torch.equal(p.detach(), q) for p, q in zip(first.parameters(), frozen, strict=True))
    assert not torch.equal(second.weight.detach(), make_model()[2].weight.detach())

    trajectories = []
    for decay in (0.0, 0.1):
        model = make_model()
        opt = factory([{"params": model[0].parameters()}, {"params": model[2].parameters(), "weight_decay": decay}])
        run(model, opt, 5)
        trajectories.append(model[2].weight.detach().clone())
    assert not torch.allclose(trajectories[0], trajectories[1])


@parametrize_opt
def test_lr_scheduler_scales_the_target(factory: Factory) -> None:
    model = make_model()
    opt = factory(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.2)
    for k in range(7):
        train_step(model, opt, k)
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.04)
    # lr = 0 targets the current loss: the weights stop moving (KOALA-V; KOALA-M still applies its velocity).
    for group in opt.param_groups:
        group["lr"] = 0.0
    if factory is KoalaV:
        before = [p.detach().clone() for p in model.parameters()]
        train_step(model, opt, 99)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@parametrize_opt
def test_no_grad_and_zero_grad_steps_are_no_ops(factory: Factory) -> None:
    model = make_model()
    opt = factory(model.parameters())
    run(model, opt, 3)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad(set_to_none=True)
    opt.step(loss=torch.ones(4))  # all gradients None
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step(loss=torch.ones(4))  # all gradients zero: below the threshold
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    torch.testing.assert_close(opt.state_dict(), state, rtol=0, atol=0)


@parametrize_opt
def test_all_grads_none_before_any_state(factory: Factory) -> None:
    model = make_model()
    opt = factory(model.parameters())
    opt.step(loss=torch.ones(2))
    assert len(opt.state) == 0


@parametrize_opt
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_skips_the_step(factory: Factory, bad: float) -> None:
    model = make_model()
    opt = factory(model.parameters())
    run(model, opt, 4)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    x, y = batch(50)
    losses = nn.functional.cross_entropy(model(x), y, reduction="none") * bad
    opt.zero_grad()
    losses.mean().backward()
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step(loss=losses)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    torch.testing.assert_close(opt.state_dict(), state, rtol=0, atol=0)
    # The covariance is never poisoned: training continues with finite state.
    run(model, opt, 3, start=4)
    filter_state = opt.state[next(model.parameters())]
    assert all(torch.isfinite(filter_state[k]).all() for k in ("covariance", "measurement_noise"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@parametrize_opt
def test_skipped_first_step_then_same_trajectory(factory: Factory) -> None:
    reference_model = make_model()
    reference = factory(reference_model.parameters())
    expected = run(reference_model, reference, 5)
    model = make_model()
    opt = factory(model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning):
        opt.step(loss=torch.tensor([float("nan")]))
    assert float(opt.state[next(model.parameters())]["step"]) == 0
    assert run(model, opt, 5) == pytest.approx(expected, rel=1e-6)


@parametrize_opt
def test_state_dict_round_trip(factory: Factory) -> None:
    """N steps == N/2 steps + save/load (weights_only) into a fresh optimizer + N/2 steps."""
    model = make_model()
    opt = factory(model.parameters(), weight_decay=1e-3)
    expected = run(model, opt, 10)
    expected_params = [p.detach().clone() for p in model.parameters()]

    model = make_model()
    opt = factory(model.parameters(), weight_decay=1e-3)
    first_half = run(model, opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model = make_model(seed=123)
    model.load_state_dict(checkpoint["model"])
    opt = factory(model.parameters(), weight_decay=1e-3)
    opt.load_state_dict(checkpoint["optimizer"])
    second_half = run(model, opt, 5, start=5)
    assert first_half + second_half == expected
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected_params, strict=True))


@parametrize_opt
def test_load_state_dict_keeps_filter_in_float64(factory: Factory) -> None:
    model = make_model(torch.bfloat16)
    opt = factory(model.parameters())
    run(model, opt, 2)
    fresh = factory(model.parameters())
    fresh.load_state_dict(opt.state_dict())
    state = fresh.state[next(model.parameters())]
    assert state["covariance"].dtype == torch.float64
    assert state["measurement_noise"].dtype == torch.float64
    torch.testing.assert_close(state["covariance"], opt.state[next(model.parameters())]["covariance"], rtol=0, atol=0)
    if factory is KoalaM:
        assert state["velocity"].dtype == torch.bfloat16


def test_load_state_dict_of_another_model_rejected_before_loading() -> None:
    """A KOALA-M checkpoint whose per-parameter state has other shapes (same tensor count) is refused with the
    offending entry named, and the optimizer keeps its own state: the fused kernels never see mismatched sizes."""
    model = make_model()
    opt = KoalaM(model.parameters())
    run(model, opt, 2)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))  # same 4 tensors, other shapes
    other_opt = KoalaM(other.parameters())
    run(other, other_opt, 1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(
        ValueError, match=r"state\[0\]\['velocity'\] has shape \(4, 5\), but parameter 0 has shape \(8, 5\)"
    ):
        opt.load_state_dict(other_opt.state_dict())
    torch.testing.assert_close(opt.state_dict(), before, rtol=0, atol=0)
    run(model, opt, 1)  # still steps


@parametrize_opt
def test_deepcopy_is_independent(factory: Factory) -> None:
    model = make_model()
    opt = factory(model.parameters())
    run(model, opt, 3)
    clone_model = copy.deepcopy(model)
    clone = factory(clone_model.parameters())
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    copied = copy.deepcopy(opt)
    assert run(model, opt, 3, start=3) == run(clone_model, clone, 3, start=3)
    assert isinstance(copied, factory)
    assert copied.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


@parametrize_opt
def test_repr_names_hyperparameters(factory: Factory) -> None:
    text = repr(factory(make_model().parameters(), lr=0.5))
    assert factory.__name__ in text
    assert "lr: 0.5" in text
    assert "noise_decay=0.9" in text


# ---- errors: torch's generic error inputs and KOALA's own, one table ------------------------------------------------


def _one_by_one() -> nn.Parameter:
    return nn.Parameter(torch.randn(1, 1))


def _model_parameters() -> Any:
    return make_model().parameters()


def _in_eval_mode(opt: torch.optim.Optimizer) -> None:
    opt.eval()  # type: ignore[attr-defined]
    opt.step(loss=torch.ones(2))


def _with_gradients(opt: torch.optim.Optimizer) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)  # (with the parameter's strides)
    opt.step(loss=torch.ones(2))


@dataclass(frozen=True)
class ErrorInput:
    """One erroring input: what to build (and, for a step error, how to step), what must be raised (a warning
    category is expected as a warning). `only` restricts the case to some optimizers."""

    desc: str
    error: type[Exception] | type[Warning]
    message: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    params: Callable[[], Any] = _model_parameters
    step: Callable[[torch.optim.Optimizer], Any] | None = None
    only: tuple[Factory, ...] | None = None


_HINT = re.escape("opt.step(loss=losses)")

# torch.testing._internal.common_optimizers.get_error_inputs_for_all_optims (torch 2.13, CPU), with torch's messages.
# (That module cannot be imported here: it needs torch's test-only dependencies.) None as params is torch's too: the
# lr check must come before the parameters are read.
TORCH_ERROR_INPUTS = [
    ErrorInput(
        "invalid param type",
        TypeError,
        "params argument given to the optimizer should be an iterable of Tensors or dicts",
        params=_one_by_one,
    ),
    ErrorInput(
        "a param group cannot have duplicate parameters",
        UserWarning,
        ".*a parameter group with duplicate parameters.*",
        params=lambda: [(p := _one_by_one()), p],
    ),
    ErrorInput(
        "duplicate parameters should not occur across param groups either",
        ValueError,
        "some parameters appear in more than one parameter group",
        params=lambda: [{"params": (p := _one_by_one())}, {"params": p}],
    ),
    ErrorInput(
        "Tensor lr must be 1-element",
        ValueError,
        "Tensor lr must be 1-element",
        kwargs={"lr": torch.tensor([0.001, 0.001])},
        params=lambda: None,
    ),
    ErrorInput(
        "all optimizer params should be with/without names",
        ValueError,
        "all optimizer params should be with/without names. Some param names are missing",
        params=lambda: [("weight", _one_by_one()), _one_by_one()],
    ),
    ErrorInput(
        "all optimizer param groups should be with/without names.",
        ValueError,
        "all optimizer param groups should be with/without names. cannot add param group with names to the optimizer",
        params=lambda: [{"params": [_one_by_one()], "lr": 1e-2}, {"params": [("weight", _one_by_one())]}],
    ),
]

KOALA_ERROR_INPUTS = [
    ErrorInput("negative lr", ValueError, r"Invalid lr: -1\.0", {"lr": -1.0}),
    ErrorInput("nan lr", ValueError, r"Invalid lr: nan", {"lr": float("nan")}),
    ErrorInput("negative Tensor lr", ValueError, r"Invalid lr: -1\.0", {"lr": torch.tensor(-1.0)}),
    ErrorInput(
        "Tensor lr off the CPU",
        ValueError,
        r"lr as a Tensor is not supported on meta",
        {"lr": torch.tensor(0.5, device="meta")},
    ),
    ErrorInput(
        "negative lr of a group", ValueError, r"Invalid lr: -1", params=lambda: [{"params": [_one_by_one()], "lr": -1}]
    ),
    ErrorInput(
        "2-element Tensor lr of a group",
        ValueError,
        "Tensor lr must be 1-element",
        params=lambda: [{"params": [_one_by_one()], "lr": torch.ones(2)}],
    ),
    ErrorInput("negative weight_decay", ValueError, r"Invalid weight_decay: -1", {"weight_decay": -1}),
    ErrorInput("foreach not a bool", ValueError, r"Invalid foreach", {"foreach": "yes"}),
    ErrorInput("fused not a bool", ValueError, r"Invalid fused: 1 \(expected None or bool\)", {"fused": 1}),
    ErrorInput(
        "fused and foreach both True",
        RuntimeError,
        "`fused` and `foreach` cannot be `True` together",
        {"fused": True, "foreach": True},
    ),
    ErrorInput(
        "fused with bfloat16 CPU parameters",
        RuntimeError,
        r"fused=True: the fused kernels take float32/float64 CPU tensors.*got a torch\.bfloat16 parameter on cpu",
        {"fused": True},
        params=lambda: [nn.Parameter(torch.randn(3, dtype=torch.bfloat16))],
    ),
    ErrorInput(  # (torch's test_fused_error_on_params_on_meta: KOALA checks them at construction)
        "fused with meta parameters",
        RuntimeError,
        r"fused=True: the fused kernels take float32/float64 CPU tensors.*got a torch\.float32 parameter on meta",
        {"fused": True},
        params=lambda: [nn.Parameter(torch.randn(3, device="meta"))],
    ),
    ErrorInput(
        "fused with non-contiguous parameters",
        RuntimeError,
        r"fused=True, but the fused kernels do not apply to these tensors.*pass fused=None",
        {"fused": True},
        params=lambda: [nn.Parameter(torch.randn(4, 3).t())],
        step=_with_gradients,
    ),
    ErrorInput("empty parameter list", ValueError, "optimizer got an empty parameter list", params=list),
    ErrorInput("integer parameters", ValueError, "floating-point", params=lambda: [torch.zeros(3, dtype=torch.int64)]),
    ErrorInput(
        "complex parameters",
        ValueError,
        r"Invalid parameter dtype torch\.complex64: KOALA needs floating-point tensors",
        params=lambda: [nn.Parameter(torch.randn(3, dtype=torch.complex64))],
    ),
    ErrorInput("betas", TypeError, r"unexpected keyword argument 'betas'", {"betas": (0.9, 0.99)}),
    ErrorInput(
        "noise_decay above 1",
        ValueError,
        r"Invalid noise_decay: 1\.5 \(expected >= 0\.0 and <= 1\.0\)",
        {"noise_decay": 1.5},
    ),
    ErrorInput(
        "measurement_noise 0", ValueError, r"Invalid measurement_noise: 0\.0 \(expected > 0", {"measurement_noise": 0.0}
    ),
    ErrorInput(
        "initial_covariance 0",
        ValueError,
        r"Invalid initial_covariance: 0\.0 \(expected > 0",
        {"initial_covariance": 0.0},
        only=(KoalaV, KoalaDiag),
    ),
    ErrorInput(
        "negative process_noise",
        ValueError,
        r"Invalid process_noise",
        {"process_noise": -1.0},
        only=(KoalaV, KoalaDiag),
    ),
    ErrorInput(
        "beta2 of 1",
        ValueError,
        r"Invalid beta2: 1\.0 \(expected >= 0\.0 and < 1\.0\)",
        {"beta2": 1.0},
        only=(KoalaDiag,),
    ),
    ErrorInput("eps 0", ValueError, r"Invalid eps: 0\.0 \(expected > 0", {"eps": 0.0}, only=(KoalaDiag,)),
    ErrorInput("momentum above 1", ValueError, r"Invalid momentum: 1\.2", {"momentum": 1.2}, only=(KoalaM,)),
    ErrorInput("bool momentum", ValueError, r"Invalid momentum", {"momentum": True}, only=(KoalaM,)),
    ErrorInput(
        "initial_covariance of 2",
        ValueError,
        r"expected \(P_xx, P_xp, P_pp\)",
        {"initial_covariance": (0.1, 0.0)},
        only=(KoalaM,),
    ),
    ErrorInput(
        "initial_covariance not PSD",
        ValueError,
        r"not positive semidefinite",
        {"initial_covariance": (0.1, 1.0, 0.1)},
        only=(KoalaM,),
    ),
    ErrorInput(
        "negative initial_covariance[0]",
        ValueError,
        r"Invalid initial_covariance\[0\]",
        {"initial_covariance": (-0.1, 0.0, 0.1)},
        only=(KoalaM,),
    ),
    ErrorInput(
        "negative weight_process_noise",
        ValueError,
        r"Invalid weight_process_noise",
        {"weight_process_noise": -1e-3},
        only=(KoalaM,),
    ),
    ErrorInput(
        "negative velocity_process_noise",
        ValueError,
        r"Invalid velocity_process_noise",
        {"velocity_process_noise": -1e-3},
        only=(KoalaM,),
    ),
    # step errors: torch's table calls optimizer.step(), which for KOALA is a step without its loss
    ErrorInput(
        "step() without a loss", TypeError, f"got neither of closure and loss.*{_HINT}", step=lambda o: o.step()
    ),
    ErrorInput(
        "both closure and loss",
        TypeError,
        f"got both of closure and loss.*{_HINT}",
        step=lambda o: o.step(lambda: torch.ones(1), loss=torch.ones(1)),
    ),
    ErrorInput(
        "closure returning None",
        TypeError,
        "needs the loss as a non-empty float tensor or a real number, got None",
        step=lambda o: o.step(lambda: None),
    ),
    ErrorInput(
        "integer loss tensor",
        TypeError,
        r"non-empty float tensor or a real number, got a torch\.int64 tensor of shape \(2,\)",
        step=lambda o: o.step(loss=torch.tensor([1, 2])),
    ),
    ErrorInput(
        "empty loss tensor",
        TypeError,
        r"non-empty float tensor or a real number, got a torch\.float32 tensor of shape \(0,\)",
        step=lambda o: o.step(loss=torch.ones(0)),
    ),
    ErrorInput(
        "bool loss",
        TypeError,
        "non-empty float tensor or a real number, got a bool",
        step=lambda o: o.step(lambda: True),
    ),
    ErrorInput("string loss", TypeError, "got a str", step=lambda o: o.step(loss="1.0")),
    ErrorInput("step in evaluation mode", RuntimeError, r"called in evaluation mode", step=_in_eval_mode),
]

ERROR_INPUTS = [
    (factory, case)
    for case in TORCH_ERROR_INPUTS + KOALA_ERROR_INPUTS
    for factory in SHARED_BASE.values()
    if case.only is None or factory in case.only
]


@pytest.mark.parametrize(
    ("factory", "case"),
    ERROR_INPUTS,
    ids=[re.sub(r"\W+", "-", f"{f.__name__} {c.desc}").strip("-") for f, c in ERROR_INPUTS],
)
def test_errors(factory: Factory, case: ErrorInput) -> None:
    """torch's generic error inputs (TestOptimRenewed.test_errors) and KOALA's, at construction or at the step."""
    expect: Any = pytest.warns if issubclass(case.error, Warning) else pytest.raises
    if case.step is None:
        with expect(case.error, match=case.message):
            factory(case.params(), **case.kwargs)
        return
    opt = factory(case.params(), **case.kwargs)
    with expect(case.error, match=case.message):
        case.step(opt)


@parametrize_opt
def test_rejected_param_group_is_not_added(factory: Factory) -> None:
    model = make_model()
    opt = factory(model[0].parameters())
    with pytest.raises(ValueError, match="floating-point"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=torch.int64)]})
    assert len(opt.param_groups) == 1
    run(model, opt, 1)
    model = make_model()
    opt = factory(model[0].parameters(), fused=True)
    with pytest.raises(RuntimeError, match="fused=True: the fused kernels take"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3, dtype=torch.float16))]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": model[2].parameters()})
    run(model, opt, 1)
    assert path_name(opt) == "fused"


# ---- choosing the path: the constructor's foreach and fused -------------------------------------------------------


@parametrize_opt
@pytest.mark.parametrize(
    ("options", "dtype", "expected"),
    [
        ({}, torch.float32, "fused"),
        ({"foreach": True}, torch.float32, "fused"),
        ({"foreach": False}, torch.float32, "single"),
        ({"fused": True}, torch.float64, "fused"),
        ({"fused": True, "foreach": False}, torch.float32, "fused"),
        ({"fused": False}, torch.float32, "foreach"),
        ({"fused": False, "foreach": True}, torch.float32, "foreach"),
        ({"fused": False, "foreach": False}, torch.float32, "single"),
        ({}, torch.bfloat16, "foreach"),  # no kernel takes bfloat16 on the CPU: fused=None falls back
        ({"foreach": False}, torch.bfloat16, "single"),
    ],
)
def test_constructor_chooses_the_path(
    factory: Factory, options: dict[str, Any], dtype: torch.dtype, expected: str
) -> None:
    """`foreach` and `fused` as in torch's optimizers: fused=None (the default) runs the fused kernels where they
    apply unless foreach=False; fused=False keeps to `torch._foreach_*` or the loop; fused=True the kernels."""
    if expected == "fused" and options.get("fused") is None and not F.FUSED_BY_DEFAULT["cpu"]:
        expected = "foreach"  # (KOALA_CPU_KERNELS=0 in this environment: test_environment_switch_is_only_the_default)
    model = make_model(dtype)
    opt = factory(model.parameters(), **options)
    run(model, opt, 2)
    assert path_name(opt) == expected
    assert opt.param_groups[0]["fused"] is options.get("fused")


def test_environment_switch_is_only_the_default() -> None:
    """KOALA_CPU_KERNELS=0 makes fused=None take `torch._foreach_*` (and `warm_up` load nothing); fused=True still
    runs the kernels."""
    script = """
import torch
from koala import KoalaM, KoalaV, cpu_kernels
cpu_kernels.warm_up()
print(cpu_kernels._pool_started)
for factory in (KoalaV, KoalaM):
    for options in ({}, {"fused": True}):
        model = torch.nn.Linear(5, 3)
        opt = factory(model.parameters(), **options)
        for _ in range(2):
            losses = model(torch.randn(8, 5)).square().mean(1)
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses.detach())
        print(opt._path(opt._blocks()).name)
"""
    env = {**os.environ, "KOALA_CPU_KERNELS": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "foreach", "fused", "foreach", "fused"]


@pytest.mark.slow
@parametrize_opt
def test_fused_under_torch_compile_takes_torch_ops(factory: Factory) -> None:
    """The compiler traces torch operations: a compiled step with fused=True runs `torch._foreach_*`, and steps like
    an eager one with fused=False."""
    trajectories = []
    for fused, compiled in ((False, False), (True, True)):
        torch._dynamo.reset()
        model = make_model()
        opt = factory(model.parameters(), weight_decay=1e-3, fused=fused)

        def losses_of(k: int, model: nn.Module = model) -> torch.Tensor:
            x, y = batch(k)
            return nn.functional.cross_entropy(model(x), y, reduction="none")

        trajectories.append(trained_weights(model, opt, losses_of, 4, {"backend": "eager"} if compiled else None))
    for a, b in zip(*trajectories, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@parametrize_opt
@pytest.mark.parametrize("loss", [2.5, 3, np.float64(2.5), np.float32(0.25)], ids=["float", "int", "np64", "np32"])
def test_a_real_number_is_a_zero_dim_loss(factory: Factory, loss: Any) -> None:
    """A real number as the loss (from a closure or as `loss=`) steps exactly like the 0-d float64 tensor of it, and
    `step()` returns it as given."""
    results = []
    for as_tensor in (False, True):
        model = make_model()
        opt = factory(model.parameters())
        for k in range(3):
            x, y = batch(k)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            given = torch.tensor(float(loss), dtype=torch.float64) if as_tensor else loss
            if k == 1:
                assert opt.step(lambda given=given: given) is given
            else:
                assert opt.step(loss=given) is given
        results.append(([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())))
    (params, state), (params_t, state_t) = results
    assert all(torch.equal(p, q) for p, q in zip(params, params_t, strict=True))
    torch.testing.assert_close(state, state_t, rtol=0, atol=0)


@parametrize_opt
def test_closure_and_zero_dim_loss(factory: Factory) -> None:
    model = make_model()
    opt = factory(model.parameters())
    x, y = batch(0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        return losses

    returned = opt.step(closure)
    assert returned.shape == (16,)
    # A 0-d loss is accepted: R then uses m2 = L^2 (documented as degraded).
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert opt.step(loss=loss) is loss
    assert float(opt.state[next(model.parameters())]["step"]) == 2


def test_zero_dim_loss_uses_square_of_mean() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = KoalaV([p])
    p.grad = torch.tensor([0.5, 0.5])
    opt.step(loss=torch.tensor(3.0))
    assert float(opt.state[p]["measurement_noise"]) == pytest.approx(0.9 + 0.1 * 9.0)


def test_koala_m_eval_train_switch_is_exact() -> None:
    model = make_model()
    opt = KoalaM(model.parameters())
    run(model, opt, 4)
    predicted = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    posterior = [p.detach().clone() for p in model.parameters()]
    for p, q, v in zip(predicted, posterior, (opt.state[p]["velocity"] for p in model.parameters()), strict=True):
        torch.testing.assert_close(q, p - v)
    with pytest.raises(RuntimeError, match="evaluation mode"):
        train_step(model, opt, 0)
    for _ in range(20):
        opt.train()
        opt.eval()
        opt.eval()  # repeated switches to the same mode are no-ops
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), posterior, strict=True))
    opt.train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), predicted, strict=True))


def test_koala_m_checkpoint_saved_in_eval_mode_resumes() -> None:
    model = make_model()
    opt = KoalaM(model.parameters())
    run(model, opt, 4)
    opt.eval()
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    opt.train()
    expected = run(model, opt, 3, start=4)
    restored = make_model(seed=9)
    restored.load_state_dict(checkpoint["model"])
    restored_opt = KoalaM(restored.parameters())
    restored_opt.load_state_dict(checkpoint["optimizer"])
    restored_opt.train()  # x^ = x + p, recomputed from the posterior export
    assert run(restored, restored_opt, 3, start=4) == pytest.approx(expected, rel=1e-6)


def test_koala_v_eval_train_are_no_ops() -> None:
    model = make_model()
    opt = KoalaV(model.parameters())
    run(model, opt, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    opt.train()
    run(model, opt, 1)


@parametrize_opt
def test_half_precision_parameters(factory: Factory) -> None:
    """bf16/fp16 parameters train; norms accumulate in float32 (an fp16 norm of these gradients would overflow)."""
    for dtype in (torch.bfloat16, torch.float16):
        p = nn.Parameter(torch.full((70000,), 0.5, dtype=dtype))
        opt = factory([p])
        p.grad = torch.full_like(p, 1.0)  # |g| = 264.6, |g|^2 = 70000 > fp16 max
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step(loss=torch.full((4,), 2.0))
        assert torch.isfinite(p).all()
        state = opt.state[p]
        assert float(state["step"]) == 1
        assert torch.isfinite(state["covariance"]).all()
        assert float(state["measurement_noise"]) == pytest.approx(0.9 + 0.1 * 4.0)


@parametrize_opt
def test_frozen_and_sparse(factory: Factory) -> None:
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = factory(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step(loss=torch.ones(2))


@parametrize_opt
def test_add_param_group_after_first_step_rejected(factory: Factory) -> None:
    model = make_model()
    opt = factory(model[0].parameters())
    run_model = model
    x, y = batch(0)
    opt.zero_grad()
    losses = nn.functional.cross_entropy(run_model(x), y, reduction="none")
    losses.mean().backward()
    opt.step(loss=losses)
    with pytest.raises(RuntimeError, match="before the first step"):
        opt.add_param_group({"params": model[2].parameters()})


# ---- torch's optimizer contract: copies, hooks, old state dicts, torch.compile, late param groups --------
# (every optimizer on the shared base; KoalaPlusPlus, the KOALA++ baseline, is in tests/test_torch_contract.py's table)

# Hyperparameters away from the defaults: a copy that lost them and fell back to the defaults would step differently.
NON_DEFAULTS: dict[Factory, dict[str, Any]] = {
    KoalaV: {"initial_covariance": 0.2, "process_noise": 0.5, "noise_decay": 0.8, "weight_decay": 1e-3},
    KoalaM: {
        "momentum": 0.8,
        "initial_covariance": (0.2, 0.01, 0.1),
        "weight_process_noise": 2e-2,
        "velocity_process_noise": 5e-3,
        "measurement_noise": 0.5,
        "weight_decay": 1e-3,
    },
    KoalaDiag: {
        "initial_covariance": 0.2,
        "process_noise": 0.5,
        "beta2": 0.99,
        "eps": 1e-6,
        "noise_decay": 0.8,
        "weight_decay": 1e-3,
    },
}


def _pickled(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


def _saved(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": _pickled, "torch.save": _saved}


def public_attributes(opt: torch.optim.Optimizer) -> tuple[set[str], dict[str, Any]]:
    """The names of the public attributes (torch's test_deepcopy_copies_all_public_attrs) and the values of those
    that are hyperparameters. (torch's `__setstate__` adds "differentiable" to `defaults`.)"""
    names = {k for k in vars(opt) if not k.startswith("_")}
    return names, {k: getattr(opt, k) for k in names - {"state", "param_groups", "defaults"}}


@parametrize_shared
@pytest.mark.parametrize("copier", COPIES.values(), ids=COPIES.keys())
@pytest.mark.parametrize("when", ["fresh", "stepped", "eval-mode"])
@pytest.mark.parametrize("foreach", [False, None])
def test_copy_steps_like_the_original(factory: Factory, copier: Callable[[Any], Any], when: str, foreach: bool) -> None:
    """A deep copy, a pickle round trip or torch.save/torch.load of the whole optimizer (with its model, so that the
    parameters stay its own) has the original's hyperparameters and steps exactly like it, independently."""
    model = make_model()
    opt = factory(model.parameters(), foreach=foreach, **NON_DEFAULTS[factory])
    if when != "fresh":
        run(model, opt, 3)
    if when == "eval-mode":
        opt.eval()  # type: ignore[attr-defined]
    model_copy, opt_copy = copier((model, opt))
    assert type(opt_copy) is factory
    assert repr(opt_copy) == repr(opt)
    assert public_attributes(opt_copy) == public_attributes(opt)
    outcomes = []
    for m, o in ((model, opt), (model_copy, opt_copy)):  # the original first: a shared tensor would show
        o.train()  # type: ignore[attr-defined]
        losses = run(m, o, 4, start=3)
        outcomes.append((losses, [p.detach().clone() for p in m.parameters()], o.state_dict()))
    (losses, params, state), (losses_copy, params_copy, state_copy) = outcomes
    assert losses_copy == losses
    assert all(torch.equal(p, q) for p, q in zip(params, params_copy, strict=True))
    torch.testing.assert_close(state_copy, state, rtol=0, atol=0)


@parametrize_shared
def test_copy_of_an_optimizer_pickled_without_fused(factory: Factory) -> None:
    """An optimizer pickled by a version without the `fused` option (in neither its defaults nor its groups) gets
    fused=None on loading, as torch's optimizers default the options they add, and steps like the original."""
    model, reference_model = make_model(), make_model()
    opt, reference = factory(model.parameters()), factory(reference_model.parameters())
    assert run(model, opt, 2) == run(reference_model, reference, 2)
    del opt.defaults["fused"]
    for group in opt.param_groups:
        del group["fused"]
    model_copy, opt_copy = _pickled((model, opt))
    assert opt_copy.defaults["fused"] is None
    assert [group["fused"] for group in opt_copy.param_groups] == [None]
    assert run(model_copy, opt_copy, 2, start=2) == run(reference_model, reference, 2, start=2)


@parametrize_shared
@pytest.mark.parametrize("result", [1, 0.5, np.float64(0.5)], ids=["int", "float", "np64"])
def test_step_hooks_run_in_order_with_a_number_closure(factory: Factory, result: Any) -> None:
    """torch's global and per-optimizer step pre/post hooks run around a KOALA step whose closure returns a number
    (torch's hook tests return 1); the number is the loss that step measures (it steps as the 0-d float64 loss), and
    step() returns it."""
    calls: list[str] = []
    model, reference_model = make_model(), make_model()
    opt, reference = factory(model.parameters()), factory(reference_model.parameters())
    x, y = batch(0)
    nn.functional.cross_entropy(reference_model(x), y).backward()
    reference.step(loss=torch.tensor(float(result), dtype=torch.float64))

    def closure() -> Any:
        calls.append("closure")
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        return result

    def hook(name: str) -> Callable[..., None]:
        return lambda optimizer, args, kwargs: calls.append(name)

    handles = [
        register_optimizer_step_pre_hook(hook("global pre")),
        register_optimizer_step_post_hook(hook("global post")),
        opt.register_step_pre_hook(hook("pre")),
        opt.register_step_post_hook(hook("post")),
    ]
    try:
        assert opt.step(closure) is result
        assert calls == ["global pre", "pre", "closure", "post", "global post"]
        assert float(opt.state[next(model.parameters())]["step"]) == 1
    finally:
        for handle in handles:
            handle.remove()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters(), strict=True))
    opt.step(closure)
    assert calls[5:] == ["closure"]


@parametrize_shared
@pytest.mark.parametrize("number", [float, int])
def test_load_state_dict_with_a_number_step(factory: Factory, number: type) -> None:
    """A state dict whose `step` is a plain number (as older torch optimizers saved it) loads as the float64 tensor,
    and training continues exactly as from the tensor step."""
    model = make_model()
    opt = factory(model.parameters())
    run(model, opt, 3)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    old = copy.deepcopy(saved["optimizer"])
    steps = [s for s in old["state"].values() if "step" in s]
    assert len(steps) == 1
    for s in steps:
        s["step"] = number(s["step"].item())
    expected = run(model, opt, 3, start=3)
    restored = make_model(seed=5)
    restored.load_state_dict(saved["model"])
    restored_opt = factory(restored.parameters())
    restored_opt.load_state_dict(old)
    step = restored_opt.state[next(restored.parameters())]["step"]
    assert isinstance(step, torch.Tensor)
    assert step.dtype == torch.float64
    assert float(step) == 3
    assert run(restored, restored_opt, 3, start=3) == expected


@pytest.mark.slow
@parametrize_shared
def test_built_inside_torch_compile(factory: Factory) -> None:
    """An optimizer constructed inside a compiled function keeps its hyperparameters (torch.compile drops attributes
    set before Optimizer.__init__), prints, copies and steps like one built eagerly."""
    torch._dynamo.reset()
    kwargs = NON_DEFAULTS[factory]
    model, eager_model = make_model(), make_model()
    opt = torch.compile(lambda: factory(model.parameters(), **kwargs), backend="eager")()
    eager = factory(eager_model.parameters(), **kwargs)
    assert type(opt) is factory
    assert repr(opt) == repr(eager)
    assert public_attributes(opt) == public_attributes(eager)
    copied = copy.deepcopy(opt)
    assert repr(copied) == repr(eager)
    assert run(model, opt, 4) == run(eager_model, eager, 4)


def _load_own_state_dict(opt: torch.optim.Optimizer) -> None:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer, weights_only=True))


def _load_empty_entry(opt: torch.optim.Optimizer) -> None:
    # What a never-stepped optimizer that had loaded its own state dict saved before this was fixed.
    opt.load_state_dict({"state": {0: {}}, "param_groups": opt.state_dict()["param_groups"]})


def _switch_modes(opt: torch.optim.Optimizer) -> None:
    opt.eval()  # type: ignore[attr-defined]
    opt.train()  # type: ignore[attr-defined]


def _read_state(opt: torch.optim.Optimizer) -> None:
    assert all(not opt.state[p] for group in opt.param_groups for p in group["params"])  # defaultdict: adds entries


BEFORE_THE_FIRST_STEP = {
    "load-own-state-dict": _load_own_state_dict,
    "load-empty-entry": _load_empty_entry,
    "eval-train": _switch_modes,
    "read-state": _read_state,
}


@parametrize_shared
@pytest.mark.parametrize("action", BEFORE_THE_FIRST_STEP.values(), ids=BEFORE_THE_FIRST_STEP.keys())
def test_add_param_group_after_a_never_stepped_load(factory: Factory, action: Callable[[Any], None]) -> None:
    """Before the first step a group can still be added, whatever left empty state entries (loading the optimizer's
    own never-stepped state dict, an eval/train switch, reading `opt.state[p]`); the optimizer then steps exactly
    like one built with both groups."""
    model = make_model()
    opt = factory(model[0].parameters())
    action(opt)
    opt.add_param_group({"params": model[2].parameters(), "weight_decay": 1e-3})
    assert not any(opt.state.values())
    reference_model = make_model()
    reference = factory(
        [{"params": reference_model[0].parameters()}, {"params": reference_model[2].parameters(), "weight_decay": 1e-3}]
    )
    assert run(model, opt, 3) == run(reference_model, reference, 3)
    if action is not _read_state:  # (entries a caller's reads added stay, as in torch's optimizers)
        assert all(len(s) > 0 for s in opt.state_dict()["state"].values())


@parametrize_opt
def test_state_dict_format_is_torchs(factory: Factory) -> None:
    """The state dict keeps the layout earlier versions saved (so their checkpoints load): torch's two entries, the
    groups' lr, weight_decay, foreach, fused and train_mode, the filter under parameter 0. The filter's other
    hyperparameters are not in it."""
    model = make_model()
    opt = factory(model.parameters())
    run(model, opt, 1)
    state_dict = opt.state_dict()
    assert state_dict.keys() == {"state", "param_groups"}
    assert [set(group) for group in state_dict["param_groups"]] == [
        {"params", "lr", "weight_decay", "foreach", "fused", "train_mode"}
    ]
    per_parameter = {"velocity", "weight_average"} if factory is KoalaM else set()
    filter_keys = {"step", "covariance", "measurement_noise"} | ({"process_noise"} if factory is KoalaM else set())
    assert {k: set(v) for k, v in state_dict["state"].items()} == {
        i: per_parameter | (filter_keys if i == 0 else set()) for i in (range(4) if factory is KoalaM else [0])
    }
