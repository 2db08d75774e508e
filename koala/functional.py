"""The KOALA filter as functions over tensor lists: the math behind `koala.KoalaV` and `koala.KoalaM`.

Symbols follow docs/method.md (the paper's notation) and are mapped once here:

    x_b, p_b   block weights and posterior velocities (one block = one parameter tensor)
    g_b        raw gradient;  a_b = g_b + lam x_b the augmented gradient;  G_b = |a_b|^2
    L, m2      mean and mean square of the per-sample losses of this minibatch
    R          measurement noise (EMA of m2), s / P the state covariance (scalar for V, 2x2 for M)
    gap_b      lr * (L + lam/2 |x_b|^2): the loss gap of target scheme (b)

On accelerators everything here is sync-free: the skip rule is a mask, per-block coefficients stay on the device as
0-d tensors and the learning rate enters as a Python scalar. Each variant has a readable single-tensor path (a loop
over tensors, the reference) and a multi-tensor path: `torch._foreach_*` over runs of tensors that share device,
dtype, lr and weight decay, or the fused kernels: for float32/float64 CPU tensors those of `koala.cpu_kernels` (one
pass over memory per step where eager ops need several; on the CPU reading a scalar is free, there is no device), on
CUDA those of `koala.cuda_kernels` (Triton), which implement this same math in a few launches and are tested against
the `torch._foreach_*` path here. `PATHS` maps each path's name to its implementation and `select_path` picks one
per step from the optimizer's `foreach` and `fused` arguments.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from koala import cpu_kernels

#: A float64 tensor, or a NumPy array on the fused CPU path (the same filter code runs on both).
Array = Any
#: `torch` or `numpy`: the array namespace of the filter's scalar arithmetic.
Namespace = ModuleType

#: Raw-gradient norm below which a block is not updated (official code, departure D6).
GRADIENT_THRESHOLD = 1e-9
#: EMA coefficient of the weight average x_avg and of the process noise qx (hard-coded in the official code).
AVERAGE_DECAY = 0.9
_HALF_DTYPES = (torch.float16, torch.bfloat16)

# Keys of the optimizer state (docs/method.md "Step contract", item 11). The filter's global quantities live, as
# float64 tensors, under the first parameter; the others per parameter.
STEP = "step"  # accepted steps, 0-d
COVARIANCE = "covariance"  # predicted covariance: s^ (0-d) for KOALA-V and KOALA-Diag, P^ (2x2) for KOALA-M
MEASUREMENT_NOISE = "measurement_noise"  # R, 0-d
PROCESS_NOISE = "process_noise"  # qx, 0-d (KOALA-M)
FILTER_KEYS = (STEP, COVARIANCE, MEASUREMENT_NOISE, PROCESS_NOISE)
VELOCITY = "velocity"  # posterior velocity p_k, per parameter (KOALA-M)
WEIGHT_AVERAGE = "weight_average"  # x_avg, per parameter (KOALA-M)
SECOND_MOMENT = "second_moment"  # v_b, per parameter (KOALA-Diag)


def norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """Accumulation dtype for norms of `dtype` tensors: float32 for half types (fp16 overflows at 65504)."""
    return torch.float32 if dtype in _HALF_DTYPES else None


@dataclass
class Blocks:
    """The tensors of one step. Block b is `params[b]`; `grads[b]` is None when it has no gradient."""

    params: list[Tensor]
    grads: list[Tensor | None]
    lrs: list[float]
    weight_decays: list[float]
    _runs: list[Run] | None = None  # computed once per step, by `runs`

    def __len__(self) -> int:
        return len(self.params)


@dataclass
class Measurement:
    """What one step observes, in float64: tensors on the filter device, or NumPy arrays on the fused CPU path."""

    loss: Array  # L, 0-d
    loss_second_moment: Array  # m2, 0-d
    grad_norms: Array  # |g_b|, shape (B,); 0 for blocks without gradient
    augmented_sq_norms: Array  # G_b, shape (B,)
    l2_terms: Array  # lam_b / 2 |x_b|^2, shape (B,)
    has_grad: Array  # bool (B,)

    def finite(self, xp: Namespace) -> Array:
        """0-d bool: every statistic is finite (NaN/inf anywhere skips the whole step)."""
        vectors = (self.grad_norms, self.augmented_sq_norms, self.l2_terms)
        finite = xp.isfinite(self.loss) & xp.isfinite(self.loss_second_moment)
        for vector in vectors:
            finite = finite & xp.isfinite(vector).all()
        return finite


# --------------------------------------------------------------------------------------------------------------------
# Measurement: loss statistics and block norms


def loss_moments(loss: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[sum, sum of squares, count] of the (per-sample or 0-d) loss, in `dtype` on `device`."""
    values = loss.detach().reshape(-1).to(device=device, dtype=dtype)
    total = values.sum()
    return torch.stack((total, values.square().sum(), torch.full_like(total, values.numel())))


def loss_moments_host(loss: Tensor) -> Tensor:
    """`loss_moments` in float64 on the CPU through NumPy, for the fused CPU path (a few torch ops on 0-d tensors
    cost more than the NumPy sums). The result shares its memory with a NumPy array (`.numpy()` is free)."""
    values = loss.detach().reshape(-1).to("cpu", torch.float64).numpy()
    return torch.from_numpy(np.array([values.sum(), values @ values, values.size], dtype=np.float64))


def measure_single_tensor(blocks: Blocks, moments: Tensor, filter_device: torch.device) -> Measurement:
    """Reference path: one norm per tensor."""
    dtype = moments.dtype
    grad_norms, augmented, l2 = [], [], []
    for x, g, lam in zip(blocks.params, blocks.grads, blocks.weight_decays, strict=True):
        acc = norm_dtype(x.dtype)
        if g is None:
            zero = torch.zeros((), device=filter_device, dtype=dtype)
            grad_norms.append(zero)
            augmented.append(zero)
            l2.append(zero)
            continue
        g_norm = torch.linalg.vector_norm(g, dtype=acc).to(filter_device, dtype)
        grad_norms.append(g_norm)
        if lam != 0:
            a = g.add(x, alpha=lam)
            augmented.append(torch.linalg.vector_norm(a, dtype=acc).to(filter_device, dtype).square())
            l2.append(torch.linalg.vector_norm(x, dtype=acc).to(filter_device, dtype).square() * (lam / 2))
        else:
            augmented.append(g_norm.square())
            l2.append(torch.zeros_like(g_norm))
    return _measurement(moments, grad_norms, augmented, l2, blocks, filter_device)


def measure_multi_tensor(blocks: Blocks, moments: Tensor, filter_device: torch.device) -> Measurement:
    """Fast path: per run of blocks, one foreach norm per statistic."""
    nblocks = len(blocks)
    dtype = moments.dtype
    grad_sq = torch.zeros(nblocks, device=filter_device, dtype=dtype)
    augmented = torch.zeros_like(grad_sq)
    l2 = torch.zeros_like(grad_sq)
    for run in runs(blocks, with_grad=True):
        xs, gs = run.params(blocks), run.grads(blocks)
        lam = run.weight_decay
        acc = norm_dtype(xs[0].dtype)
        g_sq = _stacked_sq_norms(gs, acc, filter_device, dtype)
        a_sq, x_sq = g_sq, torch.zeros_like(g_sq)
        if lam != 0:
            a_sq = _stacked_sq_norms(torch._foreach_add(gs, xs, alpha=lam), acc, filter_device, dtype)
            x_sq = _stacked_sq_norms(xs, acc, filter_device, dtype)
        grad_sq[run.start : run.stop] = g_sq
        augmented[run.start : run.stop] = a_sq
        l2[run.start : run.stop] = x_sq * (lam / 2)
    return Measurement(
        loss=moments[0] / moments[2],
        loss_second_moment=moments[1] / moments[2],
        grad_norms=grad_sq.sqrt(),
        augmented_sq_norms=augmented,
        l2_terms=l2,
        has_grad=mask_from_flags([g is not None for g in blocks.grads], filter_device),
    )


def measure_fused_cpu(blocks: Blocks, moments: Tensor, filter_device: torch.device) -> Measurement:
    """Fused CPU path: one kernel call per run gives every block's three statistics; NumPy arrays out (`moments` is
    a float64 CPU tensor, read through its NumPy view)."""
    host_moments = moments.numpy()
    nblocks = len(blocks)
    sums = np.zeros((nblocks, 3))  # |g|^2, |a|^2, |x|^2 per block
    for run in runs(blocks, with_grad=True):
        sums[run.start : run.stop] = cpu_kernels.block_sums(run.grads(blocks), run.params(blocks), run.weight_decay)
    half_decay = np.array(blocks.weight_decays) / 2
    return Measurement(
        loss=host_moments[0] / host_moments[2],
        loss_second_moment=host_moments[1] / host_moments[2],
        grad_norms=np.sqrt(sums[:, 0]),
        augmented_sq_norms=sums[:, 1],
        l2_terms=sums[:, 2] * half_decay,
        has_grad=np.array([g is not None for g in blocks.grads]),
    )


def _measurement(
    moments: Tensor,
    grad_norms: list[Tensor],
    augmented: list[Tensor],
    l2: list[Tensor],
    blocks: Blocks,
    filter_device: torch.device,
) -> Measurement:
    return Measurement(
        loss=moments[0] / moments[2],
        loss_second_moment=moments[1] / moments[2],
        grad_norms=torch.stack(grad_norms),
        augmented_sq_norms=torch.stack(augmented),
        l2_terms=torch.stack(l2),
        has_grad=mask_from_flags([g is not None for g in blocks.grads], filter_device),
    )


def mask_from_flags(flags: Sequence[bool], device: torch.device) -> Tensor:
    """A bool tensor from host flags, built on the device by slice fills: no host-to-device copy."""
    mask = torch.zeros(len(flags), device=device, dtype=torch.bool)
    # Runs of equal flags become slice fills: no tensor is built from host data.
    start = 0
    for b in range(1, len(flags) + 1):
        if b == len(flags) or flags[b] != flags[start]:
            if flags[start]:
                mask[start:b] = True
            start = b
    return mask


def _stacked_sq_norms(
    tensors: Sequence[Tensor], acc: torch.dtype | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    norms = torch._foreach_norm(list(tensors), 2, dtype=acc)
    return torch.stack(norms).to(device, dtype).square()


@dataclass(frozen=True)
class Run:
    """Consecutive blocks [start, stop) sharing device, dtype, lr, weight decay and gradient presence.

    One foreach call covers a run: lr and weight decay enter as Python scalars, and results land in a slice.
    """

    start: int
    stop: int
    lr: float
    weight_decay: float
    has_grad: bool

    def params(self, blocks: Blocks) -> list[Tensor]:
        return blocks.params[self.start : self.stop]

    def grads(self, blocks: Blocks) -> list[Tensor]:
        return [g for g in blocks.grads[self.start : self.stop] if g is not None]


def runs(blocks: Blocks, *, with_grad: bool | None) -> Iterator[Run]:
    """Maximal runs of blocks with equal (device, dtype, lr, weight decay, has gradient).

    `with_grad` True or False keeps only the runs with or without gradients; None keeps all.
    """

    if blocks._runs is None:
        keys = [
            (x.device, x.dtype, lr, lam, g is not None)
            for x, g, lr, lam in zip(blocks.params, blocks.grads, blocks.lrs, blocks.weight_decays, strict=True)
        ]
        blocks._runs = []
        start = 0
        for b in range(1, len(keys) + 1):
            if b == len(keys) or keys[b] != keys[start]:
                _, _, lr, lam, has_grad = keys[start]
                blocks._runs.append(Run(start, b, lr, lam, has_grad))
                start = b
    for run in blocks._runs:
        if with_grad is None or run.has_grad == with_grad:
            yield run


# --------------------------------------------------------------------------------------------------------------------
# Filter math shared by both variants (float64 vectors over blocks)


@dataclass
class Gains:
    """The masked outcome of update_k before the weights move (lr excluded: it multiplies at apply time)."""

    finite: Array  # 0-d bool: every statistic is finite
    take: Array  # 0-d bool: the step is taken (finite and at least one block passes the threshold)
    updated: Array  # bool (B,): blocks updated this step
    scaled_gaps: Array  # (B,): (L + l2_b) / S_b, zero where not updated. Gain of block b = lr * P^[.,1] * this
    rho: Array  # 0-d: R / (s^ G* + R), the contraction of the covariance
    h: Array  # 0-d: G* / (s^ G* + R), the eigenvalue approximation h~ (eq. 27)
    noise: Array  # 0-d: R_k (unchanged on a skipped step)


def gains(
    measurement: Measurement, prior_xx: Array, noise: Array, noise_decay: float | None, xp: Namespace = torch
) -> Gains:
    """update_k up to the weight change: R_k, S_b = s^ G_b + R_k, the per-block gains and the covariance contraction.

    `prior_xx` is s^_k (KOALA-V) or P^_k[1,1] (KOALA-M). `noise_decay` None means a fixed R (`noise` holds it).
    """
    m = measurement
    finite = m.finite(xp)
    updated = m.has_grad & (m.grad_norms >= GRADIENT_THRESHOLD) & finite
    take = finite & updated.any()
    if noise_decay is None:
        new_noise = noise
    else:
        # R is an EMA of the loss second moment m2 (official rule, departure D4); masked so NaN never reaches it.
        blended = noise_decay * noise + (1 - noise_decay) * m.loss_second_moment
        new_noise = xp.where(take, blended, noise)
    augmented = xp.where(updated, m.augmented_sq_norms, 0.0)
    innovation = prior_xx * augmented + new_noise  # S_b
    scaled_gaps = xp.where(updated, (m.loss + m.l2_terms) / innovation, 0.0)
    # max_b G_b / S_b is reached at the largest G_b; this closed form keeps P positive (docs/method.md "Safeguards").
    g_star = augmented.max()
    denominator = prior_xx * g_star + new_noise
    return Gains(
        finite=finite,
        take=take,
        updated=updated,
        scaled_gaps=scaled_gaps,
        rho=new_noise / denominator,
        h=g_star / denominator,
        noise=new_noise,
    )


def momentum_posterior(prior: Array, g: Gains, xp: Namespace = torch) -> Array:
    """KOALA-M's update_k of the covariance: P_k = P^ - h~ c c^T with c = P^[:, 1], so rho = 1 - h~ P^[1,1] scales the
    first row and column (docs/method.md "KOALA-M")."""
    sxx, sxp, spp = prior[0, 0], prior[0, 1], prior[1, 1]
    return xp.stack((xp.stack((g.rho * sxx, g.rho * sxp)), xp.stack((g.rho * sxp, spp - g.h * sxp * sxp))))


def momentum_prior(
    posterior: Array,
    process_noise: Array,
    drift_sq: Array,
    numel: int,
    momentum: float,
    velocity_noise: float,
    xp: Namespace = torch,
) -> tuple[Array, Array]:
    """KOALA-M's predict_{k+1} of the covariance: P^ = F P F^T + diag(qx, q_p), F = [[1, 1], [0, kappa]], after the qx
    EMA of the weight drift |x - x_avg|_2 / n (51', 52', 55). `drift_sq` is |x - x_avg|_2^2 over all `numel` weights
    (under DDP the replicas' mean). Returns (P^, qx)."""
    qx = AVERAGE_DECAY * process_noise + (1 - AVERAGE_DECAY) * xp.sqrt(drift_sq) / numel
    sxx, sxp, spp = posterior[0, 0], posterior[0, 1], posterior[1, 1]
    pxx = sxx + 2 * sxp + spp + qx
    pxp = momentum * (sxp + spp)
    ppp = momentum * momentum * spp + velocity_noise
    prior = xp.stack((xp.stack((pxx, pxp)), xp.stack((pxp, ppp))))
    return prior, qx


def to_float(flag: Array, like: Array) -> Array:
    """A bool as 0/1 in the float dtype of `like` (torch would turn `bool * 0.1` into float32)."""
    return flag.to(like.dtype) if isinstance(flag, Tensor) else np.asarray(flag, dtype=np.float64)


def guard_directions(directions: list[Tensor], finite: Tensor) -> list[Tensor]:
    """Zero the update directions when the step is skipped for non-finite values.

    A skipped step multiplies directions by a zero gain, but 0 * inf is NaN, so non-finite gradients must not reach
    the weights. On the CPU the flag is read directly (there is no device to synchronise with, and the common finite
    case costs nothing); on accelerators and under `torch.compile` a `torch.where` keeps the step sync-free.
    """
    if not directions:
        return directions
    if directions[0].device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(finite):
            return directions
        return [torch.zeros_like(d) for d in directions]
    return [torch.where(finite, d, 0.0) for d in directions]


def per_block(values: Tensor, device: torch.device) -> tuple[Tensor, ...]:
    """0-d tensors `values[b]` on `device`, one per block (views: no host read, no copy on the same device)."""
    if values.device != device:
        values = values.to(device, non_blocking=True)
    return values.unbind()


# --------------------------------------------------------------------------------------------------------------------
# Applying the step to the weights


def apply_vanilla_single_tensor(blocks: Blocks, coefficients: Tensor, finite: Tensor) -> None:
    """KOALA-V, reference path: x_b <- x_b - lr * coefficient_b * g_b (raw gradient direction, departure D3)."""
    for b, (x, g) in enumerate(zip(blocks.params, blocks.grads, strict=True)):
        if g is None:
            continue
        (direction,) = guard_directions([g], finite)
        x.addcmul_(direction, per_block(coefficients, x.device)[b], value=-blocks.lrs[b])


def apply_vanilla_fused_cpu(blocks: Blocks, coefficients: np.ndarray, finite: np.bool_ | bool) -> None:
    """KOALA-V, fused CPU path: x_b <- x_b - lr * coefficient_b * g_b, one kernel call per run."""
    if not finite:
        return  # skipped step (reading a host flag is free)
    for run in runs(blocks, with_grad=True):
        cpu_kernels.vanilla_update(run.params(blocks), run.grads(blocks), run.lr * coefficients[run.start : run.stop])


def apply_vanilla_multi_tensor(blocks: Blocks, coefficients: Tensor, finite: Tensor) -> None:
    """KOALA-V, fast path: one `_foreach_addcmul_` per run."""
    for run in runs(blocks, with_grad=True):
        xs, gs = run.params(blocks), run.grads(blocks)
        views = per_block(coefficients, xs[0].device)[run.start : run.stop]
        torch._foreach_addcmul_(xs, guard_directions(gs, finite), list(views), value=-run.lr)


@dataclass
class MomentumCoefficients:
    """Per-block and global factors of one KOALA-M step (device tensors, or NumPy arrays on the fused CPU path)."""

    weight_gains: Array  # (B,): P^[1,1] (L + l2_b) / S_b;  x_b -= lr * this * a_b
    velocity_gains: Array  # (B,): P^[2,1] (L + l2_b) / S_b;  p_b -= lr * this * a_b
    average_weights: Array  # (B,): 1 - AVERAGE_DECAY where the block is updated, else 0 (x_avg lerp weight)
    velocity_decay: Array  # 0-d: kappa, or 1 on a skipped step
    take: Array  # 0-d float: 1 when the step is taken, else 0 (gates the predict shift x += p)
    finite: Array  # 0-d bool


def apply_momentum_single_tensor(
    blocks: Blocks, velocities: list[Tensor], averages: list[Tensor], c: MomentumCoefficients
) -> Tensor:
    """KOALA-M, reference path, over every block (blocks without gradient still get the predict shift).

    With the posterior velocity p_k stored (docs/method.md "Step contract", item 9), one step does, per block:
        p <- kappa p  [p^_k];  p <- p - lr Kp a;  x <- x - lr Kx a          (update_k, eqs. 59-60, direction a_b)
        D = x - x_avg;  x_avg <- x_avg + w D                                (x_avg EMA of updated blocks, 50')
        x <- x + p                                                          (predict_{k+1}: x^_{k+1} = x_k + p_k)
    and returns sum_b |x_b - x_avg_b|^2 = sum_b (1 - w_b)^2 |D_b|^2, the weight drift of eq. 51' (squared).
    """
    drift = []
    for b, (x, g, v, avg) in enumerate(zip(blocks.params, blocks.grads, velocities, averages, strict=True)):
        v.mul_(c.velocity_decay)
        if g is not None:
            lam, lr = blocks.weight_decays[b], blocks.lrs[b]
            (direction,) = guard_directions([g.add(x, alpha=lam) if lam != 0 else g], c.finite)
            v.addcmul_(direction, per_block(c.velocity_gains, x.device)[b], value=-lr)
            x.addcmul_(direction, per_block(c.weight_gains, x.device)[b], value=-lr)
        difference = x - avg
        weight = per_block(c.average_weights, x.device)[b]
        avg.addcmul_(difference, weight)
        norm = torch.linalg.vector_norm(difference, dtype=norm_dtype(x.dtype))
        drift.append((norm.to(c.take.device, c.take.dtype) * (1 - weight.to(c.take.device))).square())
        x.addcmul_(v, c.take)
    return torch.stack(drift).sum()


def apply_momentum_multi_tensor(
    blocks: Blocks, velocities: list[Tensor], averages: list[Tensor], c: MomentumCoefficients
) -> Tensor:
    """KOALA-M, fast path: the passes of `apply_momentum_single_tensor` as foreach calls per run."""
    drift = torch.zeros((), device=c.take.device, dtype=c.take.dtype)
    for run in runs(blocks, with_grad=None):
        xs = run.params(blocks)
        v, avg = velocities[run.start : run.stop], averages[run.start : run.stop]
        device = xs[0].device
        torch._foreach_mul_(v, c.velocity_decay.to(device))
        gs = run.grads(blocks)
        if gs:
            lam, lr = run.weight_decay, run.lr
            augmented = list(torch._foreach_add(gs, xs, alpha=lam)) if lam != 0 else gs
            direction = guard_directions(augmented, c.finite)
            velocity_gains = list(per_block(c.velocity_gains, device)[run.start : run.stop])
            weight_gains = list(per_block(c.weight_gains, device)[run.start : run.stop])
            torch._foreach_addcmul_(v, direction, velocity_gains, value=-lr)
            torch._foreach_addcmul_(xs, direction, weight_gains, value=-lr)
        difference = torch._foreach_sub(xs, avg)
        weights = list(per_block(c.average_weights, device)[run.start : run.stop])
        torch._foreach_addcmul_(avg, difference, weights)
        norms = torch.stack(torch._foreach_norm(difference, 2, dtype=norm_dtype(xs[0].dtype)))
        kept = 1 - c.average_weights[run.start : run.stop]
        drift = drift + (norms.to(drift.device, drift.dtype) * kept.to(drift.device)).square().sum()
        torch._foreach_addcmul_(xs, v, [c.take.to(device)] * len(xs))
    return drift


def apply_momentum_fused_cpu(
    blocks: Blocks, velocities: list[Tensor], averages: list[Tensor], c: MomentumCoefficients
) -> float:
    """KOALA-M, fused CPU path: one kernel call per run (`koala.cpu_kernels`), NumPy coefficients."""
    if not c.take:
        return 0.0  # skipped step: nothing moves (reading a host flag is free)
    drift = 0.0
    for run in runs(blocks, with_grad=None):
        window = slice(run.start, run.stop)
        drift += cpu_kernels.momentum_update(
            run.params(blocks),
            blocks.grads[window],
            velocities[window],
            averages[window],
            run.weight_decay,
            float(c.velocity_decay),
            run.lr * c.weight_gains[window],
            run.lr * c.velocity_gains[window],
            c.average_weights[window],
            shift=1.0,
        )
    return drift


# --------------------------------------------------------------------------------------------------------------------
# The paths: one table from a path's name to its implementation, and the rule that picks one per step

PathName = Literal["single", "foreach", "fused", "triton"]

#: What `fused=None` does where the fused kernels apply: run them, unless the environment turns them off with
#: KOALA_CPU_KERNELS=0 (the Numba kernels, CPU) or KOALA_CUDA_KERNELS=0 (the Triton kernels, CUDA); the
#: multi-tensor path then runs `torch._foreach_*`. Read once, at import; `fused=True` or `fused=False` overrides it.
FUSED_BY_DEFAULT = {
    "cpu": os.environ.get("KOALA_CPU_KERNELS", "1") != "0",
    "cuda": os.environ.get("KOALA_CUDA_KERNELS", "1") != "0",
}
#: Devices with native `torch._foreach_*` kernels: where `foreach=None` means the multi-tensor path (as in torch).
FOREACH_DEVICES = ("cpu", "cuda", "xpu")


def write_state(state: dict[str, Any], key: str, value: Array) -> None:
    """Store a filter quantity as the float64 tensor the state dict carries (a NumPy result becomes one)."""
    state[key] = value if isinstance(value, Tensor) else torch.from_numpy(np.array(value, dtype=np.float64))


@dataclass(frozen=True)
class HostPath:
    """A path whose step the host drives: measure the blocks, compute the filter's gains in `xp` (torch, on the
    filter's device, or NumPy on the fused CPU path, where reading a scalar is free), apply the update."""

    name: PathName
    xp: Namespace  # the namespace of the filter's scalar arithmetic
    multi_tensor: bool  # one call per run of tensors, not one operation per tensor
    kernels: bool  # the passes over memory are the fused kernels of `koala.cpu_kernels`
    loss_moments: Callable[[Tensor, torch.device, torch.dtype], Tensor]  # (loss, filter device, dtype) -> moments
    measure: Callable[[Blocks, Tensor, torch.device], Measurement]  # (blocks, loss moments, filter device)
    apply_vanilla: Callable[[Blocks, Array, Array], None]  # KOALA-V: (blocks, coefficients, finite)
    apply_momentum: Callable[[Blocks, list[Tensor], list[Tensor], MomentumCoefficients], Array]  # KOALA-M: drift^2

    def read(self, state: dict[str, Any], key: str) -> Array:
        """A filter quantity in this path's namespace (a zero-copy NumPy view on the fused CPU path)."""
        value = state[key]
        return value.numpy() if self.xp is np else value

    def errstate(self) -> contextlib.AbstractContextManager[Any]:
        """The context of the filter's scalar arithmetic: NaN statistics are masked, not NumPy warnings."""
        return np.errstate(all="ignore") if self.xp is np else _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()


def _moments_on_host(loss: Tensor, filter_device: torch.device, dtype: torch.dtype) -> Tensor:
    return loss_moments_host(loss)  # (the fused CPU path's filter is float64 on the CPU)


#: The reference: a loop over tensors, one torch operation per tensor.
SINGLE = HostPath(
    name="single",
    xp=torch,
    multi_tensor=False,
    kernels=False,
    loss_moments=loss_moments,
    measure=measure_single_tensor,
    apply_vanilla=apply_vanilla_single_tensor,
    apply_momentum=apply_momentum_single_tensor,
)
#: `torch._foreach_*` over runs of tensors sharing device, dtype, lr and weight decay.
FOREACH = HostPath(
    name="foreach",
    xp=torch,
    multi_tensor=True,
    kernels=False,
    loss_moments=loss_moments,
    measure=measure_multi_tensor,
    apply_vanilla=apply_vanilla_multi_tensor,
    apply_momentum=apply_momentum_multi_tensor,
)
#: The Numba kernels of `koala.cpu_kernels` on contiguous float32/float64 CPU tensors, the filter in NumPy.
FUSED = HostPath(
    name="fused",
    xp=np,
    multi_tensor=True,
    kernels=True,
    loss_moments=_moments_on_host,
    measure=measure_fused_cpu,
    apply_vanilla=apply_vanilla_fused_cpu,
    apply_momentum=apply_momentum_fused_cpu,
)

# The CUDA kernels build on this module (its blocks, runs and constants): imported once everything above exists.
from koala import cuda_kernels  # noqa: E402


@dataclass(frozen=True)
class KernelPath:
    """A path that runs the whole step in device kernels: measurement, filter and update, the filter state updated in
    place on the device and nothing read back. `plan` gives a step's layout, or None where the kernels do not
    apply (every tensor must be a contiguous floating-point tensor on the filter's CUDA device)."""

    name: PathName
    available: bool  # the kernels can run at all (Triton is importable)
    plan: Callable[..., cuda_kernels.Layout | None]
    loss_moments: Callable[[Tensor, torch.device, Tensor | None], Tensor]
    block_stats: Callable[[Blocks, cuda_kernels.Layout], Tensor]
    vanilla_step: Callable[..., None]  # KOALA-V's filter and update
    momentum_update: Callable[..., tuple[Tensor, Tensor]]  # KOALA-M's update_k: (drift^2, scratch)
    momentum_predict: Callable[..., None]  # KOALA-M's covariance update and predict_{k+1}


@dataclass(slots=True)
class KernelPlan:
    """A kernel path with the layout of this step."""

    path: KernelPath
    layout: cuda_kernels.Layout

    @property
    def name(self) -> PathName:
        return self.path.name

    def loss_moments(self, loss: Tensor, filter_device: torch.device, dtype: torch.dtype) -> Tensor:
        return self.path.loss_moments(loss, filter_device, self.layout.workspace.moments)  # float64


#: The Triton kernels of `koala.cuda_kernels` on CUDA.
TRITON = KernelPath(
    name="triton",
    available=cuda_kernels.AVAILABLE,
    plan=cuda_kernels.plan,
    loss_moments=cuda_kernels.loss_moments,
    block_stats=cuda_kernels.block_stats,
    vanilla_step=cuda_kernels.vanilla_step,
    momentum_update=cuda_kernels.momentum_update,
    momentum_predict=cuda_kernels.momentum_predict,
)

#: Every path by name.
PATHS: dict[PathName, HostPath | KernelPath] = {path.name: path for path in (SINGLE, FOREACH, FUSED, TRITON)}


def check_fused(params: Sequence[Tensor], device_kernels: bool) -> None:
    """Refuse `fused=True` for parameters no fused kernel takes, whatever the step (as torch's optimizers do when
    they are built): the CPU kernels take float32 and float64, the CUDA ones (`device_kernels`) need Triton."""
    for p in params:
        if p.device.type == "cpu" and p.dtype in cpu_kernels.DTYPES:
            continue
        if device_kernels and p.device.type == "cuda" and TRITON.available:
            continue
        takes = "float32/float64 CPU tensors" + (" and CUDA tensors (with Triton)" if device_kernels else "")
        raise RuntimeError(f"fused=True: the fused kernels take {takes}, got a {p.dtype} parameter on {p.device}")


def select_path(
    blocks: Blocks,
    filter_device: torch.device,
    *,
    foreach: bool | None,
    fused: bool | None,
    kernel_state: Callable[[], tuple[list[Tensor], ...]],
    workspace: cuda_kernels.Workspace | None,
    device_kernels: bool,
) -> HostPath | KernelPlan:
    """This step's path, from the optimizer's `foreach` and `fused` (their meaning in torch's optimizers):

        fused=True    the fused kernels: Triton on CUDA (where `device_kernels`), Numba on the CPU; a RuntimeError
                      where they do not apply to these tensors (layout, dtype, devices)
        fused=None    unless foreach=False, the fused kernels where they apply and `FUSED_BY_DEFAULT` allows it;
                      otherwise as fused=False
        fused=False   foreach=True `torch._foreach_*`, foreach=False the single-tensor loop, foreach=None the first
                      on `FOREACH_DEVICES` and the loop elsewhere

    Under `torch.compile` the kernels do not run (the compiler traces torch operations): fused=True then takes
    `torch._foreach_*`. `kernel_state()` lists the per-parameter state tensors the kernels read and write, one list
    per kind; it is called only where kernels may run.
    """
    if fused is None:
        if foreach is False:
            return SINGLE
        kernels = FUSED_BY_DEFAULT.get(filter_device.type, False)
    else:
        kernels = fused
    if kernels and not torch.compiler.is_compiling():
        state = kernel_state()
        if device_kernels:
            layout = TRITON.plan(blocks, filter_device, workspace, *state)
            if layout is not None:
                return KernelPlan(TRITON, layout)
        if filter_device.type == "cpu":
            tensors = blocks.params + [g for g in blocks.grads if g is not None]
            for kind in state:
                tensors += kind
            if cpu_kernels.eligible(tensors):
                return FUSED
        if fused:
            cuda = ", or contiguous tensors on one CUDA device (with Triton)" if device_kernels else ""
            raise RuntimeError(
                f"fused=True, but the fused kernels do not apply to these tensors: they take contiguous float32 or "
                f"float64 CPU tensors{cuda}, parameters, gradients and state alike; pass fused=None to use them "
                "where they apply"
            )
    if fused or foreach:
        return FOREACH
    if foreach is False:
        return SINGLE
    return FOREACH if all(p.device.type in FOREACH_DEVICES for p in blocks.params) else SINGLE
