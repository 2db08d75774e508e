"""torch's generic optimizer tests (test/test_optim.py, TestOptimRenewed) for KoalaV, KoalaM and KoalaDiag (every
optimizer on KOALA's shared base) and for the KOALA++ baseline KoalaPlusPlus: a table of optimizers x properties.

torch runs them over `OptimizerInfo`s (torch.testing._internal.common_optimizers), which cannot be imported here (the
module needs torch's test-only dependencies), so each property is restated with torch's inputs where they fit KOALA.
KOALA needs its loss at every step, like an optimizer with `step_requires_closure`: where torch calls `step()` after
a backward, these call `step(closure)` or `step(loss=...)`. The erroring inputs, torch's generic ones included, are
`test_errors` in test_optimizer.py.

Not restated, because KOALA has no such feature: the `maximize`, `capturable` and `differentiable` flags, sparse
gradients and complex parameters (refused with an error); test_optim_infos_do_not_specify_global_cliquey_kwargs,
which checks torch's OptimizerInfo tables, not an optimizer. test_fused_error_on_params_on_meta: KOALA checks the
tensors of `fused=True` at construction, so meta parameters are refused there (test_errors); the rest of torch's
test steps an optimizer whose parameters `to_empty` replaced, a no-op. Not here either: the tests that need CUDA or
several devices (state dicts moved to CUDA, CPU state dicts loaded by a fused CUDA optimizer, fused CPU vs CUDA,
the found_inf of a fused AMP step, peak memory, large tensors, parameters spread over devices); tests/test_cuda.py
holds KOALA's CUDA checks.

KoalaPlusPlus is written on `torch.optim.Optimizer` directly, as one loop over tensors: the cells of the table that
need what only the shared base has (several paths, the step counter, options added since the first release) are in
NOT_APPLICABLE, with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from koala import KoalaDiag, KoalaPlusPlus
from koala import functional as F
from tests.optimizer_cases import PATHS, SHARED_BASE, Factory, path_name

#: The table's optimizers: the shared base and the KOALA++ baseline.
FACTORIES: dict[str, Factory] = {**SHARED_BASE, "koalapp": KoalaPlusPlus}

Check = Callable[[Factory], None]
PROPERTIES: dict[str, Check] = {}

# torch's OptimizerInfo.scheduler_inputs default: none, StepLR, ReduceLROnPlateau (stepped with the loss).
SCHEDULERS: list[list[Callable[[torch.optim.Optimizer], Any]]] = [
    [],
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
    [lambda opt: ReduceLROnPlateau(opt)],
]


def prop(check: Check) -> Check:
    PROPERTIES[check.__name__] = check
    return check


def foreach_choices(factory: Factory) -> list[dict[str, Any]]:
    """foreach=False, True and None (the loop, the multi-tensor path, the default) for an optimizer that has them;
    the one path of an optimizer without the flag (KoalaPlusPlus)."""
    if "foreach" not in inspect.signature(factory).parameters:
        return [{}]
    return [{"foreach": foreach} for foreach in (False, True, None)]


def quadratic(weight: Tensor, bias: Tensor, inpt: Tensor) -> Tensor:
    return (weight.mv(inpt) + bias).pow(2).sum()


def closure_for(opt: torch.optim.Optimizer, loss: Callable[[], Tensor]) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    return closure


def step_schedulers(schedulers: list[Any], loss: Tensor) -> None:
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(loss.detach())  # (torch 2.13 warns on float() of a tensor that requires grad)
        else:
            scheduler.step()


def equal(a: Any, b: Any) -> None:
    """Bitwise equality of nested state (torch's assertEqual without tolerance; names and flags compared too)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif isinstance(a, dict):
        assert isinstance(b, dict)
        assert a.keys() == b.keys()
        for key in a:
            equal(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            equal(x, y)
    else:
        assert a == b


@prop
def forloop_goes_right_direction(factory: Factory) -> None:
    """test_forloop_goes_right_direction: contiguous and non-contiguous parameters, with each scheduler; here on
    every path (the loop, foreach, the fused CPU kernels)."""
    for contiguous in (True, False):
        for choice in foreach_choices(factory):
            for schedulers_c in SCHEDULERS:
                torch.manual_seed(0)
                if contiguous:
                    weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
                else:
                    weight = Parameter(torch.randn(10, 5, 2)[..., 0])
                    bias = Parameter(torch.randn(10, 2)[..., 0])
                inpt = torch.randn(5)
                opt = factory([weight, bias], **choice)
                schedulers = [s(opt) for s in schedulers_c]
                closure = closure_for(opt, lambda w=weight, b=bias, i=inpt: quadratic(w, b, i))
                initial = closure().item()
                for _ in range(20):
                    loss = opt.step(closure)
                    step_schedulers(schedulers, loss)
                assert closure().item() < initial, (contiguous, choice, schedulers)


@prop
def param_group_with_lrscheduler_goes_right_direction(factory: Factory) -> None:
    for schedulers_c in SCHEDULERS:
        torch.manual_seed(0)
        weight, bias, inpt = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10)), torch.randn(5)
        opt = factory([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        schedulers = [s(opt) for s in schedulers_c]
        closure = closure_for(opt, lambda w=weight, b=bias, i=inpt: quadratic(w, b, i))
        initial = closure().item()
        for _ in range(20):
            step_schedulers(schedulers, opt.step(closure))
        assert closure().item() < initial


@prop
def tensor_lr(factory: Factory) -> None:
    """test_tensor_lr: a 1-element tensor lr steps exactly like the float (float64 tensors, so that the values a
    scheduler writes into it are the float's), on every path and under a scheduler."""
    for choice in foreach_choices(factory):
        for schedulers_c in SCHEDULERS[:2]:
            outcomes = []
            for lr in (0.5, torch.tensor(0.5, dtype=torch.float64)):
                torch.manual_seed(0)
                weight, bias, inpt = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10)), torch.randn(5)
                opt = factory([weight, bias], lr=lr, **choice)
                schedulers = [s(opt) for s in schedulers_c]
                closure = closure_for(opt, lambda w=weight, b=bias, i=inpt: quadratic(w, b, i))
                for _ in range(12):
                    step_schedulers(schedulers, opt.step(closure))
                outcomes.append((weight.detach().clone(), bias.detach().clone(), float(opt.param_groups[0]["lr"])))
            assert isinstance(opt.param_groups[0]["lr"], Tensor)
            equal(outcomes[0], outcomes[1])


def _derived_run(factory: Factory, dtype: torch.dtype, **kwargs: Any) -> tuple[list[Tensor], dict[str, Any]]:
    """torch's _test_derived_optimizers: a small model plus a 0-d and a zero-element parameter, 7 iterations, no
    gradient at all at iteration 2 (a no-op), a frozen layer at iterations 3 and 4."""
    inpt = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid()).to(dtype)
    zero_dim = torch.empty((), dtype=dtype, requires_grad=True)
    zero_dim.data.fill_(0.5)
    empty = torch.empty(0, dtype=dtype, requires_grad=True)
    params = [*model.parameters(), zero_dim, empty]
    opt = factory(params, **kwargs)
    for i in range(7):
        opt.zero_grad()
        model[2].requires_grad_(i not in (3, 4))
        loss = model(inpt).sum() + zero_dim * zero_dim.detach() + empty.sum() + 1.0  # positive, as scheme (b) needs
        if i != 2:
            loss.backward()
        opt.step(loss=loss.detach())
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


@prop
def foreach_matches_forloop(factory: Factory) -> None:
    """test_foreach_matches_forloop and test_fused_matches_forloop, in float64 and float32 (the fused kernels take no
    half precision: test_errors): params and every state entry agree between the loop, foreach and the fused CPU
    kernels, within torch's default tolerances, with a 0-d and a zero-element parameter last, a step without gradients
    and a frozen layer."""
    for dtype in (torch.float64, torch.float32):
        reference = _derived_run(factory, dtype, **PATHS["single"])
        for path in ("foreach", "fused"):
            torch.testing.assert_close(_derived_run(factory, dtype, **PATHS[path]), reference)


@prop
def mixed_dtypes_match_forloop(factory: Factory) -> None:
    """test_mixed_device_dtype on one device: float64, float32, float16 and bfloat16 parameters in one optimizer agree
    between the loop and foreach, within 5x the dtype's tolerance (torch's margin)."""
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    outcomes = []
    for foreach in (False, True):
        torch.manual_seed(0)
        params = [Parameter(torch.rand(2, 3, dtype=dtype)) for dtype in dtypes]
        opt = factory(params, foreach=foreach)
        for k in range(7):
            gen = torch.Generator().manual_seed(k)
            for p in params:
                p.grad = torch.rand(p.shape, generator=gen).to(p.dtype)
            opt.step(loss=torch.rand(4, generator=gen) + 0.5)
        outcomes.append((params, opt.state))
    (loop, loop_state), (multi, multi_state) = outcomes
    for p, q in zip(loop, multi, strict=True):
        rtol, atol = torch.testing._comparison.get_tolerances(p.dtype, rtol=None, atol=None)
        torch.testing.assert_close(p, q, rtol=5 * rtol, atol=5 * atol)
        for key, value in loop_state[p].items():
            torch.testing.assert_close(value, multi_state[q][key], rtol=5 * rtol, atol=5 * atol)


def _two_groups_descend(factory: Factory, weight_kwargs: dict[str, Any], bias_kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    weight, bias, inpt = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10)), torch.randn(5)
    opt = factory([dict(params=[weight], **weight_kwargs), dict(params=[bias], **bias_kwargs)])
    initial = quadratic(weight, bias, inpt).item()
    for _ in range(20):
        opt.zero_grad()
        loss = quadratic(weight, bias, inpt)
        loss.backward()
        opt.step(loss=loss)
    assert quadratic(weight, bias, inpt).item() < initial


@prop
def param_groups_weight_decay(factory: Factory) -> None:
    _two_groups_descend(factory, {"weight_decay": 0.1}, {"weight_decay": 0.0})


@prop
def param_groups_lr(factory: Factory) -> None:
    """test_param_groups_lr: the groups' own lr drives the descent; a group under the outer lr of 1e-28 stays put."""
    torch.manual_seed(0)
    weight, bias, inpt = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10)), torch.randn(5)
    irrelevant = Parameter(torch.randn(2))
    irrelevant_clone = irrelevant.detach().clone()
    opt = factory([{"params": [weight, bias], "lr": 1.0}, {"params": [irrelevant]}], lr=1e-28)
    initial = quadratic(weight, bias, inpt).item()
    for _ in range(20):
        opt.zero_grad()
        loss = quadratic(weight, bias, inpt)
        loss.backward()
        irrelevant.grad = torch.rand_like(irrelevant)
        opt.step(loss=loss)
    assert quadratic(weight, bias, inpt).item() < initial
    torch.testing.assert_close(irrelevant.detach(), irrelevant_clone)


@prop
def step_is_noop_when_params_have_no_grad(factory: Factory) -> None:
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.clone() for p in params]
    for choice in foreach_choices(factory):
        opt = factory(params, **choice)
        opt.step(lambda: torch.tensor([1.0]))
        assert len(opt.state) == 0
    assert all(torch.equal(p, q) for p, q in zip(params, old, strict=True))


@prop
def step_is_noop_for_zero_grads(factory: Factory) -> None:
    """(KoalaDiag reports the skipped step with a RuntimeWarning; the others skip it silently.)"""
    param = torch.randn(5, 1, requires_grad=True)
    old = param.detach().clone()
    for choice in foreach_choices(factory):
        opt = factory([param], **choice)
        param.grad = torch.zeros_like(param)
        expect: Any = contextlib.nullcontext()
        if factory is KoalaDiag:
            expect = pytest.warns(RuntimeWarning, match="no tensor has a gradient norm of at least 1e-9")
        with expect:
            opt.step(lambda: torch.tensor([1.0]))
        equal(param.detach(), old)


@prop
def optimizer_can_be_printed(factory: Factory) -> None:
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for kwargs in ({}, {"lr": 0.5, "weight_decay": 0.1, **foreach_choices(factory)[0]}, {"lr": torch.tensor(0.5)}):
        text = repr(factory(params, **kwargs))
        assert text.startswith(f"{factory.__name__} (")


def _without_param_names(state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


def _named(params: list[Parameter], is_named: bool) -> list[Any]:
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else list(params)


@prop
def state_dict_deterministic(factory: Factory) -> None:
    """test_state_dict_deterministic: prime 10 steps, load a deep copy of the state dict into an optimizer over
    clones, run both 10 more steps: equal weights at every step and equal state dicts (named or unnamed params);
    repeated groups have identical representations."""
    for is_named0 in (True, False):
        for is_named1 in (True, False):
            torch.manual_seed(0)
            weight, bias, inpt = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2)), torch.randn(3)
            opt = factory(_named([weight, bias], is_named0))
            closure = closure_for(opt, lambda w=weight, b=bias, i=inpt: quadratic(w, b, i))
            for _ in range(10):
                opt.step(closure)
            with torch.no_grad():
                weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
            opt_c = factory(_named([weight_c, bias_c], is_named1))
            closure_c = closure_for(opt_c, lambda w=weight_c, b=bias_c, i=inpt: quadratic(w, b, i))
            opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
            for _ in range(10):
                opt.step(closure)
                opt_c.step(closure_c)
                equal(weight, weight_c)
                equal(bias, bias_c)
            equal(_without_param_names(opt.state_dict()), _without_param_names(opt_c.state_dict()))
            opt_c.param_groups.extend(opt_c.param_groups)
            assert (
                _without_param_names(opt.state_dict())["param_groups"][-1]
                == _without_param_names(opt_c.state_dict())["param_groups"][-1]
            )


def _conv_model() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
    return model, torch.rand(1, 4, 16, 16)


def _conv_loss(model: nn.Module, inpt: Tensor) -> Tensor:
    return model(inpt).square().mean(dim=(1, 2, 3))  # positive per-sample losses


@prop
def can_load_older_state_dict(factory: Factory) -> None:
    """test_can_load_older_state_dict: param groups saved without the options added after the first release
    (KOALA: `foreach`, `train_mode`, then `fused`) load and step, exactly as the state dict with them; a missing
    option takes the optimizer's own value."""
    outcomes = []
    for drop in ((), ("fused",), ("foreach", "fused", "train_mode")):
        model, inpt = _conv_model()
        opt = factory(model.parameters(), foreach=False, fused=False)
        closure = closure_for(opt, lambda m=model, i=inpt: _conv_loss(m, i).mean())
        for _ in range(3):
            opt.step(closure)
        old = copy.deepcopy(opt.state_dict())
        for group in old["param_groups"]:
            for flag in drop:
                del group[flag]
        opt.load_state_dict(old)
        assert opt.param_groups[0]["foreach"] is False
        assert opt.param_groups[0]["fused"] is False
        assert opt.param_groups[0]["train_mode"] is True
        opt.step(closure)
        outcomes.append([p.detach().clone() for p in model.parameters()])
    equal(outcomes[0], outcomes[1])
    equal(outcomes[0], outcomes[2])


@prop
def can_load_from_to_named_state_dict(factory: Factory) -> None:
    for is_named0 in (True, False):
        for is_named1 in (True, False):
            model, inpt = _conv_model()
            opt = factory(model.named_parameters() if is_named0 else model.parameters())
            for _ in range(3):
                opt.step(closure_for(opt, lambda m=model, i=inpt: _conv_loss(m, i).mean()))
            old = copy.deepcopy(opt.state_dict())
            opt2 = factory(model.named_parameters() if is_named1 else model.parameters())
            opt2.load_state_dict(old)
            opt2.step(closure_for(opt2, lambda m=model, i=inpt: _conv_loss(m, i).mean()))
            if is_named0 or is_named1:
                assert opt2.state_dict()["param_groups"][0]["param_names"] == [
                    "0.weight",
                    "0.bias",
                    "1.weight",
                    "1.bias",
                ]


@prop
def save_load_equality_with_weights_only(factory: Factory) -> None:
    for is_named in (True, False):
        torch.manual_seed(0)
        weight, bias, inpt = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2)), torch.randn(3)
        opt = factory(_named([weight, bias], is_named))
        for _ in range(3):
            opt.step(closure_for(opt, lambda w=weight, b=bias, i=inpt: quadratic(w, b, i)))
        state_dict = opt.state_dict()
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        for weights_only in (False, True):
            buffer.seek(0)
            equal(torch.load(buffer, weights_only=weights_only), state_dict)


@prop
def load_nontensor_step(factory: Factory) -> None:
    """test_load_nontensor_step, with torch's inputs (the closure returns a random 1-element loss)."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    closure_loss = torch.rand(1)
    opt = factory(params)
    for _ in range(3):
        opt.step(lambda: closure_loss)
    state_dict = copy.deepcopy(opt.state_dict())
    for p_state in state_dict["state"].values():
        if "step" in p_state and torch.is_tensor(p_state["step"]):
            p_state["step"] = p_state["step"].item()
    opt.load_state_dict(state_dict)
    opt.step(lambda: closure_loss)
    assert float(opt.state[params[0]]["step"]) == 4


def _state_dict_pre_hook(optimizer: torch.optim.Optimizer) -> None:
    optimizer.state["test"] = 1  # type: ignore[index]


def _state_dict_post_hook(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


@prop
def state_dict_pre_and_post_hooks(factory: Factory) -> None:
    """test_state_dict_pre_hook, test_state_dict_post_hook and test_state_dict_pre_post_hook."""
    param = torch.rand(2, 3, requires_grad=True)
    opt = factory([param])
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert opt.state_dict()["state"]["test"] == 1
    opt = factory([param])
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    assert opt.state_dict()["ran_state_dict_pre_hook"] is False
    opt = factory([param])
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    state_dict = opt.state_dict()
    assert "test" not in state_dict["state"]
    assert state_dict["ran_state_dict_pre_hook"] is True


def _load_pre_hook1(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook2(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_post_hook(optimizer: torch.optim.Optimizer) -> None:
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003  # type: ignore[index]
    optimizer.state["ran_load_state_dict_post_hook"] = True  # type: ignore[index]


@prop
def load_state_dict_pre_and_post_hooks(factory: Factory) -> None:
    """test_load_state_dict_pre_hook_and_prepend, test_load_state_dict_post_hook, test_load_state_dict_pre_post_hook;
    here also on a stepped optimizer: a pre-hook's replacement state dict is the one loaded, filter scalars included
    (still float64), and post-hooks see the loaded filter."""
    for stepped in (False, True):
        param = Parameter(torch.rand(2, 3, dtype=torch.bfloat16))
        opt = factory([param])
        if stepped:
            param.grad = torch.rand_like(param)
            opt.step(loss=torch.rand(3) + 0.5)
        state_dict = opt.state_dict()
        opt.register_load_state_dict_pre_hook(_load_pre_hook1)
        opt.load_state_dict(state_dict)
        assert opt.param_groups[0]["lr"] == 0.002
        opt.register_load_state_dict_pre_hook(_load_pre_hook2, prepend=True)
        opt.load_state_dict(state_dict)
        assert opt.param_groups[0]["lr"] == 0.002  # prepended: hook1 runs last

        opt = factory([param])
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.state["ran_load_state_dict_pre_hook2"] is False  # type: ignore[index]
        assert opt.state["ran_load_state_dict_post_hook"] is True  # type: ignore[index]

        opt = factory([param])
        seen: list[Any] = []
        opt.register_load_state_dict_pre_hook(_load_pre_hook2)
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.register_load_state_dict_post_hook(lambda o, seen=seen, p=param: seen.append(dict(o.state.get(p, {}))))
        opt.load_state_dict(state_dict)
        assert opt.state["ran_load_state_dict_pre_hook2"] is True  # type: ignore[index]
        assert opt.state["ran_load_state_dict_post_hook"] is True  # type: ignore[index]
        if stepped and factory in SHARED_BASE.values():
            assert seen[0]["step"].dtype == torch.float64
            assert seen[0]["covariance"].dtype == torch.float64


def _hook_params() -> list[Tensor]:
    return [torch.tensor([1, 1], dtype=torch.float32)]


def dummy_closure() -> int:
    return 1


@prop
def step_post_hook(factory: Factory) -> None:
    data = 2

    def post_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        nonlocal data
        data += 2

    opt = factory(_hook_params())
    handle = opt.register_step_post_hook(post_hook)
    opt.step(dummy_closure)
    opt.step(dummy_closure)
    assert data == 6
    handle.remove()
    opt.step(dummy_closure)
    assert data == 6


@prop
def step_pre_hook(factory: Factory) -> None:
    data = 5

    def pre_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        nonlocal data
        data += 2

    opt = factory(_hook_params())
    handle = opt.register_step_pre_hook(pre_hook)
    opt.step(dummy_closure)
    opt.step(dummy_closure)
    assert data == 9
    handle.remove()
    opt.step(dummy_closure)
    assert data == 9


@prop
def step_all_hooks(factory: Factory) -> None:
    data: list[int] = []
    params = _hook_params()
    opt, sgd = factory(params), torch.optim.SGD(params)
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: data.append(0)),
        register_optimizer_step_post_hook(lambda o, a, k: data.append(5)),
        opt.register_step_pre_hook(lambda o, a, k: data.append(1)),
        opt.register_step_post_hook(lambda o, a, k: data.append(2)),
        sgd.register_step_pre_hook(lambda o, a, k: data.append(1)),
        sgd.register_step_post_hook(lambda o, a, k: data.append(2)),
    ]
    try:
        opt.step(dummy_closure)
        assert data == [0, 1, 2, 5]
        sgd.step(dummy_closure)
        assert data == [0, 1, 2, 5] * 2
        opt.step(dummy_closure)
        assert data == [0, 1, 2, 5] * 3
    finally:
        for handle in handles:
            handle.remove()
    opt.step(dummy_closure)
    sgd.step(dummy_closure)
    assert data == [0, 1, 2, 5] * 3


@prop
def deepcopy_copies_all_public_attrs(factory: Factory) -> None:
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = factory(params)
    for _ in range(3):
        opt.step(dummy_closure)
    copied = copy.deepcopy(opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(copied) if not k.startswith("_")}
    # The constructor's hyperparameters other than the groups' options are attributes, and the copy has their values.
    hyperparameters = set(inspect.signature(factory).parameters) - {"params", "lr", "weight_decay", "foreach", "fused"}
    assert hyperparameters <= public
    assert {k: getattr(copied, k) for k in hyperparameters} == {k: getattr(opt, k) for k in hyperparameters}


@prop
def step_returns_the_closures_loss(factory: Factory) -> None:
    """test_second_order_optims_return_consistent_types, for an optimizer that needs its loss: step() returns what
    the closure returned (same object, same type) whether the step is taken, skipped (a non-finite loss, on the shared
    base: KoalaPlusPlus has no skip rule) or a no-op."""
    params = [Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))]
    opt = factory(params)
    non_finite = [torch.tensor([float("nan")])] if factory in SHARED_BASE.values() else []
    for returned in (torch.tensor([10.0]), 10.0, 10, *non_finite):
        for with_grad in (True, False):
            for p in params:
                p.grad = torch.rand_like(p) if with_grad else None
            skipped = with_grad and isinstance(returned, Tensor) and bool(returned.isnan().any())
            expect: Any = pytest.warns(RuntimeWarning, match="skipped a step") if skipped else contextlib.nullcontext()
            with expect:
                assert opt.step(lambda r=returned: r) is returned


@prop
def non_empty_state(factory: Factory) -> None:
    """test_non_empty_state: after a step every state entry holds something (KOALA-V keeps its filter under the
    first parameter only; it adds no empty entries for the others), also after an eval/train switch."""
    model = nn.Linear(5, 5)
    inpt = torch.rand(2, 5)
    opt = factory(model.parameters())
    opt.zero_grad()
    model(inpt).sum().backward()
    opt.step(lambda: 1.0)
    if factory in SHARED_BASE.values():  # (KoalaPlusPlus has no eval/train)
        opt.eval()  # type: ignore[attr-defined]
        opt.train()  # type: ignore[attr-defined]
    assert len(opt.state) > 0
    for state in opt.state.values():
        assert len(state) > 0


@prop
def zero_grad(factory: Factory) -> None:
    """Optimizer.zero_grad, as inherited: set_to_none (the default) drops the gradients, False zeroes them."""
    for choice in foreach_choices(factory):
        model = nn.Linear(3, 2)
        opt = factory(model.parameters(), **choice)
        model(torch.rand(4, 3)).sum().backward()
        opt.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())


@prop
def defaults_to_multi_tensor(factory: Factory) -> None:
    """test_defaults_changed_to_foreach, on the CPU: foreach=None takes the multi-tensor path (the fused kernels,
    or torch's foreach ops where they are off), never the single-tensor loop."""
    for fused in (None, False):
        model = nn.Linear(5, 5)
        opt = factory(model.parameters(), fused=fused)
        model(torch.rand(2, 5)).square().sum().backward()
        opt.step(lambda: 1.0)
        assert float(opt.state[model.weight]["step"]) == 1
        assert path_name(opt) == ("fused" if fused is None and F.FUSED_BY_DEFAULT["cpu"] else "foreach")


@prop
def filter_dtype_ignores_default_dtype(factory: Factory) -> None:
    """test_set_default_dtype_works_with_foreach, for KOALA's own scalars: under any default dtype the filter's
    state is float64 and the steps are those taken under float32."""
    outcomes = []
    for default in (torch.float32, torch.float64, torch.float16):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            torch.manual_seed(0)
            weight = Parameter(torch.randn(10, 5, dtype=torch.float32))
            inpt = torch.randn(5, dtype=torch.float32)
            opt = factory([weight])
            for _ in range(4):
                opt.step(closure_for(opt, lambda w=weight, i=inpt: w.mv(i).square().sum()))
        finally:
            torch.set_default_dtype(previous)
        assert all(v.dtype == torch.float64 for k, v in opt.state[weight].items() if k in ("step", "covariance"))
        outcomes.append(weight.detach().clone())
    equal(outcomes[1], outcomes[0])
    equal(outcomes[2], outcomes[0])


_ONE_PATH = "one path, a loop over tensors"
#: The cells that do not apply, with the reason.
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    ("koalapp", "foreach_matches_forloop"): _ONE_PATH,
    ("koalapp", "mixed_dtypes_match_forloop"): _ONE_PATH,
    ("koalapp", "defaults_to_multi_tensor"): _ONE_PATH,
    ("koalapp", "can_load_older_state_dict"): "no param-group option added since its first release",
    ("koalapp", "load_nontensor_step"): "no step counter in its state",
}
CELLS = [
    pytest.param(factory, check, id=f"{name}-{check_name}")
    for name, factory in FACTORIES.items()
    for check_name, check in PROPERTIES.items()
    if (name, check_name) not in NOT_APPLICABLE
]


@pytest.mark.parametrize(("factory", "check"), CELLS)
def test_torch_generic_property(factory: Factory, check: Check) -> None:
    check(factory)
