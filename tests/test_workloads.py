"""The workload registry and the embedded workloads, through `koala.workloads.get`."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from koala import workloads
from koala.workloads.quadratic import NoisyQuadratic

EMBEDDED = ["digits-mlp", "digits-cnn", "noisy-quadratic"]


def test_names_list_every_builtin() -> None:
    assert {*EMBEDDED, "char-lm", "cifar10-resnet18", "cifar100-resnet18", "wikitext2-lstm"} <= set(workloads.names())


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_workload_protocol(name: str) -> None:
    cls = workloads.workload_class(name)
    workload = workloads.get(name, **cls.Config.tiny())
    assert workload.mode in ("max", "min")
    torch.manual_seed(0)
    model = workload.build_model()
    batches = list(workload.train_batches(0, torch.Generator().manual_seed(1)))
    again = list(workload.train_batches(0, torch.Generator().manual_seed(1)))
    other = list(workload.train_batches(0, torch.Generator().manual_seed(2)))
    assert all(torch.equal(a, b) for x, y in zip(batches, again, strict=True) for a, b in zip(x, y, strict=True))
    assert not torch.equal(batches[0][0], other[0][0])
    losses = workload.losses(model, batches[0])
    assert losses.shape[0] == batches[0][0].shape[0]
    assert (losses > 0).all()
    with torch.no_grad():
        metrics = workload.evaluate(model)
    assert workload.metric in metrics
    assert all(isinstance(v, float) for v in metrics.values())


def test_digits_split_is_fixed_and_stratified() -> None:
    workload = workloads.get("digits-mlp")
    batches = list(workload.train_batches(0, torch.Generator().manual_seed(0)))
    labels = torch.cat([y for _, y in batches])
    assert len(labels) == 1437  # 80% of 1,797
    assert torch.bincount(labels).min() >= 135  # stratified: every class near 10%
    assert batches[0][0].shape == (32, 64)
    cnn = workloads.get("digits-cnn", batch_size=8)
    assert next(cnn.train_batches(0, torch.Generator()))[0].shape == (8, 1, 8, 8)


def test_noisy_quadratic_risk_and_noise() -> None:
    workload = workloads.get("noisy-quadratic", dimension=4, condition=100.0)
    assert isinstance(workload, NoisyQuadratic)
    exponent = math.log(100) / math.log(4)  # h_i = i^-exponent spans the condition number exactly
    torch.testing.assert_close(workload.curvature, torch.tensor([1.0, 2**-exponent, 3**-exponent, 0.01]))
    model = workload.build_model()
    # w_0 = h^-1/2: each direction contributes 1/2 to the excess risk.
    assert workload.evaluate(model)["val_excess_risk"] == pytest.approx(2.0)
    (centres,) = next(workload.train_batches(0, torch.Generator().manual_seed(0)))
    big = torch.cat([next(workload.train_batches(0, torch.Generator().manual_seed(s)))[0] for s in range(200)])
    torch.testing.assert_close(big.var(0) * workload.curvature, torch.ones(4), rtol=0.15, atol=0)  # c ~ N(0, H^-1)
    assert centres.shape == (32, 4)


@pytest.mark.parametrize(
    ("name", "config", "message"),
    [
        ("digits-mlp", {"hiden": 3}, r"unknown config key\(s\) hiden for workload 'digits-mlp'; valid: .*hidden"),
        ("digits-mlp", {"hidden": "wide"}, r"hidden: expected int for workload 'digits-mlp', got str 'wide'"),
        ("digits-mlp", {"hidden": True}, r"hidden: expected int"),
        ("digits-mlp", {"batch_size": 0}, r"batch_size: must be >= 1, got 0"),
        ("digits-cnn", {"validation_fraction": 0.9}, r"validation_fraction: must be in \[0.05, 0.5\]"),
        ("noisy-quadratic", {"condition": 0.5}, r"condition: must be >= 1"),
        ("noisy-quadratic", {"samples_per_epoch": 4, "batch_size": 8}, r"samples_per_epoch: must be >= batch_size"),
        ("mnist", {}, r"unknown workload 'mnist'; valid: .*digits-mlp"),
        ("nowhere.module:Thing", {}, r"cannot load workload 'nowhere.module:Thing'"),
        ("koala.optim:KoalaM", {}, r"not a koala.workloads.Workload subclass"),
    ],
)
def test_bad_names_and_configs(name: str, config: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        workloads.get(name, **config)


def test_int_accepted_for_float_field() -> None:
    assert workloads.get("noisy-quadratic", condition=10).config.condition == 10.0  # type: ignore[attr-defined]


def test_user_workload_by_module_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_workloads.py").write_text(
        textwrap.dedent(
            """
            from koala.workloads.quadratic import NoisyQuadratic

            class Tiny(NoisyQuadratic):
                name = "tiny-quadratic"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    workload = workloads.get("my_workloads:Tiny", dimension=3)
    assert workload.name == "tiny-quadratic"
    sys.modules.pop("my_workloads", None)


def test_user_workload_by_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed distribution that declares the entry point group `koala.workloads` is found by name."""
    package = tmp_path / "plugin_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from koala.workloads.quadratic import NoisyQuadratic as Plugged\n")
    dist_info = tmp_path / "plugin_pkg-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-pkg\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[koala.workloads]\nplugged-quadratic = plugin_pkg:Plugged\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugged-quadratic" in workloads.names()
    assert isinstance(workloads.get("plugged-quadratic", dimension=2), NoisyQuadratic)
    sys.modules.pop("plugin_pkg", None)
