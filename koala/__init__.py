"""KOALA, the Kalman Optimization Algorithm with Loss Adaptivity, as PyTorch optimizers.

from koala import KoalaM
opt = KoalaM(model.parameters())
...
losses.mean().backward()
opt.step(loss=losses)   # per-sample losses
"""

from koala.koala_diag import KoalaDiag
from koala.koala_plus_plus import KoalaPlusPlus
from koala.optim import KoalaM, KoalaV

__version__ = "0.1.0"
__all__ = ["KoalaDiag", "KoalaM", "KoalaPlusPlus", "KoalaV", "__version__"]
