# mypy: disable-error-code="no-untyped-def, no-untyped-call"
"""Fused CPU kernels of `koala.KoalaDiag` (Numba), built on the machinery of `koala.cpu_kernels`.

A KoalaDiag step is two passes over memory:

    statistics: reads g (and x with weight decay) and v; per tensor sum g^2, sum sigma, sum a^2 / sigma (and x^2),
                with a = g + lam x, v' = beta2 v + (1 - beta2) a^2, sigma = sqrt(v' / (1 - beta2^t)) + eps
    update:     reads x, g, v; writes v <- v' and x <- x - c_b a / sigma (blocks with apply_b = 0 are left alone)

The update recomputes v' and sigma with the same arithmetic as the statistics pass, so the gain formed from the
statistics and the step applied agree exactly. Seven float passes per parameter in all (Adam's count), against the
dozen-odd temporaries of the `torch._foreach_*` form. Same conventions as `koala.cpu_kernels`: one call per run of
contiguous float32/float64 tensors, addressed through a table of data pointers; per-chunk sums in the tensors'
dtype, summed across chunks in float64 in a fixed order (independent of the thread count).
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch
from torch import Tensor

from koala import cpu_kernels
from koala.cpu_kernels import _LANES, _chunk, _compile, _Table, _work_items


@numba.njit(cache=True, nogil=True, inline="always")
def _sigma(v, a, beta2, one_minus_beta2, inv_bc2, eps):
    """(v', sigma) of one element."""
    v_new = beta2 * v + one_minus_beta2 * (a * a)
    return v_new, np.sqrt(v_new * inv_bc2) + eps


def _diag_sums(g_addr, x_addr, v_addr, sizes, lam, beta2, one_minus_beta2, inv_bc2, eps, with_x, zero):
    """Per tensor [sum g^2, sum sigma, sum a^2 / sigma, sum x^2]; x is read only when `with_x`."""
    tensor, start = _work_items(sizes)
    parts = np.zeros((tensor.size, 4))
    for w in numba.prange(tensor.size):
        t = tensor[w]
        gc = _chunk(g_addr, sizes, t, start[w], zero)
        vc = _chunk(v_addr, sizes, t, start[w], zero)
        gg = zero
        ss = zero
        qq = zero
        xx = zero
        if with_x:
            xc = _chunk(x_addr, sizes, t, start[w], zero)
            q = gc.size // _LANES
            for j in range(q):
                for lane in range(_LANES):
                    i = lane * q + j
                    gi = gc[i]
                    xi = xc[i]
                    ai = gi + lam * xi
                    _, si = _sigma(vc[i], ai, beta2, one_minus_beta2, inv_bc2, eps)
                    gg += gi * gi
                    ss += si
                    qq += ai * ai / si
                    xx += xi * xi
            for i in range(_LANES * q, gc.size):
                gi = gc[i]
                xi = xc[i]
                ai = gi + lam * xi
                _, si = _sigma(vc[i], ai, beta2, one_minus_beta2, inv_bc2, eps)
                gg += gi * gi
                ss += si
                qq += ai * ai / si
                xx += xi * xi
        else:
            q = gc.size // _LANES
            for j in range(q):
                for lane in range(_LANES):
                    i = lane * q + j
                    gi = gc[i]
                    _, si = _sigma(vc[i], gi, beta2, one_minus_beta2, inv_bc2, eps)
                    gg += gi * gi
                    ss += si
                    qq += gi * gi / si
            for i in range(_LANES * q, gc.size):
                gi = gc[i]
                _, si = _sigma(vc[i], gi, beta2, one_minus_beta2, inv_bc2, eps)
                gg += gi * gi
                ss += si
                qq += gi * gi / si
        parts[w, 0] = gg
        parts[w, 1] = ss
        parts[w, 2] = qq
        parts[w, 3] = xx
    out = np.zeros((sizes.size, 4))
    for w in range(tensor.size):  # in order: the sums do not depend on the thread count
        for k in range(4):
            out[tensor[w], k] += parts[w, k]
    return out


def _diag_update(x_addr, g_addr, v_addr, sizes, lam, beta2, one_minus_beta2, inv_bc2, eps, coefficients, apply, zero):
    """For every tensor t with apply[t]: v <- v', x <- x - coefficients[t] * a / sigma."""
    tensor, start = _work_items(sizes)
    for w in numba.prange(tensor.size):
        t = tensor[w]
        if apply[t] == 0:
            continue
        xc = _chunk(x_addr, sizes, t, start[w], zero)
        gc = _chunk(g_addr, sizes, t, start[w], zero)
        vc = _chunk(v_addr, sizes, t, start[w], zero)
        c = coefficients[t]
        q = xc.size // _LANES
        for j in range(q):
            for lane in range(_LANES):
                i = lane * q + j
                xi = xc[i]
                ai = gc[i] + lam * xi
                vi, si = _sigma(vc[i], ai, beta2, one_minus_beta2, inv_bc2, eps)
                vc[i] = vi
                xc[i] = xi - c * ai / si
        for i in range(_LANES * q, xc.size):
            xi = xc[i]
            ai = gc[i] + lam * xi
            vi, si = _sigma(vc[i], ai, beta2, one_minus_beta2, inv_bc2, eps)
            vc[i] = vi
            xc[i] = xi - c * ai / si


_diag_sums_parallel, _diag_sums_serial = _compile(_diag_sums)
_diag_update_parallel, _diag_update_serial = _compile(_diag_update)


def _scalars(table: _Table, lam: float, beta2: float, inv_bc2: float, eps: float) -> tuple[np.generic, ...]:
    s = table.scalar
    return s(lam), s(beta2), s(1 - beta2), s(inv_bc2), s(eps)


def sums(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    second_moments: Sequence[Tensor],
    weight_decay: float,
    beta2: float,
    inv_bc2: float,
    eps: float,
) -> np.ndarray:
    """Per block [|g|^2, sum sigma, sum a^2 / sigma, |x|^2] as float64, shape (blocks, 4); nothing is written."""
    table = _Table(params)
    kernel = _diag_sums_parallel if table.parallel else _diag_sums_serial
    with_x = weight_decay != 0
    result: np.ndarray = kernel(
        table.addresses(grads),
        table.addresses(params if with_x else grads),
        table.addresses(second_moments),
        table.sizes,
        *_scalars(table, weight_decay, beta2, inv_bc2, eps),
        with_x,
        table.zero,
    )
    return result


def update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    second_moments: Sequence[Tensor],
    weight_decay: float,
    beta2: float,
    inv_bc2: float,
    eps: float,
    coefficients: np.ndarray,
    apply: np.ndarray,
) -> None:
    """v <- v' and x <- x - coefficients[b] a / sigma for every block b with apply[b] (the others untouched)."""
    table = _Table(params)
    kernel = _diag_update_parallel if table.parallel else _diag_update_serial
    kernel(
        table.addresses(params),
        table.addresses(grads),
        table.addresses(second_moments),
        table.sizes,
        *_scalars(table, weight_decay, beta2, inv_bc2, eps),
        np.asarray(coefficients, table.scalar),
        np.asarray(apply, np.int64),
        table.zero,
    )


def warm_up(dtype: torch.dtype = torch.float32) -> None:
    """Load both kernels for `dtype` tensors now (serial and parallel), like `koala.cpu_kernels.warm_up`."""
    cpu_kernels.warm_up(dtype)
    if not cpu_kernels.by_default():
        return
    scalar = np.float32 if dtype == torch.float32 else np.float64
    int_array = numba.typeof(np.zeros(1, np.int64))
    value, coefficients = numba.typeof(scalar(0)), numba.typeof(np.zeros(1, scalar))
    flag = numba.typeof(True)
    sums_signature = (int_array,) * 4 + (value,) * 5 + (flag, value)
    update_signature = (int_array,) * 4 + (value,) * 5 + (coefficients, int_array, value)
    for kernel, signature in (
        (_diag_sums_parallel, sums_signature),
        (_diag_sums_serial, sums_signature),
        (_diag_update_parallel, update_signature),
        (_diag_update_serial, update_signature),
    ):
        kernel.compile(signature)
