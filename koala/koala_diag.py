r"""`KoalaDiag`: KOALA with a diagonal (gradient second-moment) prior covariance, chosen by measured ablations.

The faithful `KoalaV`/`KoalaM` (koala/optim.py) stay the reference for the paper. This variant keeps KOALA's filter
(a Kalman filter over the weights whose measurement is the minibatch loss, target scheme (b), no learning rate to
tune) and changes four things, each measured on the embedded workloads (bench/ablations.py, bench/RESULTS.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import ParamsT

from koala import diag_cpu_kernels, diag_cuda_kernels
from koala import functional as F
from koala.functional import COVARIANCE, MEASUREMENT_NOISE, SECOND_MOMENT, STEP
from koala.optim import (
    Loss,
    _check,
    _check_number,
    _distributed,
    _KalmanOptimizer,
)


def per_sample_losses(loss: Tensor) -> Tensor:
    """The measurement's samples: a loss of shape (B, ...) averaged over all but its first dimension (one value per
    sequence for per-token losses of shape (B, T)); a 1-d or 0-d loss as it is."""
    return loss.reshape(loss.shape[0], -1).mean(1) if loss.dim() > 1 else loss


class KoalaDiag(_KalmanOptimizer):
    r"""KOALA-Diag: KOALA's Kalman filter over the weights with a diagonal prior covariance P = s D.

    One scalar s (KOALA-V's covariance) times a per-parameter shape D taken from the gradients' second moment (Adam's
    v); one innovation for the whole network; R from the spread of the per-sample losses. One `step()` is update_k
    followed by predict_{k+1} (notation of docs/method.md; t counts accepted steps; sums over updated blocks b):

        l_j       per-sample losses: the loss given, averaged over all but its first dimension (per sequence)
        L, V      mean and sample variance of the l_j
        R_k       = beta_R R_{k-1} + (1 - beta_R) V                 (R about the minibatch mean; kept if < 2 samples)
        a_b       = g_b + lam x_b                                  (augmented gradient)
        v_b       <- beta2 v_b + (1 - beta2) a_b^2,  sigma_b = sqrt(v_b / (1 - beta2^t)) + eps      (elementwise)
        D_b       = c / sigma_b,  c = mean of sigma over every element of the updated blocks  (so mean(1 / D) = 1)
        G         = sum_b a_b^T D_b a_b                            (the measurement's Jacobian in the metric of P / s)
        S         = s^ G + R_k                                      (one innovation, eq. 12 of the paper)
        x_b      <- x_b - lr_b s^ (L + sum_b lam_b/2 |x_b|^2) / S * D_b a_b                        (eqs. 12, 57)
        s         = s^ R_k / S,   s^_{k+1} = s + q                                               (eq. 13, predict)

    With D = I, R from the losses' second moment, every loss element a sample and per-block innovations this is
    `KoalaV` (with the augmented direction). The step is a Kalman gain times a preconditioned gradient: a
    Polyak-type step (L - target) / G along D a when s^ G >> R, a step of s^ (L - target) / R otherwise; D = c /
    sigma gives each parameter Adam's scaling and leaves the filter's scalar s on KOALA's scale. The update is
    invariant to rescaling the loss (once R has adapted): D, the gap / S and the direction compensate.

    Departures from the paper (and from `KoalaV`), each a measured ablation (bench/RESULTS.md, "KOALA ablations"):
        A1 diagonal prior covariance P = s D with D from Adam's second moment (beta2 = 0.999, eps = 1e-8, bias
           corrected), normalised so that the mean of 1 / D over the updated elements is 1 (the paper: P = s I);
        A2 R is an EMA of the sample variance of the per-sample losses, their spread about the minibatch mean: not
           their second moment (official code, D4) nor their spread about the target (eq. 49), which both count the
           gap being measured as noise; with fewer than 2 samples R is left as it is (R_0 = 1);
        A3 the per-sample losses are per leading index: a (B, T) per-token loss is averaged per sequence first;
        A4 one innovation S for the whole network (the paper's eq. 12-13), not one per tensor (eq. 27): one gain,
           and the covariance contracts with the total G, not the largest block's.
    Kept from KOALA-V: target scheme (b) with `lr` the target scale (D1), the gap with the network's L2 term (D2,
    summed over the updated blocks, since the innovation is global), coupled L2 through the augmented gradient in
    the direction and in v (D3 as in KOALA-M), the per-tensor skip rule on the raw gradient norm (1e-9) with a
    whole-step skip when none passes or anything is non-finite (D6), s_0 = 0.1 and q = 1 (D7), float64 filter
    scalars (D9). The second moment v is kept in the parameter's dtype, as `torch.optim.Adam` keeps it.

    Usage is KOALA's: `losses.mean().backward(); opt.step(loss=losses)` with the per-sample (or per-token, shape
    (B, T)) unscaled losses, or `opt.step(closure)`. A 0-d loss or a real number leaves R at its last value (R_0 = 1
    if it never had per-sample losses): documented as degraded. Under DDP the loss moments (sum, sum of squares,
    count of the per-sample losses) are all-reduced, so every replica takes the identical step. `eval()`/`train()`
    are no-ops, as for KOALA-V. `step()` does not synchronise with the device; the multi-tensor path runs fused
    kernels, two passes over memory: Numba on the CPU (`koala.diag_cpu_kernels`), Triton on CUDA
    (`koala.diag_cuda_kernels`), and `torch._foreach_*` elsewhere and under `torch.compile`.

    Args:
        params: parameters or parameter groups (per-group `lr` and `weight_decay` are honoured).
        lr: target scale eps of scheme (b) (default 1.0: target zero loss).
        initial_covariance: s_0 (default 0.1).
        process_noise: q (default 1.0).
        beta2: EMA coefficient of the second moment v (default 0.999).
        eps: added to sqrt(v^) (default 1e-8).
        measurement_noise: a fixed R > 0, or None (default) for the adaptive estimate.
        noise_decay: EMA coefficient beta_R of the adaptive R (default 0.9).
        weight_decay: lam, coupled L2 (default 0).
        foreach: the multi-tensor path (True), the single-tensor loop (False), or None to choose by device.
        fused: how the multi-tensor path runs: its fused kernels (True, also with foreach=False; a RuntimeError
            where they do not apply to the tensors), `torch._foreach_*` (False), or None (default) for the kernels
            where they apply, unless KOALA_CPU_KERNELS=0 on the CPU, and `torch._foreach_*` elsewhere.
    """

    _variant = "KOALA-Diag"
    _HYPERPARAMETERS = (
        *_KalmanOptimizer._HYPERPARAMETERS,
        "initial_covariance",
        "process_noise",
        "beta2",
        "eps",
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        *,
        initial_covariance: float = 0.1,
        process_noise: float = 1.0,
        beta2: float = 0.999,
        eps: float = 1e-8,
        measurement_noise: float | None = None,
        noise_decay: float = 0.9,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        _check_number("initial_covariance", initial_covariance, low=0.0, low_open=True)
        _check_number("process_noise", process_noise, low=0.0)
        _check_number("beta2", beta2, low=0.0)
        _check(beta2 < 1.0, f"Invalid beta2: {beta2!r} (expected >= 0.0 and < 1.0)")
        _check_number("eps", eps, low=0.0, low_open=True)
        super().__init__(
            params,
            dict(lr=lr, weight_decay=weight_decay),
            measurement_noise=measurement_noise,
            noise_decay=noise_decay,
            foreach=foreach,
            fused=fused,
        )
        self.initial_covariance = initial_covariance
        self.process_noise = process_noise
        self.beta2 = beta2
        self.eps = eps
        self._numel_cache: tuple[Any, Tensor] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_numel_cache", None)

    # ---- the step -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor | float] | None = None, *, loss: Loss | None = None) -> Loss:  # type: ignore[override]
        """Run update_k and predict_{k+1} with this minibatch's losses (see the class docstring).

        Args:
            closure: recomputes the loss and its gradient and returns the loss.
            loss: the loss already backpropagated: per sample (B,), per token (B, T, ...: averaged per leading
                index), or 0-d.

        Exactly one of `closure` and `loss` is required; the loss must be the unscaled one. Returns the loss as given.

        Raises:
            TypeError: neither or both of `closure` and `loss`, or a loss that is neither a non-empty floating-point
                tensor nor a real number.
            RuntimeError: called in evaluation mode (call `train()` first).
        """
        loss, measured = self._take_loss(closure, loss)
        blocks = self._blocks()
        if all(g is None for g in blocks.grads):
            return loss
        state = self.state[blocks.params[0]]
        if STEP not in state:
            self._init_state(blocks)
        path = self._path(blocks)
        samples = per_sample_losses(measured.detach())
        moments = path.loss_moments(samples, state[COVARIANCE].device, state[COVARIANCE].dtype)
        if _distributed():
            dist.all_reduce(moments)  # global sum, sum of squares and count: every replica takes the same step
        if isinstance(path, F.KernelPlan):
            # Triton kernels: the filter runs on the device, its state is updated in place, nothing is read back.
            diag_cuda_kernels.step(
                blocks,
                path.layout,
                moments,
                state,
                noise_decay=None if self.measurement_noise is not None else self.noise_decay,
                beta2=self.beta2,
                eps=self.eps,
                process_noise=self.process_noise,
            )
        elif path.kernels:
            with path.errstate():  # NaN statistics are masked, not errors
                self._fused_step(blocks, moments.numpy(), state, path)
        else:
            self._torch_step(blocks, moments, state, path)
        return loss

    def _init_state(self, blocks: F.Blocks) -> None:
        first = blocks.params[0]
        for p in blocks.params:
            self.state[p][SECOND_MOMENT] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state = self.state[first]
        state[STEP] = self._filter_tensor(0.0, first)
        # The covariance half of predict_1 (s^_1 = s_0 + q) runs here, at the first step (as in KoalaV).
        state[COVARIANCE] = self._filter_tensor(self.initial_covariance + self.process_noise, first)
        state[MEASUREMENT_NOISE] = self._filter_tensor(self.measurement_noise or 1.0, first)

    def _kernel_state(self, blocks: F.Blocks) -> tuple[list[Tensor], ...]:
        return ([self.state[p][SECOND_MOMENT] for p in blocks.params],)

    # ---- the filter's scalars (NumPy on the fused path, torch elsewhere) ---------------------------------------------

    def _filter(
        self,
        moments: F.Array,
        stats: F.Array,
        numels: F.Array,
        has_grad: F.Array,
        state: dict[str, Any],
        path: F.HostPath,
    ) -> tuple[F.Array, F.Array, F.Array]:
        """The step's scalars from the loss moments [sum, sum of squares, count] and the per-block sums `stats`
        (B, 4): [|g|^2, sum sigma, sum a^2 / sigma, lam/2 |x|^2]. Writes the filter state and returns (take, updated
        (B,), coefficients (B,)): block b moves by -lr_b * coefficients[b] * a_b / sigma_b. The arithmetic runs in the
        path's namespace: NumPy on the fused path, torch elsewhere."""
        xp = path.xp
        total, total_sq, count = moments[0], moments[1], moments[2]
        big_l = total / count
        finite = xp.isfinite(big_l) & xp.isfinite(total_sq) & xp.isfinite(stats).all()
        updated = has_grad & (xp.sqrt(stats[:, 0]) >= F.GRADIENT_THRESHOLD) & finite
        take = finite & updated.any()
        zero = xp.zeros_like(stats[:, 0])
        numel = xp.where(updated, numels, zero).sum()
        scale = xp.where(updated, stats[:, 1], zero).sum() / xp.where(numel > 0, numel, 1.0)  # c
        big_g = scale * xp.where(updated, stats[:, 2], zero).sum()
        l2 = xp.where(updated, stats[:, 3], zero).sum()
        noise = path.read(state, MEASUREMENT_NOISE)
        if self.measurement_noise is None:
            # The sample variance: squared deviations over count - 1, clamped at 0 against rounding.
            deviations = total_sq - total * big_l
            deviations = xp.where(deviations > 0, deviations, 0.0)
            variance = deviations / xp.where(count > 1, count - 1, 1.0)
            blended = self.noise_decay * noise + (1 - self.noise_decay) * variance
            new_noise = xp.where(take & (count > 1), blended, noise)
        else:
            new_noise = noise
        prior = path.read(state, COVARIANCE)
        innovation = prior * big_g + new_noise  # S
        safe = xp.where(take, innovation, 1.0)
        gain = xp.where(take, prior * (big_l + l2) / safe, 0.0)  # s^ (L + l2) / S, lr applied per block
        coefficients = xp.where(updated & take, gain * scale, zero)
        posterior = prior * new_noise / safe
        F.write_state(state, COVARIANCE, xp.where(take, posterior + self.process_noise, prior))
        F.write_state(state, MEASUREMENT_NOISE, new_noise)
        F.write_state(state, STEP, path.read(state, STEP) + F.to_float(take, prior))
        return take, updated, coefficients

    def _numels(self, blocks: F.Blocks, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Element counts of the blocks on the filter device, built once (a host-to-device copy at the first step);
        a constant of the graph under `torch.compile`, which must not see the optimizer's attributes change."""
        key = (device, dtype, tuple(p.numel() for p in blocks.params))
        if torch.compiler.is_compiling():
            return torch.tensor([float(n) for n in key[2]], dtype=dtype, device=device)
        if self._numel_cache is None or self._numel_cache[0] != key:
            values = torch.tensor([float(n) for n in key[2]], dtype=dtype).to(device)
            self._numel_cache = (key, values)
        return self._numel_cache[1]

    # ---- the three paths ------------------------------------------------------------------------------------------

    def _fused_step(self, blocks: F.Blocks, moments: np.ndarray, state: dict[str, Any], path: F.HostPath) -> None:
        """CPU kernels: host-side NumPy scalars, one statistics and one update call per run of tensors."""
        inv_bc2 = 1.0 / (1.0 - self.beta2 ** (float(state[STEP]) + 1))  # reading a CPU tensor is free
        stats = np.zeros((len(blocks), 4))
        (second_moments,) = self._kernel_state(blocks)
        for run in F.runs(blocks, with_grad=True):
            window = slice(run.start, run.stop)
            stats[window] = diag_cpu_kernels.sums(
                run.grads(blocks),
                run.params(blocks),
                second_moments[window],
                run.weight_decay,
                self.beta2,
                inv_bc2,
                self.eps,
            )
            stats[window, 3] *= run.weight_decay / 2
        numels = np.array([float(p.numel()) for p in blocks.params])
        has_grad = np.array([g is not None for g in blocks.grads])
        take, updated, coefficients = self._filter(moments, stats, numels, has_grad, state, path)
        if not take:
            self._warn_skipped(bool(np.isfinite(stats).all() and np.isfinite(moments).all()))
            return
        for run in F.runs(blocks, with_grad=True):
            window = slice(run.start, run.stop)
            diag_cpu_kernels.update(
                run.params(blocks),
                run.grads(blocks),
                second_moments[window],
                run.weight_decay,
                self.beta2,
                inv_bc2,
                self.eps,
                run.lr * coefficients[window],
                updated[window],
            )

    def _torch_step(self, blocks: F.Blocks, moments: Tensor, state: dict[str, Any], path: F.HostPath) -> None:
        """`torch._foreach_*` per run of tensors ("foreach") or a loop over tensors ("single"); sync-free."""
        filter_device, dtype = moments.device, moments.dtype
        inv_bc2 = 1 / (1 - self.beta2 ** (state[STEP] + 1))  # 0-d float64 on the filter device
        (second_moments,) = self._kernel_state(blocks)
        runs = list(F.runs(blocks, with_grad=True))
        # |g|^2 first: a non-finite gradient must not reach v (where 0 * inf is NaN), so directions are guarded.
        grad_sq = torch.zeros(len(blocks), device=filter_device, dtype=dtype)
        for run in runs:
            grad_sq[run.start : run.stop] = _sq_norms(run.grads(blocks), path, grad_sq)
        finite = torch.isfinite(grad_sq).all()
        stats = torch.zeros(len(blocks), 4, device=filter_device, dtype=dtype)
        stats[:, 0] = grad_sq
        work = []
        for run in runs:
            xs, gs, vs = run.params(blocks), run.grads(blocks), second_moments[run.start : run.stop]
            dtype = xs[0].dtype
            if dtype in _HALF:  # in float32, as the kernels compute: eps = 1e-8 is 0 in float16, and 0 / 0 is NaN
                xs, gs, vs = ([t.float() for t in ts] for ts in (xs, gs, vs))
            directions = _directions(gs, xs, run.weight_decay, finite)
            v_new, sigma = _sigma(vs, directions, self.beta2, inv_bc2, self.eps, path)
            steps = _div(directions, sigma, path)  # a / sigma: the step's direction, up to c
            stats[run.start : run.stop, 1:] = _sums(xs, directions, sigma, steps, run.weight_decay, path, stats)
            if dtype in _HALF:
                steps, v_new = [t.to(dtype) for t in steps], [t.to(dtype) for t in v_new]
            work.append((run, steps, v_new))
        numels = self._numels(blocks, filter_device, dtype)
        has_grad = F.mask_from_flags([g is not None for g in blocks.grads], filter_device)
        take, updated, coefficients = self._filter(moments, stats, numels, has_grad, state, path)
        applied = F.to_float(updated & take, coefficients)
        for run, steps, v_new in work:
            xs, vs = run.params(blocks), second_moments[run.start : run.stop]
            device = xs[0].device
            kept = list(F.per_block(1 - applied, device)[run.start : run.stop])
            mixed = list(F.per_block(applied, device)[run.start : run.stop])
            gains = list(F.per_block(coefficients, device)[run.start : run.stop])
            # v <- v' where the block is updated, v elsewhere (both finite, so the blend is exact either way).
            if path.multi_tensor:
                torch._foreach_mul_(vs, kept)
                torch._foreach_addcmul_(vs, v_new, mixed)
                torch._foreach_addcmul_(xs, steps, gains, value=-run.lr)
            else:
                for x, v, d, vn, k, m, c in zip(xs, vs, steps, v_new, kept, mixed, gains, strict=True):
                    v.mul_(k).addcmul_(vn, m)
                    x.addcmul_(d, c, value=-run.lr)
        if filter_device.type == "cpu" and not torch.compiler.is_compiling() and not bool(take):
            self._warn_skipped(bool(torch.isfinite(stats).all() and torch.isfinite(moments).all()))

    def _warn_skipped(self, finite: bool) -> None:
        reason = "no tensor has a gradient norm of at least 1e-9" if finite else "non-finite loss or gradient"
        warnings.warn(
            f"{type(self).__name__} skipped a step: {reason} (filter state unchanged)", RuntimeWarning, stacklevel=4
        )

    def __repr__(self) -> str:
        extra = (
            f"initial_covariance={self.initial_covariance}, process_noise={self.process_noise}, beta2={self.beta2}, "
            f"eps={self.eps}, measurement_noise={self.measurement_noise}, noise_decay={self.noise_decay}"
        )
        return super().__repr__().replace("(\n", f"({extra},\n", 1)


# ---- tensor passes of the torch paths ("foreach": one call per run; "single": one op per tensor) ------------------

_HALF = (torch.float16, torch.bfloat16)  # computed in float32 on the torch paths, stored in their own dtype


def _norms(tensors: list[Tensor], order: float, path: F.HostPath, like: Tensor) -> Tensor:
    acc = F.norm_dtype(tensors[0].dtype)
    if path.multi_tensor:
        norms = list(torch._foreach_norm(tensors, order, dtype=acc))
    else:
        norms = [torch.linalg.vector_norm(t, order, dtype=acc) for t in tensors]
    return torch.stack(norms).to(like.device, like.dtype)


def _sq_norms(tensors: list[Tensor], path: F.HostPath, like: Tensor) -> Tensor:
    return _norms(tensors, 2, path, like).square()


def _directions(gs: list[Tensor], xs: list[Tensor], weight_decay: float, finite: Tensor) -> list[Tensor]:
    """a_b = g_b + lam x_b, zeroed when a gradient is non-finite (the step is skipped then; v must stay finite)."""
    augmented = list(torch._foreach_add(gs, xs, alpha=weight_decay)) if weight_decay != 0 else list(gs)
    return F.guard_directions(augmented, finite)


def _sigma(
    vs: list[Tensor], directions: list[Tensor], beta2: float, inv_bc2: Tensor, eps: float, path: F.HostPath
) -> tuple[list[Tensor], list[Tensor]]:
    """v' = beta2 v + (1 - beta2) a^2 and sigma = sqrt(v' / (1 - beta2^t)) + eps, as new tensors."""
    factor = inv_bc2.to(vs[0].device, vs[0].dtype)
    if path.multi_tensor:
        v_new = list(torch._foreach_mul(vs, beta2))
        torch._foreach_addcmul_(v_new, directions, directions, value=1 - beta2)
        sigma = list(torch._foreach_mul(v_new, factor))
        torch._foreach_sqrt_(sigma)
        torch._foreach_add_(sigma, eps)
        return v_new, sigma
    v_new = [v.mul(beta2).addcmul_(a, a, value=1 - beta2) for v, a in zip(vs, directions, strict=True)]
    return v_new, [v.mul(factor).sqrt_().add_(eps) for v in v_new]


def _div(directions: list[Tensor], sigma: list[Tensor], path: F.HostPath) -> list[Tensor]:
    if path.multi_tensor:
        return list(torch._foreach_div(directions, sigma))
    return [a / s for a, s in zip(directions, sigma, strict=True)]


def _sums(
    xs: list[Tensor],
    directions: list[Tensor],
    sigma: list[Tensor],
    steps: list[Tensor],
    weight_decay: float,
    path: F.HostPath,
    like: Tensor,
) -> Tensor:
    """Per block [sum sigma, sum a^2 / sigma, lam/2 |x|^2], shape (blocks, 3); sigma > 0 and a^2 / sigma >= 0, so
    their sums are L1 norms."""
    if path.multi_tensor:
        products = list(torch._foreach_mul(directions, steps))
    else:
        products = [a * d for a, d in zip(directions, steps, strict=True)]
    columns = [_norms(sigma, 1, path, like), _norms(products, 1, path, like)]
    if weight_decay != 0:
        columns.append(_sq_norms(xs, path, like) * (weight_decay / 2))
    else:
        columns.append(torch.zeros(len(xs), device=like.device, dtype=like.dtype))
    return torch.stack(columns, dim=1)


__all__ = ["KoalaDiag", "per_sample_losses"]
