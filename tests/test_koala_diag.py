"""KoalaDiag against an independent float64 implementation of its equations, and the engineering contract KoalaM
meets: the step protocol, the skip rule, checkpoints (weights_only), copies, GradScaler, DDP, torch.compile, the
registry. CUDA checks run only where torch sees a device."""

from __future__ import annotations

import copy
import functools
import io
import math
import os
import pickle
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from koala import KoalaDiag, diag_cpu_kernels, optimizers
from koala.koala_diag import per_sample_losses
from tests.optimizer_cases import trained_weights

STEPS = 40
LR_CHANGE_AT = 20
THRESHOLD = 1e-9


class ReferenceKoalaDiag:
    """The equations of the KoalaDiag docstring, written out per tensor in float64 (nothing shared with the library).

    Parameter groups are given as (first index, stop index, lr, weight decay); `None` gradients are frozen blocks.
    """

    def __init__(self, weights: list[Tensor], s0: float = 0.1, q: float = 1.0, beta2: float = 0.999) -> None:
        self.x = [w.detach().to(torch.float64).clone() for w in weights]
        self.v = [torch.zeros_like(x) for x in self.x]
        self.s = s0 + q  # predicted covariance of the first step
        self.q = q
        self.r = 1.0
        self.t = 0
        self.beta2 = beta2
        self.eps = 1e-8

    def step(self, losses: Tensor, grads: list[Tensor | None], lrs: list[float], decays: list[float]) -> None:
        values = losses.detach().to(torch.float64)
        if values.dim() > 1:
            values = torch.stack([row.mean() for row in values.reshape(values.shape[0], -1)])
        values = values.reshape(-1)
        count = values.numel()
        big_l = float(values.mean())
        norms = [None if g is None else float(g.to(torch.float64).norm()) for g in grads]
        finite = math.isfinite(big_l) and all(n is None or math.isfinite(n) for n in norms)
        updated = [finite and n is not None and n >= THRESHOLD for n in norms]
        if not any(updated):
            return
        self.t += 1
        if count > 1:
            mean = sum(float(v) for v in values) / count
            variance = sum((float(v) - mean) ** 2 for v in values) / (count - 1)
            self.r = 0.9 * self.r + 0.1 * variance
        directions, new_v, sigmas = {}, {}, {}
        sigma_total, elements, l2 = 0.0, 0, 0.0
        for b, g in enumerate(grads):
            if not updated[b]:
                continue
            assert g is not None
            a = g.to(torch.float64) + decays[b] * self.x[b]
            v = self.beta2 * self.v[b] + (1 - self.beta2) * a * a
            sigma = torch.sqrt(v / (1 - self.beta2**self.t)) + self.eps
            directions[b], new_v[b], sigmas[b] = a, v, sigma
            sigma_total += float(sigma.sum())
            elements += sigma.numel()
            l2 += decays[b] / 2 * float((self.x[b] * self.x[b]).sum())
        c = sigma_total / elements
        big_g = c * sum(float((directions[b] * directions[b] / sigmas[b]).sum()) for b in directions)
        innovation = self.s * big_g + self.r
        for b in directions:
            self.x[b] = self.x[b] - lrs[b] * self.s * (big_l + l2) / innovation * c * directions[b] / sigmas[b]
            self.v[b] = new_v[b]
        self.s = self.s * self.r / innovation + self.q


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batch(k: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + k % 8)
    x = torch.randn(12, 4, 5, generator=gen, dtype=dtype)  # 12 sequences of 4 "tokens"
    teacher = torch.tensor([[1.0, -2.0, 0.5, 0.0, 1.0], [0.0, 1.0, -1.0, 2.0, 0.0], [-1.0, 0.0, 0.0, -1.0, 1.5]])
    return x, (x @ teacher.to(dtype).T).argmax(-1)


def token_losses(model: nn.Module, k: int) -> Tensor:
    """Per-token cross-entropies, shape (12, 4)."""
    dtype = next(model.parameters()).dtype
    x, y = batch(k, dtype)
    return nn.functional.cross_entropy(model(x).transpose(1, 2), y, reduction="none")


def train_step(model: nn.Module, opt: torch.optim.Optimizer, k: int) -> Tensor:
    losses = token_losses(model, k)
    opt.zero_grad()
    losses.mean().backward()
    opt.step(loss=losses.detach())
    return losses.detach()


def run(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> list[float]:
    return [float(train_step(model, opt, k).mean()) for k in range(start, start + steps)]


#: The constructor arguments that choose each path on the CPU: the loop, `torch._foreach_*`, the fused CPU kernels.
PATH_OPTIONS: dict[str, dict[str, Any]] = {
    "single": {"foreach": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"fused": True},
}
PATHS = list(PATH_OPTIONS)


def build(params: Any, path: str, **kwargs: Any) -> KoalaDiag:
    """KoalaDiag on one path."""
    return KoalaDiag(params, **PATH_OPTIONS[path], **kwargs)


# ---- against the reference ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_matches_the_float64_reference(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two groups (lr, weight decay), a frozen tensor, per-token losses, an lr change midway: 40 steps agree."""
    model = make_model()
    params = list(model.parameters())
    params[3].requires_grad_(False)  # the middle layer's bias: a block that never has a gradient
    groups = [
        {"params": params[:2], "lr": 1.0, "weight_decay": 1e-3},
        {"params": params[2:], "lr": 0.7, "weight_decay": 0.0},
    ]
    opt = build(groups, path)
    calls: list[int] = []
    update = diag_cpu_kernels.update
    monkeypatch.setattr(diag_cpu_kernels, "update", lambda *args: calls.append(1) or update(*args))  # a spy
    reference = ReferenceKoalaDiag(params)
    for k in range(STEPS):
        if k == LR_CHANGE_AT:
            for group in opt.param_groups:
                group["lr"] *= 0.5
        lrs = [g["lr"] for g in opt.param_groups for _ in g["params"]]
        decays = [g["weight_decay"] for g in opt.param_groups for _ in g["params"]]
        losses = token_losses(model, k)
        opt.zero_grad()
        losses.mean().backward()
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        opt.step(loss=losses.detach())
        reference.step(losses, grads, lrs, decays)
        for p, x in zip(params, reference.x, strict=True):
            torch.testing.assert_close(p.detach(), x, rtol=1e-10, atol=1e-12)
    state = opt.state[params[0]]
    assert float(state["step"]) == STEPS
    assert float(state["covariance"]) == pytest.approx(reference.s, rel=1e-10)
    assert float(state["measurement_noise"]) == pytest.approx(reference.r, rel=1e-10)
    for p, v in zip(params, reference.v, strict=True):
        torch.testing.assert_close(opt.state[p]["second_moment"], v, rtol=1e-10, atol=1e-16)
    assert bool(calls) == (path == "fused")  # each path ran as named
    assert opt._path(opt._blocks()).name == path


@pytest.mark.parametrize("path", ["foreach", "fused"])
def test_float32_paths_match_the_loop(path: str) -> None:
    trajectories = []
    for which in ("single", path):
        model = make_model(torch.float32)
        opt = build(model.parameters(), which, weight_decay=1e-3)
        run(model, opt, 20)
        trajectories.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*trajectories, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["single", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_torch_paths_stay_finite_and_learn(path: str, dtype: torch.dtype) -> None:
    """Half-precision parameters: the direction a / sigma is formed in float32 (eps = 1e-8 is 0 in float16, where a
    zero second moment made 0 / 0 = NaN weights at the first step), so the weights stay finite and the loss falls
    as in float32."""
    model = make_model(torch.float32).to(dtype)
    opt = build(model.parameters(), path)
    first = last = 0.0
    for k in range(16):
        x, y = batch(k % 2, dtype)
        losses = nn.functional.cross_entropy(model(x).transpose(1, 2).float(), y, reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses.detach())
        last = float(losses.detach().mean())
        first = last if k == 0 else first
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state[next(model.parameters())]["second_moment"].dtype == dtype
    assert last < 0.3 * first  # (1.12 -> 0.17 in float32, float16 and bfloat16 alike)


def test_per_token_losses_are_averaged_per_sequence() -> None:
    """A (B, T) loss gives the step of its per-sequence means: the measurement's samples are the sequences."""
    results = []
    for per_sequence in (False, True):
        model = make_model()
        opt = KoalaDiag(model.parameters())
        for k in range(5):
            losses = token_losses(model, k)
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses.detach().mean(1) if per_sequence else losses.detach())
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert per_sample_losses(torch.ones(3, 4, 5)).shape == (3,)
    assert per_sample_losses(torch.ones(3)).shape == (3,)
    assert per_sample_losses(torch.tensor(2.0)).shape == ()


def test_loss_scale_invariance_with_a_matching_fixed_noise() -> None:
    """Losses times k with R times k^2: the same trajectory (D, the gap over S and the direction compensate)."""
    trajectories = []
    for scale in (1.0, 37.0):
        model = make_model()
        opt = KoalaDiag(model.parameters(), measurement_noise=0.5 * scale**2, eps=1e-30)
        for k in range(10):
            losses = token_losses(model, k) * scale
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses.detach())
        trajectories.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*trajectories, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_learns() -> None:
    model = make_model(torch.float32)
    opt = KoalaDiag(model.parameters())
    losses = run(model, opt, 60)
    assert sum(losses[-8:]) < 0.5 * sum(losses[:8])


# ---- the step protocol and the skip rule ----------------------------------------------------------------------------


def test_zero_dim_loss_and_real_numbers_leave_r_alone() -> None:
    model = make_model()
    opt = KoalaDiag(model.parameters())
    for loss in (None, 2.5, 3, torch.tensor(1.5)):
        losses = token_losses(model, 0)
        opt.zero_grad()
        losses.mean().backward()
        before = [p.detach().clone() for p in model.parameters()]
        given = losses.detach() if loss is None else loss
        assert opt.step(loss=given) is given
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        if loss is None:
            noise = float(opt.state[next(model.parameters())]["measurement_noise"])
        else:
            assert float(opt.state[next(model.parameters())]["measurement_noise"]) == noise


def test_closure_returns_the_loss() -> None:
    model = make_model()
    opt = KoalaDiag(model.parameters())

    def closure() -> Tensor:
        opt.zero_grad()
        losses = token_losses(model, 0)
        losses.mean().backward()
        return losses

    assert opt.step(closure).shape == (12, 4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_non_finite_values_skip_the_step(path: str, bad: str) -> None:
    model = make_model()
    opt = build(model.parameters(), path)
    run(model, opt, 3)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    losses = token_losses(model, 3)
    opt.zero_grad()
    losses.mean().backward()
    if bad == "loss":
        losses = losses.detach().clone()
        losses[0, 0] = float("nan")
    else:
        next(model.parameters()).grad[0, 0] = float("inf")  # type: ignore[index]
    with pytest.warns(RuntimeWarning, match="skipped a step: non-finite"):
        opt.step(loss=losses.detach())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    torch.testing.assert_close(opt.state_dict(), state, rtol=0, atol=0)
    run(model, opt, 2, start=4)  # and it carries on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_vanishing_gradients_skip_and_no_grad_is_a_no_op() -> None:
    model = make_model()
    opt = KoalaDiag(model.parameters())
    assert opt.step(loss=torch.ones(4)) is not None  # no gradient anywhere: nothing happens, no state
    assert not opt.state
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.warns(RuntimeWarning, match="no tensor has a gradient norm"):
        opt.step(loss=torch.ones(4))
    assert float(opt.state[next(model.parameters())]["step"]) == 0


def test_errors() -> None:
    params = list(make_model().parameters())
    for kwargs, message in [
        ({"beta2": 1.0}, "beta2"),
        ({"beta2": -0.1}, "beta2"),
        ({"eps": 0.0}, "eps"),
        ({"initial_covariance": 0.0}, "initial_covariance"),
        ({"process_noise": -1.0}, "process_noise"),
        ({"measurement_noise": 0.0}, "measurement_noise"),
        ({"noise_decay": 1.5}, "noise_decay"),
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": float("nan")}, "weight_decay"),
    ]:
        with pytest.raises(ValueError, match=message):
            KoalaDiag(params, **kwargs)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        KoalaDiag(params, fused=True, foreach=True)
    meta = r"take float32/float64 CPU tensors and CUDA tensors \(with Triton\), got a torch\.float32 parameter on meta"
    with pytest.raises(RuntimeError, match=meta):
        KoalaDiag([nn.Parameter(torch.ones(2, device="meta"))], fused=True)
    opt = KoalaDiag(params)
    with pytest.raises(TypeError, match="neither"):
        opt.step()
    with pytest.raises(TypeError, match="non-empty float tensor"):
        opt.step(loss=torch.tensor([1, 2]))
    opt.eval()
    with pytest.raises(RuntimeError, match="evaluation mode"):
        opt.step(loss=torch.ones(2))
    opt.train()


# ---- checkpoints and copies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_dict_round_trip_weights_only(dtype: torch.dtype) -> None:
    model = make_model(dtype)
    opt = KoalaDiag(model.parameters(), weight_decay=1e-3)
    expected = run(model, opt, 10)
    expected_params = [p.detach().clone() for p in model.parameters()]

    model = make_model(dtype)
    opt = KoalaDiag(model.parameters(), weight_decay=1e-3)
    first = run(model, opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model = make_model(dtype, seed=123)
    model.load_state_dict(checkpoint["model"])
    opt = KoalaDiag(model.parameters(), weight_decay=1e-3)
    opt.load_state_dict(checkpoint["optimizer"])
    state = opt.state[next(model.parameters())]
    assert state["covariance"].dtype == state["measurement_noise"].dtype == state["step"].dtype == torch.float64
    assert state["second_moment"].dtype == dtype
    assert first + run(model, opt, 5, start=5) == expected
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected_params, strict=True))


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))], ids=["deepcopy", "pickle"])
def test_copy_steps_like_the_original(copier: Any) -> None:
    model = make_model()
    opt = KoalaDiag(model.parameters(), initial_covariance=0.3, beta2=0.99)
    run(model, opt, 3)
    twin_model, twin = copier((model, opt))
    assert twin.beta2 == 0.99
    assert twin.initial_covariance == 0.3
    assert run(model, opt, 4, start=3) == run(twin_model, twin, 4, start=3)


def test_repr_and_registry() -> None:
    model = make_model()
    opt = optimizers.create("koala-diag", model.parameters(), beta2=0.99)
    assert isinstance(opt, KoalaDiag)
    assert "beta2=0.99" in repr(opt)
    assert "process_noise=1.0" in repr(opt)
    defaults = optimizers.get("koala-diag").hyperparameters()
    assert defaults["lr"] == 1.0
    assert defaults["beta2"] == 0.999
    assert defaults["initial_covariance"] == 0.1


def test_half_precision_parameters() -> None:
    model = make_model(torch.bfloat16)
    opt = KoalaDiag(model.parameters())
    run(model, opt, 5)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state[next(model.parameters())]["second_moment"].dtype == torch.bfloat16


# ---- GradScaler, DDP, torch.compile --------------------------------------------------------------------------------


def test_grad_scaler_matches_unscaled_and_skips_overflow() -> None:
    results = []
    for use_scaler in (False, True):
        model = make_model(torch.float32)
        opt = KoalaDiag(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=use_scaler)
        for k in range(6):
            losses = token_losses(model, k)
            opt.zero_grad()
            scaler.scale(losses.mean()).backward()
            scaler.step(opt, loss=losses.detach())  # the unscaled losses
            scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    losses = token_losses(model, 7)
    scaler.scale(losses.mean() * float("inf")).backward()
    scaler.step(opt, loss=losses.detach())
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert float(opt.state[next(model.parameters())]["step"]) == 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(make_model(torch.float32))
        opt = KoalaDiag(model.parameters(), weight_decay=1e-3)
        for k in range(8):
            losses = token_losses(model, k)[rank * 6 : rank * 6 + 6]  # each replica sees half the sequences
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses.detach())
        torch.save([p.detach() for p in model.module.parameters()], f"{out}/rank{rank}.pt")
        dist.barrier()  # leave together (see tests/test_integrations.py)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_replicas_take_the_full_batch_step(tmp_path: Any) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    model = make_model(torch.float32)
    opt = KoalaDiag(model.parameters(), weight_decay=1e-3)
    run(model, opt, 8)  # one process on the whole batch: the all-reduced loss moments make DDP equal to it
    for a, b, c in zip(rank0, rank1, model.parameters(), strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_step_matches_eager() -> None:
    trajectories = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = make_model(torch.float32)
        opt = KoalaDiag(model.parameters(), weight_decay=1e-3)
        losses_of = functools.partial(token_losses, model)
        trajectories.append(trained_weights(model, opt, losses_of, 5, {} if compiled else None))
    for a, b in zip(*trajectories, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- CUDA -----------------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_cuda_matches_cpu_in_float64() -> None:
    results = []
    for device in ("cpu", "cuda"):
        model = make_model().to(device)
        opt = KoalaDiag(model.parameters(), weight_decay=1e-3)
        for k in range(10):
            x, y = batch(k)
            losses = nn.functional.cross_entropy(model(x.to(device)).transpose(1, 2), y.to(device), reduction="none")
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses.detach())
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.gpu
@cuda
def test_cuda_step_does_not_synchronise() -> None:
    model = make_model(torch.float32).cuda()
    opt = KoalaDiag(model.parameters(), weight_decay=1e-4)
    x, y = batch(0, torch.float32)
    x, y = x.cuda(), y.cuda()
    for scale in (1.0, 1.0, float("nan")):  # the first step creates the state; the skip is a mask too
        losses = nn.functional.cross_entropy(model(x).transpose(1, 2), y, reduction="none") * scale
        opt.zero_grad()
        losses.mean().backward()
        torch.cuda.synchronize()
        if scale != 1.0 or "step" in opt.state[next(model.parameters())]:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(loss=losses.detach())
        finally:
            torch.cuda.set_sync_debug_mode("default")
