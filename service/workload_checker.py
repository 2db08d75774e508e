"""A warm checker of uploaded workloads: a fresh pack's check without a new Ray worker's start and torch's import.

Checked the plain way (service/upload_runtime.check_workload), a fresh pack waits seconds before its job's first
trial: Ray starts a worker under the job's runtime environment, which imports torch and the library, then the
uploaded module. `WorkloadChecker` is a detached Ray actor (one per cluster, by name, taking no CPU) whose process
keeps a fork server, multiprocessing's "forkserver" context with torch and koala.workloads imported. Each check
unpacks the pack into a directory of its own on the actor's node and runs `service.workload_check.inspect_workload` in
a fresh child forked from that server, with the directory as its working directory and first on its import path:
what Ray's `working_dir` does for a trial. The uploaded code runs only in that child, never in the actor, the job's
driver or the API; the child exits after one check, so nothing of one pack is left for the next, and its answer comes
back as JSON text (bytes, never unpickled). A pack with requirements needs its pip environment, which only Ray's
runtime environment builds: it keeps the plain check.

The scheduler keeps the checker (`CheckerKeeper`): once the cluster answers, and again after the service's Ray head
restarts, it runs `python -m service.workload_checker`, a short process that connects to Ray without a job's runtime
environment (an actor made by a job's driver would inherit the job's pack), starts the actor if it is missing and
waits for it to be warm. A driver that finds no checker checks the plain way.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NAME = "koala-workload-checker"
NAMESPACE = "koala"
# What the fork server imports once. Ray's worker module too: every forked child re-runs its parent's main script
# (multiprocessing's start-up), here Ray's default_worker.py, which imports Ray unless the server has it loaded (0.3 s
# a check). A module that is not there (another Ray's layout) is skipped by the server.
PRELOAD = ["torch", "koala.workloads", "service.workload_check", "ray._private.workers.default_worker"]
MAX_ANSWER_BYTES = 1 << 20  # an answer is a short JSON text
ENSURE_SECONDS = 300.0  # for the ensuring process: Ray's answer and the fork server's warm-up
RETRY_SECONDS = 30.0  # after an ensuring process failed


class WorkloadChecker:
    """The actor (see the module's docstring). Its methods answer JSON text, as `inspect_workload` does."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)
        self.root = Path(tempfile.mkdtemp(prefix="koala-workload-checks-"))  # each check unpacks below it

    def warm_up(self) -> str:
        """One check of a built-in workload: the fork server is started and has imported torch when this returns."""
        return self._in_child(str(self.root), "digits-mlp", {}, None, ENSURE_SECONDS)

    def check(
        self,
        pack: bytes,
        name: str,
        config: dict[str, Any],
        metric: str | None,
        timeout: float,
        limits: tuple[int, int],
    ) -> str:
        """Check workload `name` of `pack` (a zip archive, re-inspected here within `limits`: most files, most
        unpacked bytes) in a forked child; the answer within `timeout` seconds, or an error saying so."""
        from service.packs import PackError, inspect_pack

        directory = Path(tempfile.mkdtemp(dir=self.root))
        try:
            try:
                inspect_pack(io.BytesIO(pack), max_files=limits[0], max_unpacked_bytes=limits[1])
            except PackError as error:
                return json.dumps({"error": f"the pack cannot be unpacked: {error}"})
            with zipfile.ZipFile(io.BytesIO(pack)) as archive:
                archive.extractall(directory)
            return self._in_child(str(directory), name, config, metric, timeout)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _in_child(self, directory: str, name: str, config: dict[str, Any], metric: str | None, timeout: float) -> str:
        from service.workload_check import check_in_directory

        receive, send = self._context.Pipe(duplex=False)
        child = self._context.Process(
            target=check_in_directory, args=(directory, name, config, metric, send), daemon=True
        )
        started = time.monotonic()
        child.start()
        send.close()
        try:
            if receive.poll(timeout):
                return receive.recv_bytes(MAX_ANSWER_BYTES).decode()
            return json.dumps({"error": f"checking the workload took more than {timeout:g} s"})
        except (EOFError, OSError, UnicodeDecodeError):
            child.join(5)
            return json.dumps({"error": f"the check's process ended (exit code {child.exitcode}) without an answer"})
        finally:
            receive.close()
            if child.is_alive():
                child.kill()
            child.join(5)
            log.info("checked %s in %.2f s", name, time.monotonic() - started)


def find() -> Any | None:
    """The cluster's checker (an actor handle), or None where there is none. Needs a Ray connection."""
    import ray

    try:
        return ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def ensure(timeout: float = ENSURE_SECONDS) -> None:
    """Start the cluster's checker if it is missing and wait until it is warm (this process must be connected to Ray
    without a job's runtime environment)."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=-1)(WorkloadChecker)
    checker: Any = actor.options(name=NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()
    answer = json.loads(ray.get(checker.warm_up.remote(), timeout=timeout))
    if "error" in answer:
        raise RuntimeError(f"the workload checker's warm-up check failed: {answer['error']}")


class CheckerKeeper:
    """The scheduler's side: one ensuring process per cluster address (the service's head, or RAY_ADDRESS), again
    when the address changes (a restarted head), and after a failure once RETRY_SECONDS have passed."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.ensured: str | None = None  # the address whose checker is warm
        self._process: subprocess.Popen[bytes] | None = None
        self._for: str | None = None
        self._retry_at = 0.0

    def keep(self, address: str | None, env: dict[str, str]) -> None:
        if self._process is not None:
            code = self._process.poll()
            if code is None:
                return
            if code == 0:
                self.ensured = self._for
            else:
                log.warning("the workload checker could not be started (exit code %d): see %s", code, self.log_path)
                self._retry_at = time.monotonic() + RETRY_SECONDS
            self._process = None
        if address is None or address == self.ensured or time.monotonic() < self._retry_at:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as output:
            self._process = subprocess.Popen(
                [sys.executable, "-P", "-m", "service.workload_checker"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**env, "RAY_ADDRESS": address},
                cwd=self.log_path.parent,
                start_new_session=True,
            )
        self._for = address

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()


def main() -> int:
    """Connect to the cluster in RAY_ADDRESS, start its checker if missing, wait for it to be warm."""
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started = time.monotonic()
    address = os.environ["RAY_ADDRESS"]
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        ensure()
    finally:
        ray.shutdown()
    log.info("workload checker warm on %s in %.1f s", address, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
