"""The warm checker of uploaded workloads (service/workload_checker.py) in this process, without Ray: each check runs
in a child forked from its fork server, in a directory of its own, and whatever the uploaded code does there comes
back as an answer or an error, never as an object of its making. On the cluster it runs as a Ray actor
(tests/test_uploads.py, the two-node test)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest

from koala_client import packing
from service.workload_checker import WorkloadChecker

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_workload" / "tiny_regression"
LIMITS = (1000, 200 << 20)
CONFIG = {"samples": 256, "hidden": 8}


@pytest.fixture(scope="module")
def checker() -> Iterator[WorkloadChecker]:
    checker = WorkloadChecker()
    yield checker
    checker.root.rmdir()  # empty: every check removed its directory


def example(root: Path, prelude: str = "", metric: str | None = None) -> bytes:
    """The example workload packed as package `tiny_regression`, its __init__.py starting with `prelude` and its
    default metric renamed to `metric` if given."""
    target = root / "tiny_regression"
    shutil.copytree(EXAMPLE, target)
    init = target / "__init__.py"
    init.write_text(prelude + init.read_text())
    if metric is not None:
        model = target / "model.py"
        model.write_text(model.read_text().replace('metric = "val_rmse"', f'metric = "{metric}"'))
    return packing.pack(target).data


def check(checker: WorkloadChecker, pack: bytes, timeout: float = 60.0, name: str = "") -> dict[str, object]:
    answer = checker.check(pack, name or "tiny_regression.model:TinyRegression", CONFIG, None, timeout, LIMITS)
    result = json.loads(answer)
    assert isinstance(result, dict)
    return result


def test_each_check_runs_its_own_pack_in_a_child_of_its_own(checker: WorkloadChecker, tmp_path: Path) -> None:
    marker = tmp_path / "imported-by.jsonl"
    record = "_j.dumps([_o.getpid(), _o.getcwd()]) + '\\n'"
    prelude = f"import json as _j, os as _o\nopen({str(marker)!r}, 'a').write({record})\n"
    first = check(checker, example(tmp_path / "a", prelude))
    assert first["metric"] == "val_rmse"
    assert first["modes"] == {"val_rmse": "min", "val_loss": "min"}
    # The same package name with other code: the second child imports its own pack, not the first one's module.
    second = check(checker, example(tmp_path / "b", prelude, metric="val_loss"))
    assert second["metric"] == "val_loss"
    runs = [json.loads(line) for line in marker.read_text().splitlines()]
    assert len(runs) == 2
    assert len({pid for pid, _ in runs} | {os.getpid()}) == 3  # two children, neither of them this process
    assert all("koala-workload-checks-" in cwd for _, cwd in runs)
    assert not any(Path(cwd).exists() for _, cwd in runs)  # each directory removed after its check
    assert not any(name.split(".")[0] == "tiny_regression" for name in list(sys.modules))  # nor here


def test_what_the_uploaded_code_does_comes_back_as_an_error(checker: WorkloadChecker, tmp_path: Path) -> None:
    hangs = check(checker, example(tmp_path / "hang", "import time\ntime.sleep(60)\n"), timeout=2.0)
    assert hangs["error"] == "checking the workload took more than 2 s"
    exits = check(checker, example(tmp_path / "exit", "import os\nos._exit(3)\n"))
    assert exits["error"] == "the check's process ended (exit code 3) without an answer"
    raises = check(checker, example(tmp_path / "raise", "raise SystemExit('no')\n"))
    assert "SystemExit: no" in str(raises["error"])
    missing = check(checker, example(tmp_path / "missing"), name="tiny_regression.model:Missing")
    assert "has no attribute 'Missing'" in str(missing["error"])


def test_a_pack_is_inspected_again_before_it_is_unpacked(checker: WorkloadChecker) -> None:
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../escape.py", "print('out')\n")
    refused = check(checker, buffer.getvalue())
    assert str(refused["error"]).startswith("the pack cannot be unpacked: ")
    assert "escape.py" in str(refused["error"])
