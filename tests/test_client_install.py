"""The client installs alone: the project's wheel with the `client` extra, in a fresh virtual environment (no system
site packages), has no torch, Ray, Optuna, FastAPI or Numba, and its `koala` command works against a live server.

pip fetches the client's dependencies from the package index (its cache makes later runs quick); a machine that
cannot reach the index skips these tests, saying so.
"""

from __future__ import annotations

import email.parser
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CLIENT = {"httpx", "pydantic", "pyyaml", "click", "rich", "matplotlib"}
SERVER_ONLY = ["torch", "numba", "ray", "optuna", "fastapi", "uvicorn", "sqlalchemy", "pydantic_settings"]
NO_INDEX = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable", "timed out")


@dataclass
class ClientVenv:
    wheel: Path
    path: Path
    env: dict[str, str]
    cwd: Path  # outside the repository, so that its `koala` and `service` folders are not on sys.path
    data_dir: Path  # KOALA_DATA_DIR of the commands, which none of them should create

    def run(self, program: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.path / "bin" / program), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=self.cwd,
        )


def pip(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    # --no-input: never wait for credentials; the version check is a request nobody needs here.
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 and any(sign in result.stdout + result.stderr for sign in NO_INDEX):
        pytest.skip(f"the package index cannot be reached: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> ClientVenv:
    root = tmp_path_factory.mktemp("client-install")
    pip("wheel", "--no-deps", "--quiet", "--wheel-dir", str(root / "dist"), str(ROOT), timeout=300)
    (wheel,) = (root / "dist").glob("koala_optim-*.whl")
    venv = root / "venv"
    # Without pip of its own: the test's pip installs into it (`pip --python`), which saves seeding one.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    pip("--python", str(venv / "bin" / "python"), "install", "--no-compile", "--quiet", f"{wheel}[client]", timeout=600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOALA_", "PYTHON", "VIRTUAL_ENV"))}
    env["KOALA_DATA_DIR"] = str(root / "data")
    cwd = root / "work"
    cwd.mkdir()
    return ClientVenv(wheel, venv, env, cwd, root / "data")


def test_the_client_extra_is_the_sdk_and_the_command_line(client_venv: ClientVenv) -> None:
    with zipfile.ZipFile(client_venv.wheel) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(wheel.read(name).decode())
    requirements = [Requirement(spec) for spec in metadata.get_all("Requires-Dist") or []]
    base = [r for r in requirements if r.marker is None]
    client = {canonicalize_name(r.name) for r in requirements if r.marker and r.marker.evaluate({"extra": "client"})}
    assert base == []  # a bare install pulls nothing, torch least of all
    assert client == CLIENT


def test_the_client_install_has_no_server_dependency(client_venv: ClientVenv) -> None:
    code = (
        "import importlib.util, json, sys; import koala_client, koala_client.cli; "
        f"absent = [m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m) is None]; "
        "loaded = sorted({m.partition('.')[0] for m in sys.modules} & {'service', 'koala'}); "
        "print(json.dumps([absent, loaded, sys.prefix, sys.base_prefix != sys.prefix]))"
    )
    result = client_venv.run("python", "-c", code)
    assert result.returncode == 0, result.stderr
    absent, loaded, prefix, in_venv = json.loads(result.stdout)
    assert absent == SERVER_ONLY
    assert loaded == []
    assert (Path(prefix), in_venv) == (client_venv.path, True)


def test_the_client_talks_to_a_live_server(client_venv: ClientVenv, server_factory: Callable[..., Any]) -> None:
    # No scheduler: the job stays queued, so the test starts neither Ray nor a driver.
    server = server_factory(run_scheduler=False)
    url = ["--url", server.url]
    submitted = client_venv.run("koala", "submit", str(ROOT / "examples" / "digits.yaml"), *url)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id

    listed = client_venv.run("koala", "jobs", *url)
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout
    assert "queued" in listed.stdout

    optimizers = client_venv.run("koala", "optimizers", *url)
    assert optimizers.returncode == 0, optimizers.stderr
    assert "koala-m" in optimizers.stdout

    cancelled = client_venv.run("koala", "cancel", job_id, *url)
    assert (cancelled.returncode, cancelled.stdout.strip()) == (0, "cancelled"), cancelled.stderr


@pytest.mark.parametrize("args", [["serve"], ["token", "create"], ["run", str(ROOT / "examples" / "digits.yaml")]])
def test_server_commands_say_to_install_the_service(client_venv: ClientVenv, args: list[str]) -> None:
    result = client_venv.run("koala", *args)
    assert result.returncode == 1
    assert "this command runs the service: install koala-optim[service] (missing module: " in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(client_venv.cwd.iterdir())
    assert not client_venv.data_dir.exists()
