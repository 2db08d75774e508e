"""Fused CPU kernels for the multi-tensor path, compiled with Numba.

Eager PyTorch runs each elementwise operation as its own pass over memory: the KOALA-M update (velocity decay and
gain, weight gain, weight-average EMA, drift norm, predict shift) costs about 19 tensor passes that way, against the
8 a fused loop needs (the same count as fused Adam). These kernels are those fused loops. They run on contiguous
float32/float64 CPU tensors outside `torch.compile`; everything else takes the `torch._foreach_*` path, which is also
the reference they are tested against. Sums accumulate in float64. Compiled kernels are cached on disk
(`cache=True`), so only the first process on a machine pays the compilation (a few seconds).
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np
import torch
from numba import prange
from torch import Tensor

# Reassociation lets LLVM vectorise the reductions; NaN and inf keep their IEEE meaning (no `nnan`/`ninf`).
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
# Elements per work item; tensors below PARALLEL_NUMEL run serially (a parallel region costs ~10-20 us to start).
_CHUNK = 1 << 14
PARALLEL_NUMEL = 1 << 16
_DTYPES = (torch.float32, torch.float64)


#: Set KOALA_CPU_KERNELS=0 to run the multi-tensor path with `torch._foreach_*` on the CPU too.
ENABLED = os.environ.get("KOALA_CPU_KERNELS", "1") != "0"


def eligible(tensors: Sequence[Tensor]) -> bool:
    """Whether the fused kernels apply: contiguous float32/float64 CPU tensors, outside `torch.compile`."""
    if not ENABLED or torch.compiler.is_compiling():
        return False
    return all(t.device.type == "cpu" and t.dtype in _DTYPES and t.is_contiguous() for t in tensors)


def _flat(t: Tensor) -> np.ndarray:
    return t.detach().view(-1).numpy()


# Kernels accumulate in the tensors' dtype within a chunk of _CHUNK elements and in float64 across chunks; `zero` is
# a 0 of that dtype, fixing the accumulator's type. Each chunk works on slices indexed from 0: LLVM then vectorises
# the loop (indexing the whole array with chunk offsets measured 1.7x slower).


def _sum_of_squares(g, zero):  # type: ignore[no-untyped-def]
    """|g|^2."""
    n = g.size
    chunks = (n + _CHUNK - 1) // _CHUNK
    parts = np.zeros(chunks)
    for c in prange(chunks):
        gc = g[c * _CHUNK : min(n, (c + 1) * _CHUNK)]
        gg = zero
        for j in range(gc.size):
            gg += gc[j] * gc[j]
        parts[c] = gg
    return parts.sum()


def _block_sums(g, x, lam, zero):  # type: ignore[no-untyped-def]
    """(|g|^2, |g + lam x|^2, |x|^2) in one pass."""
    n = g.size
    chunks = (n + _CHUNK - 1) // _CHUNK
    parts = np.zeros((chunks, 3))
    for c in prange(chunks):
        start, stop = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        gc, xc = g[start:stop], x[start:stop]
        gg = zero
        aa = zero
        xx = zero
        for j in range(gc.size):
            gj = gc[j]
            xj = xc[j]
            aj = gj + lam * xj
            gg += gj * gj
            aa += aj * aj
            xx += xj * xj
        parts[c, 0] = gg
        parts[c, 1] = aa
        parts[c, 2] = xx
    return parts.sum(axis=0)


def _momentum_update(x, g, v, avg, lam, kappa, weight_gain, velocity_gain, average_weight, kept, shift, zero):  # type: ignore[no-untyped-def]
    """One KOALA-M block, fused; returns |x_k - x_avg_new|^2. See `koala.functional.apply_momentum_single_tensor`.

    `kept` is 1 - average_weight, passed in the tensors' dtype.
    """
    n = x.size
    chunks = (n + _CHUNK - 1) // _CHUNK
    parts = np.zeros(chunks)
    for c in prange(chunks):
        start, stop = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        xc, gc, vc, ac = x[start:stop], g[start:stop], v[start:stop], avg[start:stop]
        total = zero
        for j in range(xc.size):
            xj = xc[j]
            aj = gc[j] + lam * xj  # augmented gradient (direction of KOALA-M, departure D3)
            vj = kappa * vc[j] - velocity_gain * aj  # p_k = kappa p_{k-1} - Kp a
            xj = xj - weight_gain * aj  # x_k = x^_k - Kx a
            dj = xj - ac[j]
            ac[j] += average_weight * dj  # x_avg EMA (weight 0 for blocks not updated)
            dk = dj * kept  # x_k - x_avg_new
            total += dk * dk
            vc[j] = vj
            xc[j] = xj + shift * vj  # predict_{k+1}: x^_{k+1} = x_k + p_k
        parts[c] = total
    return parts.sum()


def _renamed(function: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    """The same function under another qualified name, so that it gets its own on-disk cache entry."""
    copy = types.FunctionType(
        function.__code__, function.__globals__, function.__name__ + suffix, function.__defaults__, function.__closure__
    )
    copy.__qualname__ = function.__qualname__ + suffix
    copy.__doc__ = function.__doc__
    return copy


def _compile(function: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """A parallel and a serial compilation of one kernel.

    Numba's cache keys an entry by the function's name and signature, not by `parallel`: compiled from one function,
    whichever variant a process compiled first would be loaded for both (the serial loop for the largest tensors).
    """
    parallel = numba.njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)(_renamed(function, "_parallel"))
    serial = numba.njit(fastmath=_FASTMATH, cache=True, nogil=True)(_renamed(function, "_serial"))
    return parallel, serial


_sum_of_squares_parallel, _sum_of_squares_serial = _compile(_sum_of_squares)
_block_sums_parallel, _block_sums_serial = _compile(_block_sums)
_momentum_update_parallel, _momentum_update_serial = _compile(_momentum_update)


def _scalar(t: Tensor) -> type[np.floating[Any]]:
    return np.float32 if t.dtype == torch.float32 else np.float64


def _threads() -> None:
    # Follow torch's intra-op thread count (Ray trials and DDP workers limit it) within Numba's pool size.
    pool = int(getattr(numba.config, "NUMBA_NUM_THREADS", 1))
    numba.set_num_threads(max(1, min(torch.get_num_threads(), pool)))


def block_sums(grads: Sequence[Tensor], params: Sequence[Tensor], weight_decay: float) -> list[list[float]]:
    """Per block [|g|^2, |g + lam x|^2, |x|^2], as float64 sums."""
    _threads()
    out = []
    for g, x in zip(grads, params, strict=True):
        big = x.numel() >= PARALLEL_NUMEL
        zero = _scalar(x)(0)
        if weight_decay == 0:
            kernel = _sum_of_squares_parallel if big else _sum_of_squares_serial
            g_sq = float(kernel(_flat(g), zero))
            out.append([g_sq, g_sq, 0.0])
        else:
            kernel = _block_sums_parallel if big else _block_sums_serial
            out.append(kernel(_flat(g), _flat(x), _scalar(x)(weight_decay), zero).tolist())
    return out


def momentum_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    velocities: Sequence[Tensor],
    averages: Sequence[Tensor],
    weight_decay: float,
    kappa: float,
    weight_gains: Sequence[float],
    velocity_gains: Sequence[float],
    average_weights: Sequence[float],
    shift: float,
) -> float:
    """Apply the fused KOALA-M block update to every block; returns sum_b |x_b - x_avg_b|^2."""
    _threads()
    drift = 0.0
    for b, (x, g, v, avg) in enumerate(zip(params, grads, velocities, averages, strict=True)):
        kernel = _momentum_update_parallel if x.numel() >= PARALLEL_NUMEL else _momentum_update_serial
        scalar = _scalar(x)
        flat_x = _flat(x)
        # A block without gradient has zero gains, so its direction only has to be finite: the weights serve.
        direction = _flat(g) if g is not None else flat_x
        drift += kernel(
            flat_x,
            direction,
            _flat(v),
            _flat(avg),
            scalar(weight_decay),
            scalar(kappa),
            scalar(weight_gains[b]),
            scalar(velocity_gains[b]),
            scalar(average_weights[b]),
            scalar(1 - average_weights[b]),
            scalar(shift),
            scalar(0),
        )
    return drift
