"""The workload registry and the embedded workloads, through `koala.workloads.get`."""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import logging
import math
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from koala import workloads
from koala.workloads.base import Range
from koala.workloads.quadratic import NoisyQuadratic

EMBEDDED = ["digits-mlp", "digits-cnn", "noisy-quadratic"]
BUILTIN = [*EMBEDDED, "char-lm", "cifar10-resnet18", "cifar100-resnet18", "wikitext2-lstm"]


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """A registry rebuilt on first use, and again after the test (whose entry points and modules are then gone)."""
    modules = set(sys.modules)
    workloads._reset_registry()
    yield
    workloads._reset_registry()
    for name in set(sys.modules) - modules:
        if name.startswith("plugin_") or name.startswith("user_"):
            del sys.modules[name]


def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modules: dict[str, str], entry_points: str = "") -> None:
    """Write `modules` (name -> source) and a distribution declaring `entry_points` (lines of the koala.workloads
    group) into tmp_path, and put it on sys.path."""
    for name, source in modules.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    if entry_points:
        dist_info = tmp_path / "plugin_dist-1.0.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-dist\nVersion: 1.0\n")
        (dist_info / "entry_points.txt").write_text(f"[koala.workloads]\n{textwrap.dedent(entry_points)}")
    monkeypatch.syspath_prepend(str(tmp_path))


# ---- registry ----------------------------------------------------------------------------------------------------


def test_names_list_every_builtin() -> None:
    assert set(BUILTIN) <= set(workloads.names())
    assert workloads.names() == sorted(workloads.registry())


def test_registry_maps_names_to_their_classes_once_per_process() -> None:
    classes = workloads.registry()
    assert all(cls.name == name for name, cls in classes.items())
    assert workloads.workload_class("noisy-quadratic") is classes["noisy-quadratic"] is NoisyQuadratic
    classes.clear()  # a copy: the registry itself is unchanged
    assert workloads.registry().keys() >= set(BUILTIN)


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
        ("digits-mlp", {"batch_size": 0}, r"^batch_size: must be between 1 and 65536, got 0$"),
        ("digits-cnn", {"validation_fraction": 0.9}, r"^validation_fraction: must be between 0.05 and 0.5, got 0.9$"),
        ("noisy-quadratic", {"condition": 0.5}, r"^condition: must be between 1 and 1e\+12, got 0.5$"),
        ("noisy-quadratic", {"samples_per_epoch": 4, "batch_size": 8}, r"samples_per_epoch: must be >= batch_size"),
        ("mnist", {}, r"unknown workload 'mnist'; valid: .*digits-mlp"),
        ("nowhere.module:Thing", {}, r"cannot load workload 'nowhere.module:Thing'"),
        ("koala.optim:KoalaM", {}, r"not a koala.workloads.Workload subclass"),
    ],
)
def test_bad_names_and_configs(name: str, config: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        workloads.get(name, **config)


def test_user_workload_by_module_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    install(
        tmp_path,
        monkeypatch,
        {
            "user_workloads": """
            from koala.workloads.quadratic import NoisyQuadratic

            class Tiny(NoisyQuadratic):
                name = "tiny-quadratic"
            """
        },
    )
    workload = workloads.get("user_workloads:Tiny", dimension=3)
    assert workload.name == "tiny-quadratic"
    with pytest.raises(ValueError, match=r"^unknown workload 'user_workloads:Tiny'; valid: char-lm, "):
        workloads.workload_class("user_workloads:Tiny", allow_import=False)  # even when it is importable


def test_user_workload_by_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None) -> None:
    """An installed distribution that declares the entry point group `koala.workloads` is found by name."""
    install(
        tmp_path,
        monkeypatch,
        {"plugin_pkg": "from koala.workloads.quadratic import NoisyQuadratic as Plugged\n"},
        "plugged-quadratic = plugin_pkg:Plugged\n",
    )
    assert "plugged-quadratic" in workloads.names()
    assert workloads.registry()["plugged-quadratic"] is NoisyQuadratic
    assert isinstance(workloads.get("plugged-quadratic", dimension=2), NoisyQuadratic)
    assert workloads.workload_class("plugged-quadratic", allow_import=False) is NoisyQuadratic


# Modules whose import, or whose attribute, is no concrete Workload subclass, with what the error must say.
BROKEN_MODULES = {
    "plugin_raises": "raise RuntimeError('no GPU here')\n",
    "plugin_syntax": "def broken(:\n",
    "plugin_exits": "raise SystemExit(3)\n",
    "plugin_values": """
        from koala.workloads.base import Workload, WorkloadConfig
        from koala.workloads.quadratic import NoisyQuadratic

        def function():
            return NoisyQuadratic

        class Abstract(Workload):
            name = description = metric = "abstract"
            mode = "min"

        class Nameless(Workload):
            description = metric = "nameless"
            mode = "min"

            def build_model(self): ...
            def train_batches(self, epoch, generator): ...
            def losses(self, model, batch): ...
            def evaluate(self, model): ...

        class BadMode(NoisyQuadratic):
            mode = "up"

        class BadConfig(NoisyQuadratic):
            Config = dict
        """,
}
BROKEN = [
    ("plugin_raises:Thing", r"cannot load workload 'plugin_raises:Thing': RuntimeError: no GPU here"),
    ("plugin_syntax:Thing", r"cannot load workload 'plugin_syntax:Thing': SyntaxError"),
    ("plugin_exits:Thing", r"cannot load workload 'plugin_exits:Thing': SystemExit: 3"),
    ("plugin_missing:Thing", r"cannot load workload 'plugin_missing:Thing': ModuleNotFoundError"),
    ("plugin_values:Missing", r"cannot load workload 'plugin_values:Missing': AttributeError"),
    ("plugin_values:function", r"'plugin_values:function' is <function function .*>, not a koala.workloads.Workload"),
    ("koala.optim:KoalaM", r"not a koala.workloads.Workload subclass"),
    ("plugin_values:Abstract", r"abstract class Abstract \(does not implement build_model, evaluate, losses, "),
    ("koala.workloads.base:Workload", r"'koala.workloads.base:Workload' is the abstract class Workload"),
    ("koala.workloads.cifar:CifarResNet18", r"CifarResNet18 does not set name, description$"),
    ("plugin_values:Nameless", r"'plugin_values:Nameless': the class Nameless does not set name$"),
    ("plugin_values:BadMode", r"BadMode: mode must be 'max' or 'min', got 'up'"),
    ("plugin_values:BadConfig", r"its Config is <class 'dict'>, not a WorkloadConfig subclass"),
    (":Thing", r"cannot load workload ':Thing': ValueError"),
]


@pytest.mark.parametrize(("reference", "message"), BROKEN)
def test_module_references_fail_with_value_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None, reference: str, message: str
) -> None:
    install(tmp_path, monkeypatch, BROKEN_MODULES)
    with pytest.raises(ValueError, match=message):
        workloads.workload_class(reference)
    with pytest.raises(ValueError, match=message):
        workloads.get(reference)


@pytest.mark.parametrize(("reference", "message"), BROKEN)
def test_broken_entry_points_are_skipped_with_a_warning(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fresh_registry: None,
    reference: str,
    message: str,
) -> None:
    modules = {
        **BROKEN_MODULES,
        "plugin_counted": f"with open({str(tmp_path / 'imports')!r}, 'a') as f:\n    f.write('x')\n"
        "raise RuntimeError('counted')\n",
        "plugin_good": "from koala.workloads.quadratic import NoisyQuadratic as Good\n",
    }
    install(
        tmp_path,
        monkeypatch,
        modules,
        f"broken = {reference}\ncounted = plugin_counted:Thing\n"
        "digits-mlp = plugin_good:Good\ngood = plugin_good:Good\n",
    )
    with caplog.at_level(logging.WARNING, logger="koala.workloads"):
        classes = workloads.registry()
        assert workloads.registry() == classes
    assert "broken" not in classes
    assert "counted" not in classes
    assert classes["good"] is NoisyQuadratic
    assert classes["digits-mlp"] is not NoisyQuadratic  # a built-in's name is not taken over
    assert set(BUILTIN) <= set(classes)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 3
    assert any(warning.startswith(f"workload entry point 'broken' ({reference}) skipped: ") for warning in warnings)
    assert any("'digits-mlp' (plugin_good:Good) skipped: the name is taken" in warning for warning in warnings)
    assert (tmp_path / "imports").read_text() == "x"  # loaded once, although registry() was called twice
    with pytest.raises(ValueError, match=r"^unknown workload 'broken'; valid: "):
        workloads.workload_class("broken", allow_import=False)


@pytest.mark.parametrize(
    "name",
    [
        "this:x",
        "venv.__main__:x",
        "koala.workloads.quadratic:NoisyQuadratic",
        "antigravity",
        "os:system",
        "",
        "x" * 500,
    ],
)
def test_unregistered_names_import_nothing_without_allow_import(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], name: str
) -> None:
    workloads.registry()  # built before: what follows may not import anything at all
    for module in ("this", "venv.__main__", "antigravity"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    before = set(sys.modules)
    imported: list[str] = []
    real_import = builtins.__import__

    def recording_import(module: str, *args: Any, **kwargs: Any) -> Any:
        imported.append(module)
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", lambda module, package=None: imported.append(module))
    monkeypatch.setattr(builtins, "__import__", recording_import)  # last: setattr itself imports
    try:
        workloads.workload_class(name, allow_import=False)
    except ValueError as raised:  # pytest.raises would import modules of its own before the undo
        error = raised
    monkeypatch.undo()
    assert imported == []
    assert set(sys.modules) == before
    assert capfd.readouterr() == ("", "")
    valid = ", ".join(sorted(workloads.registry()))
    assert str(error).startswith("unknown workload '")
    assert str(error).endswith(f"; valid: {valid}")
    assert len(str(error)) < 120 + len(valid)  # a long name is cut


def test_registered_names_need_no_import(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in BUILTIN:
        assert workloads.workload_class(name, allow_import=False).name == name


# ---- config ranges -----------------------------------------------------------------------------------------------


def numeric_fields(cls: type[workloads.Workload]) -> list[dataclasses.Field[Any]]:
    return [
        f
        for f in dataclasses.fields(cls.Config)
        if isinstance(f.default, int | float) and not isinstance(f.default, bool)
    ]


@pytest.mark.parametrize("name", BUILTIN)
def test_every_numeric_config_field_has_a_range_in_the_json_schema(name: str) -> None:
    pydantic = pytest.importorskip("pydantic")
    cls = workloads.workload_class(name)
    ranges = cls.Config.ranges()
    fields = numeric_fields(cls)
    assert {f.name for f in fields} == set(ranges)
    properties = pydantic.TypeAdapter(cls.Config).json_schema()["properties"]
    for field in fields:
        bounds, default = ranges[field.name], field.default
        assert isinstance(default, int | float)
        assert bounds.ge <= default <= bounds.le
        assert (properties[field.name]["minimum"], properties[field.name]["maximum"]) == (bounds.ge, bounds.le)
    for field in dataclasses.fields(cls.Config):
        if isinstance(field.default, bool | str):
            assert field.name not in ranges
            assert "minimum" not in properties[field.name]


def test_pydantic_validation_enforces_the_ranges() -> None:
    pydantic = pytest.importorskip("pydantic")
    adapter = pydantic.TypeAdapter(workloads.workload_class("digits-mlp").Config)
    assert adapter.validate_python({"hidden": 4096}).hidden == 4096
    with pytest.raises(pydantic.ValidationError, match="less than or equal to 4096"):
        adapter.validate_python({"hidden": 10**12})


@pytest.mark.parametrize(
    ("name", "key", "value", "message"),
    [
        ("digits-mlp", "hidden", 10**12, "hidden: must be between 1 and 4096, got 1000000000000"),
        ("digits-mlp", "hidden", 0, "hidden: must be between 1 and 4096, got 0"),
        ("digits-mlp", "batch_size", 65_537, "batch_size: must be between 1 and 65536, got 65537"),
        ("digits-mlp", "limit_train", -1, "limit_train: must be between 0 and 1000000, got -1"),
        ("noisy-quadratic", "dimension", 1_000_001, "dimension: must be between 1 and 1000000, got 1000001"),
        ("noisy-quadratic", "samples_per_epoch", 10**15, "samples_per_epoch: must be between 1 and 100000000, got "),
        ("noisy-quadratic", "initial_scale", 0, "initial_scale: must be between 1e-06 and 1e+06, got 0.0"),
        ("char-lm", "layers", 9, "layers: must be between 1 and 8, got 9"),
        ("char-lm", "seq_len", 0, "seq_len: must be between 1 and 4096, got 0"),
        ("char-lm", "limit_chars", -1, "limit_chars: must be between 0 and 1000000000, got -1"),
        ("wikitext2-lstm", "dropout", 1, "dropout: must be between 0 and 0.99, got 1.0"),
        ("wikitext2-lstm", "embedding", 5000, "embedding: must be between 1 and 4096, got 5000"),
        ("wikitext2-lstm", "batch_size", 4097, "batch_size: must be between 1 and 4096, got 4097"),
        ("wikitext2-lstm", "limit_tokens", -1, "limit_tokens: must be between 0 and 1000000000, got -1"),
        ("cifar10-resnet18", "width", 257, "width: must be between 1 and 256, got 257"),
        ("cifar100-resnet18", "batch_size", 8193, "batch_size: must be between 1 and 8192, got 8193"),
        ("cifar10-resnet18", "limit_val", 10**6 + 1, "limit_val: must be between 0 and 1000000, got 1000001"),
    ],
)
def test_values_out_of_range_name_the_field_and_the_range(name: str, key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        workloads.get(name, **{key: value})


@pytest.mark.parametrize(
    ("name", "key", "value", "message"),
    [
        ("noisy-quadratic", "condition", math.nan, r"^condition: must be a finite number .*, got nan$"),
        ("noisy-quadratic", "condition", math.inf, r"^condition: must be a finite number .*, got inf$"),
        ("char-lm", "dropout", -math.inf, r"^dropout: must be a finite number .*, got -inf$"),
        pytest.param(
            "noisy-quadratic",
            "condition",
            10**400,
            r"^condition: must be a finite number .*, got 1000000000",
            id="1e400",
        ),
        pytest.param(
            "digits-mlp",
            "hidden",
            10**5000,
            r"^hidden: must be between 1 and 4096, got an integer of 16610 bits$",
            id="1e5000",
        ),
        ("digits-mlp", "hidden", "9" * 500, r"^hidden: expected int for workload 'digits-mlp', got str '9{76}\.\.\.$"),
        ("digits-mlp", "hidden", 2.0, r"^hidden: expected int .*, got float 2.0$"),
        ("digits-mlp", "validation_fraction", "0.2", r"^validation_fraction: expected float .*, got str '0.2'$"),
        ("cifar10-resnet18", "augment", 1, r"^augment: expected bool .*, got int 1$"),
        ("cifar10-resnet18", "augment", 1.0, r"^augment: expected bool .*, got float 1.0$"),
        ("wikitext2-lstm", "tie_weights", 0, r"^tie_weights: expected bool .*, got int 0$"),
        ("wikitext2-lstm", "data_dir", 3, r"^data_dir: expected str .*, got int 3$"),
        ("noisy-quadratic", "dimension", [1], r"^dimension: expected int .*, got list \[1\]$"),
    ],
)
def test_types_and_non_finite_floats_are_refused(name: str, key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        workloads.get(name, **{key: value})


def test_int_accepted_for_float_field() -> None:
    assert workloads.get("noisy-quadratic", condition=10).config.condition == 10.0  # type: ignore[attr-defined]
    assert isinstance(workloads.get("char-lm", dropout=0).config.dropout, float)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "config", "message"),
    [
        ("noisy-quadratic", {"dimension": 1_000_000, "batch_size": 512}, r"^batch_size: batch_size \* dimension "),
        ("noisy-quadratic", {"dimension": 1_000_000, "samples_per_epoch": 10**5}, r"^samples_per_epoch: "),
        ("char-lm", {"batch_size": 4096, "seq_len": 64}, r"^batch_size: batch_size \* seq_len must be at most 131072"),
        ("wikitext2-lstm", {"hidden": 100}, r"^tie_weights: needs embedding == hidden"),
    ],
)
def test_cross_field_limits(name: str, config: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        workloads.get(name, **config)


def test_unknown_keys_are_listed_briefly() -> None:
    config = {f"key{i}": 1 for i in range(12)} | {"a" * 1000: 1}
    with pytest.raises(ValueError, match=r"^unknown config key\(s\) a{37}\.\.\., key0, .* and 3 more for ") as error:
        workloads.get("digits-mlp", **config)
    assert len(str(error.value)) < 400


@pytest.mark.parametrize(
    ("name", "paths"),
    [
        ("digits-mlp", ()),
        ("noisy-quadratic", ()),
        ("char-lm", ()),
        ("cifar10-resnet18", ("data_dir",)),
        ("cifar100-resnet18", ("data_dir",)),
        ("wikitext2-lstm", ("data_dir",)),
    ],
)
def test_path_fields(name: str, paths: tuple[str, ...]) -> None:
    assert workloads.workload_class(name).Config.path_fields() == paths


def test_range_is_inclusive_and_rejects_nan() -> None:
    bounds = Range(1, 3)
    bounds.check("x", 1)
    bounds.check("x", 3)
    for value in (0, 4, math.nan):
        with pytest.raises(ValueError, match=r"^x: must be between 1 and 3, got "):
            bounds.check("x", value)
