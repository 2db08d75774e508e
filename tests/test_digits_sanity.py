"""Sanity: KOALA at its defaults learns scikit-learn's bundled 8x8 digits with a small MLP."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from koala import KoalaM, KoalaV


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    features, labels = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(features, labels, test_size=0.2, random_state=0, stratify=labels)
    train = torch.tensor(x_train, dtype=torch.float32)
    mean, std = train.mean(0), train.std(0) + 1e-3  # standardise with training statistics (some pixels are constant)
    val = torch.tensor(x_val, dtype=torch.float32)
    return (train - mean) / std, torch.tensor(y_train), (val - mean) / std, torch.tensor(y_val)


@pytest.mark.slow
@pytest.mark.parametrize("factory", [KoalaV, KoalaM], ids=["koala-v", "koala-m"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_defaults_reach_95_percent_on_digits(factory: type[torch.optim.Optimizer], seed: int) -> None:
    x_train, y_train, x_val, y_val = digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = factory(model.parameters())
    for _ in range(10):
        for idx in torch.randperm(len(x_train)).split(32):
            losses = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx], reduction="none")
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses)
    opt.eval()  # type: ignore[attr-defined]
    with torch.no_grad():
        accuracy = float((model(x_val).argmax(1) == y_val).float().mean())
    assert accuracy >= 0.95, f"{factory.__name__} seed {seed}: validation accuracy {accuracy:.3f}"
