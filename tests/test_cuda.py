"""CUDA checks: parity with the CPU in float64, no host-device synchronisation in step(), the sync-free skip path.

Collected everywhere, run only where torch sees a CUDA device (`pytest -m gpu`).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from koala import KoalaDiag, KoalaM, KoalaV

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
OPTIMIZERS = {"koala-v": KoalaV, "koala-m": KoalaM, "koala-diag": KoalaDiag}
parametrize_opt = pytest.mark.parametrize("factory", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())


def make_model(device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return model.to(device=device, dtype=dtype)


def step(model: nn.Module, opt: torch.optim.Optimizer, k: int, scale: float = 1.0) -> None:
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(64, 32, generator=gen).to(param.device, param.dtype)
    y = torch.randint(0, 10, (64,), generator=gen).to(param.device)
    losses = nn.functional.cross_entropy(model(x), y, reduction="none") * scale
    opt.zero_grad()
    losses.mean().backward()
    opt.step(loss=losses)


@parametrize_opt
@pytest.mark.parametrize("foreach", [False, True])
def test_cuda_matches_cpu_in_float64(factory: Any, foreach: bool) -> None:
    results = []
    for device in ("cpu", "cuda"):
        model = make_model(device, torch.float64)
        opt = factory(model.parameters(), weight_decay=1e-3, foreach=foreach)
        for k in range(20):
            step(model, opt, k)
        opt.eval()
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@parametrize_opt
@pytest.mark.parametrize("foreach", [False, True])
def test_step_does_not_synchronise(factory: Any, foreach: bool) -> None:
    model = make_model("cuda")
    opt = factory(model.parameters(), weight_decay=1e-4, foreach=foreach)
    step(model, opt, 0)  # the first step creates the state (host-to-device copies of the initial constants)
    x = torch.randn(64, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    for scale in (1.0, float("nan")):  # the skip path is a mask on the device as well
        losses = nn.functional.cross_entropy(model(x), y, reduction="none") * scale
        opt.zero_grad()
        losses.mean().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(loss=losses)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@parametrize_opt
def test_non_finite_loss_skips_on_cuda(factory: Any) -> None:
    model = make_model("cuda")
    opt = factory(model.parameters())
    for k in range(3):
        step(model, opt, k)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    step(model, opt, 3, scale=float("nan"))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    torch.testing.assert_close(opt.state_dict(), state, rtol=0, atol=0)


@parametrize_opt
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cuda(factory: Any, dtype: torch.dtype) -> None:
    model = make_model("cuda", dtype)
    opt = factory(model.parameters())
    for k in range(10):
        step(model, opt, k)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state[next(model.parameters())]["covariance"].dtype == torch.float64


@parametrize_opt
def test_grad_scaler_with_float16_autocast_on_cuda(factory: Any) -> None:
    """The AMP recipe: fp16 autocast, scaled backward, `scaler.step(opt, loss=unscaled losses)`; no syncs added."""
    model = make_model("cuda")
    opt = factory(model.parameters())
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    for k in range(8):
        gen = torch.Generator().manual_seed(k)
        x = torch.randn(64, 32, generator=gen).cuda()
        y = torch.randint(0, 10, (64,), generator=gen).cuda()
        with torch.autocast("cuda", dtype=torch.float16):
            losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        opt.zero_grad()
        scaler.scale(losses.mean()).backward()
        scaler.step(opt, loss=losses.detach().float())
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(opt.state[next(model.parameters())]["step"]) == 8
    # An overflowing backward: the scaler skips the optimizer, nothing moves.
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.float16):
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    opt.zero_grad()
    scaler.scale(losses.mean() * float("inf")).backward()
    scaler.step(opt, loss=losses.detach().float())
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.slow
@parametrize_opt
def test_compiled_step_matches_eager_on_cuda(factory: Any) -> None:
    trajectories = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = make_model("cuda")
        opt = factory(model.parameters(), weight_decay=1e-3)

        def run_step(losses: torch.Tensor, opt: torch.optim.Optimizer = opt) -> None:
            opt.step(loss=losses)

        stepper = torch.compile(run_step) if compiled else run_step
        for k in range(5):
            gen = torch.Generator().manual_seed(k)
            x = torch.randn(64, 32, generator=gen).cuda()
            y = torch.randint(0, 10, (64,), generator=gen).cuda()
            losses = nn.functional.cross_entropy(model(x), y, reduction="none")
            opt.zero_grad()
            losses.mean().backward()
            stepper(losses.detach())
        trajectories.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*trajectories, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_training_loop_on_cuda_with_resume(optimizer: str, tmp_path: Any) -> None:
    """The training loop on the GPU with bf16 autocast: it learns, and a resumed run follows the uninterrupted one."""
    from koala import train

    full = train.run("digits-mlp", optimizer, seed=1, epochs=4, device="cuda", amp=True)
    assert full.device.startswith("cuda")
    accuracy = full.final("val_accuracy")
    assert accuracy is not None
    assert accuracy > 0.9
    train.run("digits-mlp", optimizer, seed=1, epochs=2, device="cuda", amp=True, checkpoint_dir=tmp_path)
    resumed = train.run("digits-mlp", optimizer, seed=1, epochs=4, device="cuda", amp=True, checkpoint_dir=tmp_path)
    assert resumed.final("val_accuracy") == pytest.approx(accuracy, abs=0.02)
