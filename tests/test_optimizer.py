"""The torch optimizer-test categories for KoalaV and KoalaM, plus KOALA's edge cases, through the public API."""

from __future__ import annotations

import copy
import io
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from koala import KoalaM, KoalaV, cpu_kernels

OPTIMIZERS = {"koala-v": KoalaV, "koala-m": KoalaM}
DTYPES = [torch.float32, torch.float64]
Factory = Callable[..., torch.optim.Optimizer]


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


parametrize_opt = pytest.mark.parametrize("factory", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())


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


_CACHE_PROBE = """
import sys, numpy as np, torch
from koala import cpu_kernels
kernel = getattr(cpu_kernels, "_vanilla_update_" + sys.argv[1])
x, g = torch.zeros(10), torch.ones(10)
addresses = [np.array([t.data_ptr()], dtype=np.int64) for t in (x, g)]
kernel(*addresses, np.array([10], dtype=np.int64), np.ones(1, dtype=np.float32), np.float32(0))
assert x.eq(-1).all()
print(kernel.stats.cache_hits.total(), kernel.stats.cache_misses.total())
"""


def test_parallel_kernel_never_loads_the_serial_one_from_the_cache(tmp_path: Any) -> None:
    """Both variants of a kernel come from one function; Numba's cache must keep them apart (it keys entries by name
    and signature only), or the largest tensors run the serial loop in every later process."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def probe(variant: str) -> tuple[int, int]:
        run = subprocess.run([sys.executable, "-c", _CACHE_PROBE, variant], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        hits, misses = run.stdout.split()
        return int(hits), int(misses)

    assert probe("serial") == (0, 1)  # compiled and saved
    assert probe("parallel") == (0, 1)  # its own entry: compiled, not the serial one loaded
    assert probe("parallel") == (1, 0)  # and cached from then on


_WARM_UP_PROBE = """
import sys, torch
from koala import KoalaM, KoalaV, cpu_kernels
dtype = getattr(torch, sys.argv[1])
cpu_kernels.warm_up(dtype)
kernels = [k for group in cpu_kernels._KERNELS.values() for k in group]
loaded = [len(k.signatures) for k in kernels]
for cls in (KoalaV, KoalaM):
    for weight_decay in (0.0, 1e-3):
        for size in (7, 1 << 17):  # serial and parallel kernels
            weight = torch.nn.Parameter(torch.randn(size, dtype=dtype))
            weight.grad = torch.randn(size, dtype=dtype)
            cls([weight], weight_decay=weight_decay).step(loss=torch.ones(4))
print(loaded, [len(k.signatures) for k in kernels])
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_warm_up_loads_every_kernel_a_step_uses(dtype: str) -> None:
    """After `cpu_kernels.warm_up`, no KOALA step (either variant, with and without weight decay, serial and parallel
    sizes) loads or compiles another kernel: the service calls it so that a trial's clock never counts that."""
    run = subprocess.run([sys.executable, "-c", _WARM_UP_PROBE, dtype], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    loaded, after = run.stdout.split("] [")
    assert loaded == "[" + ", ".join(["1"] * 8)
    assert after == ", ".join(["1"] * 8) + "]\n"


_THREADS_PROBE = """
import sys, numba, torch
from koala import KoalaM, KoalaV, cpu_kernels
calls = []
numba.set_num_threads = calls.append
torch.set_num_threads(int(sys.argv[1]))
torch.get_num_threads()  # torch's thread state initialised, as in any process that has trained
cpu_kernels.warm_up()
for cls in (KoalaV, KoalaM):
    weight = torch.nn.Parameter(torch.randn(1 << 17))  # large enough for the parallel kernels
    weight.grad = torch.randn(1 << 17)
    cls([weight], weight_decay=1e-3).step(loss=torch.ones(4))
print(sorted(set(calls)), torch.get_num_threads())
"""


def test_kernels_keep_torchs_thread_count() -> None:
    """torch's intra-op thread count survives `warm_up` and steps (Numba's OpenMP pool, started by either, shares
    the runtime and would raise it to the pool size). With one thread (a one-CPU Ray trial) the serial kernels run
    and Numba's thread count is not set either. Both made two one-CPU trials sharing two cores train 3-15x slower.
    With more threads the parallel kernels follow torch's count."""
    run = subprocess.run([sys.executable, "-c", _THREADS_PROBE, "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[] 1"
    if cpu_kernels.numba.config.NUMBA_NUM_THREADS > 1:
        run = subprocess.run([sys.executable, "-c", _THREADS_PROBE, "2"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "[2] 2"


def test_warm_up_rejects_other_dtypes() -> None:
    with pytest.raises(
        ValueError, match=r"dtype: the CPU kernels take torch.float32 or torch.float64, got torch.bfloat16"
    ):
        cpu_kernels.warm_up(torch.bfloat16)


@parametrize_opt
@pytest.mark.parametrize("dtype", DTYPES)
def test_foreach_matches_for_loop(factory: Factory, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Params and state agree between the loop, the foreach kernels and the fused CPU kernels (parallel and serial
    sizes, several groups, a block with zero gradient on some steps)."""
    results = []
    for foreach, fused in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(cpu_kernels, "ENABLED", fused)
        torch.manual_seed(3)
        # 419,899 elements: the parallel CPU kernels, over 26 chunks, the last one ending in a partial lane group.
        big = nn.Parameter(torch.randn(701, 599, dtype=dtype) * 0.01)
        small = nn.Parameter(torch.randn(7, dtype=dtype))
        extra = nn.Parameter(torch.randn(3, 3, dtype=dtype))
        opt = factory([{"params": [big, small]}, {"params": [extra], "lr": 0.5, "weight_decay": 1e-3}], foreach=foreach)
        gen = torch.Generator().manual_seed(5)
        data = torch.randn(32, 599, generator=gen, dtype=dtype)
        for k in range(12):
            losses = (data @ big.T).pow(2).mean(1) + (small.sum() - k) ** 2 + extra.pow(2).sum() * (k % 3 != 0)
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses.detach())
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


BAD_ARGUMENTS: list[tuple[type[Any], dict[str, Any], type[Exception], str]] = [
    (KoalaV, {"lr": -1.0}, ValueError, r"Invalid lr: -1\.0"),
    (KoalaV, {"lr": float("nan")}, ValueError, r"Invalid lr"),
    (KoalaV, {"weight_decay": -0.1}, ValueError, r"Invalid weight_decay"),
    (KoalaV, {"initial_covariance": 0.0}, ValueError, r"Invalid initial_covariance: 0\.0 \(expected > 0"),
    (KoalaV, {"process_noise": -1.0}, ValueError, r"Invalid process_noise"),
    (KoalaV, {"measurement_noise": 0.0}, ValueError, r"Invalid measurement_noise: 0\.0 \(expected > 0"),
    (KoalaV, {"noise_decay": 1.5}, ValueError, r"Invalid noise_decay: 1\.5 \(expected >= 0\.0 and <= 1\.0\)"),
    (KoalaV, {"foreach": "yes"}, ValueError, r"Invalid foreach"),
    (KoalaM, {"momentum": 1.2}, ValueError, r"Invalid momentum: 1\.2"),
    (KoalaM, {"momentum": True}, ValueError, r"Invalid momentum"),
    (KoalaM, {"initial_covariance": (0.1, 0.0)}, ValueError, r"expected \(P_xx, P_xp, P_pp\)"),
    (KoalaM, {"initial_covariance": (0.1, 1.0, 0.1)}, ValueError, r"not positive semidefinite"),
    (KoalaM, {"initial_covariance": (-0.1, 0.0, 0.1)}, ValueError, r"Invalid initial_covariance\[0\]"),
    (KoalaM, {"weight_process_noise": -1e-3}, ValueError, r"Invalid weight_process_noise"),
    (KoalaM, {"velocity_process_noise": -1e-3}, ValueError, r"Invalid velocity_process_noise"),
    (KoalaM, {"betas": (0.9, 0.99)}, TypeError, r"unexpected keyword argument 'betas'"),
]


@pytest.mark.parametrize(("factory", "kwargs", "error", "message"), BAD_ARGUMENTS)
def test_bad_constructor_arguments(
    factory: Factory, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        factory(make_model().parameters(), **kwargs)


@parametrize_opt
def test_empty_parameter_list_rejected(factory: Factory) -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        factory([])


@parametrize_opt
def test_integer_parameters_rejected(factory: Factory) -> None:
    with pytest.raises(ValueError, match="floating-point"):
        factory([torch.zeros(3, dtype=torch.int64)])


@parametrize_opt
def test_step_call_contract(factory: Factory) -> None:
    model = make_model()
    opt = factory(model.parameters())
    hint = re.escape("opt.step(loss=losses)")
    with pytest.raises(TypeError, match=f"got neither of closure and loss.*{hint}"):
        opt.step()
    with pytest.raises(TypeError, match=f"got both of closure and loss.*{hint}"):
        opt.step(lambda: torch.ones(1), loss=torch.ones(1))
    with pytest.raises(TypeError, match="non-empty float tensor"):
        opt.step(loss=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="non-empty float tensor"):
        opt.step(loss=torch.tensor([1, 2]))


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
