"""KOALA, the Kalman Optimization Algorithm with Loss Adaptivity, as PyTorch optimizers.

from koala import KoalaM
opt = KoalaM(model.parameters())
...
losses.mean().backward()
opt.step(loss=losses)   # per-sample losses

The optimizers are imported on first use (PEP 562): `from koala import workloads`, which every trial and every check
of an uploaded workload runs, then costs torch alone, not the optimizers' Numba and Triton kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from koala.koala_diag import KoalaDiag
    from koala.koala_plus_plus import KoalaPlusPlus
    from koala.optim import KoalaM, KoalaV

__version__ = "0.1.0"
__all__ = ["KoalaDiag", "KoalaM", "KoalaPlusPlus", "KoalaV", "__version__"]

_HOMES = {
    "KoalaDiag": "koala.koala_diag",
    "KoalaPlusPlus": "koala.koala_plus_plus",
    "KoalaM": "koala.optim",
    "KoalaV": "koala.optim",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'koala' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups find it directly
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
