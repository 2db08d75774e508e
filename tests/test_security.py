"""Security checks that need real processes: `koala run` refusing a workload class it cannot use, and the session
cookie marked Secure behind a TLS proxy that uvicorn (as `koala serve` runs it) is told to trust.

Everything else a hostile client can try with requests alone (workloads named by module, paths in a spec, bounded
sizes, Host and origin checks, credentials before the body, sessions, revocation, ownerless jobs, the queue cap) is
checked in-process in tests/test_api.py; fencing of drivers, time limits, clean-up and the scheduler's fairness in
tests/test_driver_safety.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.testing import server_environment
from tests.helpers import create_token, start_server

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def test_koala_run_refuses_an_abstract_or_broken_workload_class(tmp_path: Path) -> None:
    (tmp_path / "my_workloads.py").write_text(
        "from koala.workloads import Workload\n"
        "class Half(Workload):\n"
        "    metric, mode = 'val_accuracy', 'max'\n"
        "raise_here = None\n"
    )
    (tmp_path / "broken_workloads.py").write_text("def oops(:\n")
    (data_dir := tmp_path / "koala").mkdir()
    for name, expected in [("my_workloads:Half", "abstract"), ("broken_workloads:X", "broken_workloads")]:
        job = tmp_path / f"{name.split(':')[0]}.yaml"
        job.write_text(f"workload: '{name}'\nepochs: 1\nseeds: 1\noptimizers: [{{name: sgd}}]\n")
        result = subprocess.run(
            [sys.executable, "-m", "koala_client.cli", "run", str(job)],
            env={**server_environment(data_dir), "PYTHONPATH": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert result.returncode == 2, result.stderr
        assert "workload" in result.stderr, result.stderr
        assert expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_secure_cookie_behind_a_trusted_tls_proxy(tmp_path: Path) -> None:
    server = start_server(tmp_path, "proxy", trusted_proxies="127.0.0.1")
    try:
        token = create_token(server, "--name", "user")
        own = f"https://127.0.0.1:{server.port}"
        with httpx.Client(base_url=server.url, headers={"Origin": own, "X-Forwarded-Proto": "https"}) as browser:
            response = browser.post("/ui/login", data={"token": token, "next": "/ui"})
        assert response.status_code == 303, response.text
        assert "secure" in response.headers["set-cookie"].lower()
    finally:
        server.stop()
