"""KOALA, the Kalman Optimization Algorithm with Loss Adaptivity, as PyTorch optimizers.

from koala import KoalaM
opt = KoalaM(model.parameters())
...
losses.mean().backward()
opt.step(loss=losses)   # per-sample losses
"""

from koala.optim import KoalaM, KoalaV

__version__ = "0.1.0"
__all__ = ["KoalaM", "KoalaV", "__version__"]
