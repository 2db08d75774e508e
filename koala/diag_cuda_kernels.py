"""Fused CUDA kernels of `koala.KoalaDiag`, written in Triton on the machinery of `koala.cuda_kernels`.

Through `torch._foreach_*` a KoalaDiag step makes a dozen full-size temporaries and a few hundred launches (0-d filter
arithmetic, per-tensor masks). These kernels do it in a handful of launches and two passes over memory, like the CPU
kernels of `koala.diag_cpu_kernels`:

    block sums     one pass reading g (and x with weight decay) and v: per tile sum g^2, sum sigma, sum a^2 / sigma
                   and lam/2 sum x^2, with a = g + lam x, v' = beta2 v + (1 - beta2) a^2,
                   sigma = sqrt(v' / (1 - beta2^t)) + eps; then the library's per-block reduction (no atomics)
    filter         one single-program kernel: R from the loss moments, the skip rule, the one innovation S, every
                   block's coefficient and the covariance, written into the optimizer's state in place
    update         one pass per run of tensors: v <- v' and x <- x - lr c_b a / sigma where block b is updated

The update recomputes v' and sigma with the statistics pass's arithmetic, so the gain formed from the sums and the
step applied agree. The bias correction 1 / (1 - beta2^t) is formed on the device from the step count (float64,
by repeated squaring), so `step()` reads nothing back and never synchronises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from koala import cuda_kernels
from koala import functional as F
from koala.cuda_kernels import _COLUMNS, _DTYPES, TILE, Layout, _accumulator, _launch_runs, _split

if cuda_kernels.AVAILABLE:
    import triton
    import triton.language as tl

    from koala.cuda_kernels import _column, _tile_of

    @triton.jit
    def _inv_bias_correction(step, beta2_hi, beta2_lo):
        """1 / (1 - beta2^(t + 1)) in float64 for the step count t stored at `step` (t < 2^32)."""
        count = tl.load(step)
        n = (count + 1.0).to(tl.int64)
        base = (count * 0.0 + beta2_hi) + beta2_lo  # float64 (the constants alone would add in float32)
        power = count * 0.0 + 1.0
        for _ in tl.static_range(32):
            power = tl.where((n & 1) != 0, power * base, power)
            base = base * base
            n = n >> 1
        return 1.0 / (1.0 - power)

    @triton.jit
    def _direction_and_sigma(
        row, offsets, mask, inv_bc2, lam_hi, lam_lo, beta2_hi, beta2_lo, keep_hi, keep_lo, eps_hi, eps_lo,
        DTYPE: tl.constexpr, ACC: tl.constexpr, WITH_DECAY: tl.constexpr,
    ):  # fmt: skip
        """(g, x, a, v', sigma) of one tile, in the accumulator dtype; x is 0 without weight decay (not read)."""
        g = tl.load(_column(row, 1, DTYPE) + offsets, mask=mask, other=0.0).to(ACC)
        v = tl.load(_column(row, 2, DTYPE) + offsets, mask=mask, other=0.0).to(ACC)
        if WITH_DECAY:
            x = tl.load(_column(row, 0, DTYPE) + offsets, mask=mask, other=0.0).to(ACC)
            a = g + (x * lam_hi + x * lam_lo)
        else:
            x = g * 0.0
            a = g
        v_new = (v * beta2_hi + v * beta2_lo) + (a * a) * keep_hi + (a * a) * keep_lo
        sigma = tl.sqrt(v_new * inv_bc2.to(ACC)) + eps_hi + eps_lo
        return g, x, a, v_new, sigma

    @triton.jit
    def _diag_sums_kernel(
        table, tile_block, partials, step, first_tile,
        lam_hi, lam_lo, beta2_hi, beta2_lo, keep_hi, keep_lo, eps_hi, eps_lo,
        DTYPE: tl.constexpr, ACC: tl.constexpr, WITH_DECAY: tl.constexpr, COLUMNS: tl.constexpr, TILE: tl.constexpr,
    ):  # fmt: skip
        """Per tile: sum g^2, sum sigma, sum a^2 / sigma, lam/2 sum x^2 (float64); nothing else is written."""
        tile = first_tile + tl.program_id(0)
        _, row, offsets, mask = _tile_of(table, tile_block, tile, COLUMNS, TILE)
        inv_bc2 = _inv_bias_correction(step, beta2_hi, beta2_lo)
        g, x, a, _, sigma = _direction_and_sigma(
            row, offsets, mask, inv_bc2, lam_hi, lam_lo, beta2_hi, beta2_lo, keep_hi, keep_lo, eps_hi, eps_lo,
            DTYPE, ACC, WITH_DECAY,
        )  # fmt: skip
        out = partials + tile * 4
        tl.store(out, tl.sum(g * g, axis=0).to(tl.float64))
        tl.store(out + 1, tl.sum(tl.where(mask, sigma, 0.0), axis=0).to(tl.float64))
        tl.store(out + 2, tl.sum(a * a / sigma, axis=0).to(tl.float64))
        xx = tl.sum(x * x, axis=0).to(tl.float64)
        tl.store(out + 3, xx * (lam_hi * 0.5) + xx * (lam_lo * 0.5))

    @triton.jit
    def _diag_filter_kernel(
        stats, moments, table, covariance, noise, step, coefficients, count_before, blocks,
        decay_hi, decay_lo, keep_hi, keep_lo, q_hi, q_lo,
        ADAPTIVE: tl.constexpr, B: tl.constexpr, COLUMNS: tl.constexpr, THRESHOLD: tl.constexpr,
    ):  # fmt: skip
        """The step's scalars (`KoalaDiag._filter`): per block [coefficient, applied] into `coefficients` (B, 3);
        the step count before this step into `count_before`, for the update's bias correction."""
        index = tl.arange(0, B)
        valid = index < blocks
        gg = tl.load(stats + index * 4, mask=valid, other=0.0)
        sigma_sum = tl.load(stats + index * 4 + 1, mask=valid, other=0.0)
        quadratic = tl.load(stats + index * 4 + 2, mask=valid, other=0.0)
        l2_terms = tl.load(stats + index * 4 + 3, mask=valid, other=0.0)
        numels = tl.load(table + index * COLUMNS + 4, mask=valid, other=0).to(tl.float64)
        has_grad = tl.load(table + index * COLUMNS + 1, mask=valid, other=0) != 0
        total = tl.load(moments)
        total_sq = tl.load(moments + 1)
        count = tl.load(moments + 2)
        big_l = total / count
        check = tl.sum(gg + sigma_sum + quadratic + l2_terms, axis=0) + big_l + total_sq
        # check - check is NaN for any NaN or inf among the statistics; kept as a vector (broadcast) like `updated`.
        all_finite = (gg * 0.0 + (check - check)) == 0.0
        updated = valid & has_grad & (tl.sqrt(gg) >= THRESHOLD) & all_finite
        finite = tl.max(all_finite.to(tl.int32), axis=0) > 0
        take = finite & (tl.max(updated.to(tl.int32), axis=0) > 0)
        numel = tl.sum(tl.where(updated, numels, 0.0), axis=0)
        scale = tl.sum(tl.where(updated, sigma_sum, 0.0), axis=0) / tl.where(numel > 0, numel, 1.0)  # c
        big_g = scale * tl.sum(tl.where(updated, quadratic, 0.0), axis=0)
        l2 = tl.sum(tl.where(updated, l2_terms, 0.0), axis=0)
        old_noise = tl.load(noise)
        new_noise = old_noise
        if ADAPTIVE:
            deviations = total_sq - total * big_l
            deviations = tl.where(deviations > 0, deviations, 0.0)
            variance = deviations / tl.where(count > 1, count - 1, 1.0)
            blended = (old_noise * decay_hi + old_noise * decay_lo) + (variance * keep_hi + variance * keep_lo)
            new_noise = tl.where(take & (count > 1), blended, old_noise)
        tl.store(noise, new_noise)
        prior = tl.load(covariance)
        innovation = prior * big_g + new_noise  # S
        safe = tl.where(take, innovation, 1.0)
        gain = tl.where(take, prior * (big_l + l2) / safe, 0.0)
        applied = updated & take
        tl.store(coefficients + index * 3, tl.where(applied, gain * scale, 0.0), mask=valid)
        tl.store(coefficients + index * 3 + 1, applied.to(tl.float64), mask=valid)
        posterior = prior * new_noise / safe
        tl.store(covariance, tl.where(take, (posterior + q_hi) + q_lo, prior))
        count_so_far = tl.load(step)
        tl.store(count_before, count_so_far)
        tl.store(step, count_so_far + take.to(tl.float64))

    @triton.jit
    def _diag_update_kernel(
        table, tile_block, coefficients, count_before, first_tile,
        lr_hi, lr_lo, lam_hi, lam_lo, beta2_hi, beta2_lo, keep_hi, keep_lo, eps_hi, eps_lo,
        DTYPE: tl.constexpr, ACC: tl.constexpr, WITH_DECAY: tl.constexpr, COLUMNS: tl.constexpr, TILE: tl.constexpr,
    ):  # fmt: skip
        """v <- v' and x <- x - lr c_b a / sigma where block b is updated; other blocks touch no memory. The bias
        correction is the sums kernel's: from the count before the filter counted this step (`count_before`)."""
        tile = first_tile + tl.program_id(0)
        block, row, offsets, mask = _tile_of(table, tile_block, tile, COLUMNS, TILE)
        if tl.load(coefficients + block * 3 + 1) != 0.0:
            inv_bc2 = _inv_bias_correction(count_before, beta2_hi, beta2_lo)
            c = tl.load(coefficients + block * 3)
            _, x, a, v_new, sigma = _direction_and_sigma(
                row, offsets, mask, inv_bc2, lam_hi, lam_lo, beta2_hi, beta2_lo, keep_hi, keep_lo, eps_hi, eps_lo,
                DTYPE, ACC, WITH_DECAY,
            )  # fmt: skip
            if not WITH_DECAY:
                x = tl.load(_column(row, 0, DTYPE) + offsets, mask=mask, other=0.0).to(ACC)
            scale = (c * lr_hi + c * lr_lo).to(ACC)
            tl.store(_column(row, 2, DTYPE) + offsets, v_new.to(DTYPE), mask=mask)
            tl.store(_column(row, 0, DTYPE) + offsets, (x - scale * a / sigma).to(DTYPE), mask=mask)


def step(
    blocks: F.Blocks,
    lay: Layout,
    moments: Tensor,
    state: dict[str, Tensor],
    *,
    noise_decay: float | None,
    beta2: float,
    eps: float,
    process_noise: float,
) -> None:
    """One KoalaDiag step on the device: block sums, filter and update. `state` holds the 0-d float64 tensors
    covariance, measurement_noise and step (updated in place); the layout's second state column holds v."""
    ws = lay.workspace
    partials = ws.buffer("diag_tile_sums", ws.tile_sums.shape[0], 4)
    stats = ws.buffer("diag_stats", len(blocks), 4)
    coefficients, count_before = ws.coefficients, ws.scratch
    moment_constants = (*_split(beta2), *_split(1 - beta2), *_split(eps))

    def launch_sums(run: Any, first: int, tiles: int, dtype: torch.dtype) -> None:
        _diag_sums_kernel[(tiles,)](
            lay.table, lay.tile_block, partials, state["step"], first,
            *_split(run.weight_decay), *moment_constants,
            DTYPE=_DTYPES[dtype], ACC=_accumulator(dtype), WITH_DECAY=run.weight_decay != 0,
            COLUMNS=_COLUMNS, TILE=TILE,
        )  # fmt: skip

    _launch_runs(blocks, lay, with_grad=True, launch=launch_sums)
    cuda_kernels.reduce_blocks(lay, partials, stats)
    decay = 1.0 if noise_decay is None else noise_decay
    _diag_filter_kernel[(1,)](
        stats, moments, lay.table, state["covariance"], state["measurement_noise"], state["step"], coefficients,
        count_before, len(blocks), *_split(decay), *_split(1 - decay), *_split(process_noise),
        ADAPTIVE=noise_decay is not None, B=max(16, int(triton.next_power_of_2(len(blocks)))), COLUMNS=_COLUMNS,
        THRESHOLD=F.GRADIENT_THRESHOLD,
    )  # fmt: skip

    def launch_update(run: Any, first: int, tiles: int, dtype: torch.dtype) -> None:
        _diag_update_kernel[(tiles,)](
            lay.table, lay.tile_block, coefficients, count_before, first,
            *_split(run.lr), *_split(run.weight_decay), *moment_constants,
            DTYPE=_DTYPES[dtype], ACC=_accumulator(dtype), WITH_DECAY=run.weight_decay != 0,
            COLUMNS=_COLUMNS, TILE=TILE,
        )  # fmt: skip

    _launch_runs(blocks, lay, with_grad=True, launch=launch_update)


__all__ = ["step"]
