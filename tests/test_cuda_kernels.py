"""The Triton kernels of the CUDA multi-tensor path against the same path through `torch._foreach_*`.

Runs on a CUDA device, and in Triton's interpreter on the CPU where Triton is installed: CPU-only torch builds do not
ship it, so the `dev` extra installs it on Linux (where it has wheels), and every test run checks the kernels' math;
elsewhere both are skipped. The interpreter must be chosen before Triton is imported: that case runs this file again
in a subprocess with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from koala import KoalaDiag, KoalaM, KoalaV, cuda_kernels
from koala import functional as F

OPTIMIZERS = {"koala-v": KoalaV, "koala-m": KoalaM, "koala-diag": KoalaDiag}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRETED else ["cuda"]


def trajectory(
    factory: Any,
    device: str,
    dtype: torch.dtype,
    kernels: bool,
    weight_decay: float,
    keep_grads: bool = False,
    builds: list[int] | None = None,
) -> Any:
    """12 steps through two groups (lr and weight decay), a block without gradient, a zero-gradient block on some
    steps, a NaN loss and an lr change; then the posterior weights and the state. `keep_grads`: zero the gradients
    in place (their addresses stay); `builds` receives how many step plans the kernels built."""
    torch.manual_seed(3)
    big = nn.Parameter(torch.randn(70, 600, dtype=dtype, device=device) * 0.01)  # 42k elements: 11 tiles
    small = nn.Parameter(torch.randn(7, dtype=dtype, device=device))
    frozen = nn.Parameter(torch.randn(5, dtype=dtype, device=device))
    extra = nn.Parameter(torch.randn(3, 3, dtype=dtype, device=device))
    groups = [{"params": [big, small, frozen]}, {"params": [extra], "lr": 0.5, "weight_decay": weight_decay}]
    opt = factory(groups, fused=True) if kernels else factory(groups, foreach=True, fused=False)
    gen = torch.Generator().manual_seed(5)
    data = torch.randn(32, 600, generator=gen, dtype=dtype).to(device)
    for k in range(12):
        losses = (data @ big.T).pow(2).mean(1) + (small.sum() - k) ** 2 + extra.pow(2).sum() * (k % 3 != 0)
        if k == 5:
            losses = losses * float("nan")
        if k == 7:
            opt.param_groups[0]["lr"] = 0.7
        opt.zero_grad(set_to_none=not keep_grads)
        losses.mean().backward()
        frozen.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the NaN step's skip warning, where it is issued
            opt.step(loss=losses.detach())
        assert opt._path(opt._blocks()).name == ("triton" if kernels else "foreach")
    if builds is not None and opt._workspace is not None:
        builds.append(opt._workspace.builds)
    opt.eval()
    return [p.detach().cpu() for p in (big, small, frozen, extra)], copy.deepcopy(opt.state_dict()["state"])


def tolerance(factory: Any, dtype: torch.dtype) -> dict[str, float]:
    """How far the kernels may drift from the foreach path over `trajectory`. KoalaDiag's Polyak-type step drives the
    quadratic's residuals towards zero, where rounding differences grow: its CPU kernels differ from the foreach path
    by as much (float32 3.4e-5, float64 4.7e-13 on the large block after 12 steps), so it gets wider bounds."""
    if factory is KoalaDiag:
        return {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-4}
    return {"rtol": 1e-10, "atol": 1e-13} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-7}


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_kernels.AVAILABLE, reason="needs Triton")
@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs a CUDA device or the interpreter")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("factory", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_kernels_match_the_foreach_path(factory: Any, dtype: torch.dtype, weight_decay: float, device: str) -> None:
    weights, state = trajectory(factory, device, dtype, True, weight_decay)
    ref_weights, ref_state = trajectory(factory, device, dtype, False, weight_decay)
    tol = tolerance(factory, dtype)
    for a, b in zip(weights, ref_weights, strict=True):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(state, ref_state, **tol)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or INTERPRETED, reason="needs Triton")
def test_kernels_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not interpreter"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "22 passed" in run.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_kernels.AVAILABLE, reason="needs Triton")
@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs a CUDA device or the interpreter")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (128,), (3, 700), (5000,)])
def test_loss_moments_kernel(shape: tuple[int, ...], device: str) -> None:
    dtypes = [torch.float16, torch.float32, torch.float64] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        loss = (torch.rand(shape, generator=torch.Generator().manual_seed(1)) + 1).to(device, dtype)
        expected = F.loss_moments(loss, torch.device(device), torch.float64)
        torch.testing.assert_close(cuda_kernels.loss_moments(loss, torch.device(device)), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_kernels.AVAILABLE, reason="needs Triton")
@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs a CUDA device or the interpreter")
@pytest.mark.parametrize("device", DEVICES)
def test_the_step_plan_is_rebuilt_only_when_its_inputs_change(device: str) -> None:
    """The cached plan (checks, pointer table, runs) serves every step whose tensors, dtypes, sizes, layouts, lrs and
    weight decays are those it was built for, and is rebuilt, exactly as without a cache, when one of them changes."""
    where = torch.empty(0, device=device).device  # with its index ("cuda:0"), as the optimizer's state has it
    params = [torch.randn(n, device=where) for n in (5000, 7, 300)]
    grads: list[torch.Tensor | None] = [torch.randn_like(p) for p in params]
    velocities = [torch.zeros_like(p) for p in params]
    averages = [torch.zeros_like(p) for p in params]
    lrs = [1.0, 1.0, 0.5]
    workspace = None

    def plan(cached: bool = True) -> tuple[F.Blocks, cuda_kernels.Layout | None]:
        blocks = F.Blocks(list(params), list(grads), list(lrs), [0.0] * len(params))
        layout = cuda_kernels.plan(blocks, where, workspace if cached else None, velocities, averages)
        return blocks, layout

    def check(builds: int) -> None:
        """The step's plan equals a plan built afresh, and the cache was (re)built `builds` times in all."""
        nonlocal workspace
        blocks, layout = plan()
        fresh, fresh_layout = plan(cached=False)
        assert layout is not None
        assert fresh_layout is not None
        workspace = layout.workspace
        assert workspace.builds == builds
        assert blocks._runs == fresh._runs
        assert (workspace.rows == fresh_layout.workspace.rows).all()
        assert torch.equal(workspace.table.cpu(), fresh_layout.workspace.table.cpu())

    check(builds=1)
    for _ in range(3):
        check(builds=1)  # unchanged: the cached plan
    blocks, _ = plan()
    assert workspace is not None
    assert blocks._runs is workspace.runs
    lrs[1] = 0.5  # an lr (a scheduler's step): the runs change
    check(builds=2)
    grads[2] = None  # a block without gradient
    check(builds=3)
    grads[2] = torch.randn_like(params[2])  # a gradient again, at another address
    check(builds=4)
    params[1], grads[1] = params[1].double(), torch.randn(7, dtype=torch.float64, device=where)
    velocities[1], averages[1] = velocities[1].double(), averages[1].double()  # of its dtype, as the optimizer's
    check(builds=5)
    # Where the kernels do not apply (a gradient that is not contiguous) there is no plan, and the cached one is
    # neither used nor changed: a step with the earlier tensors uses it again.
    kept = grads[2]
    grads[2] = torch.randn(300, 2, device=where)[:, 0]
    assert plan()[1] is None
    grads[2] = kept
    check(builds=5)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_kernels.AVAILABLE, reason="needs Triton")
@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs a CUDA device or the interpreter")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factory", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_steps_on_the_cached_plan_match_the_foreach_path(factory: Any, device: str) -> None:
    """Gradients zeroed in place keep their addresses, so the steps reuse the cached plan (rebuilt at the first step
    and at the lr change only), and the trajectory is the foreach path's."""
    builds: list[int] = []
    weights, state = trajectory(factory, device, torch.float64, True, 1e-3, keep_grads=True, builds=builds)
    ref_weights, ref_state = trajectory(factory, device, torch.float64, False, 1e-3, keep_grads=True)
    assert builds == [2]
    tol = tolerance(factory, torch.float64)
    for a, b in zip(weights, ref_weights, strict=True):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(state, ref_state, **tol)
