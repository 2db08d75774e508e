"""The check of an uploaded workload, run as a short Ray task where the job's pack is unpacked (see
service/upload_runtime.py). A module of its own, importing nothing beyond the standard library until it runs, so the Ray
worker that runs it pays only for the workload's own imports."""

from __future__ import annotations

import json
import os
import time
from typing import Any


def process_started_at() -> float | None:
    """When this process started (Unix time), or None where /proc does not say. A Ray worker under a runtime
    environment keeps its pid from the raylet's spawn through setup_worker's exec into the worker proper."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            age = float(uptime.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError):
        return None


def inspect_workload(name: str, config: dict[str, Any], metric: str | None) -> str:
    """Import the workload `name` ("package.module:Class", from the job's upload) and check it and its config.

    Answers JSON text, never an object of the uploaded code: {"metric": default metric, "modes": {metric: "max" |
    "min"}} or {"error": message}, either with "timing": Unix times of the worker's start, of the check's start and
    of the end of the workload's import (the driver logs where the check's seconds went)."""
    timing: dict[str, float | None] = {"process": process_started_at(), "start": time.time()}

    def answer(result: dict[str, Any]) -> str:
        timing.setdefault("imported", time.time())
        return json.dumps({**result, "timing": timing})

    try:
        from koala import workloads

        timing["koala"] = time.time()
        try:
            cls = workloads.workload_class(name)  # imports the uploaded module, here on a Ray node
        except ValueError as error:  # what went wrong, said by the registry: import error, not a Workload, ...
            return answer({"error": str(error)})
        timing["imported"] = time.time()
        paths = sorted(set(cls.Config.path_fields()) & set(config))
        if paths:
            return answer({"error": f"workload_config.{paths[0]}: a job sent to the service may not name a path"})
        try:
            cls.Config.from_mapping(name, config)
        except ValueError as error:
            return answer({"error": f"workload_config: {error}"})
        modes = {str(key): str(value) for key, value in cls.metric_modes().items()}
        if metric is not None and metric not in modes:
            return answer({"error": f"metric: {metric!r} is not reported by {name}; valid: {', '.join(modes)}"})
        return answer({"metric": str(cls.metric), "modes": modes})
    except BaseException as error:  # whatever the uploaded code raises is reported as text
        return answer({"error": f"{type(error).__name__}: {error}"})


def check_in_directory(directory: str, name: str, config: dict[str, Any], metric: str | None, answer_to: Any) -> None:
    """`inspect_workload` in a forked child of the warm checker (service/workload_checker.py): the unpacked pack is
    this process's working directory and first on its import path, as Ray's `working_dir` makes it for a trial. The
    answer goes to the `answer_to` end of a pipe as bytes (the checker never unpickles what this process sends)."""
    import sys

    os.chdir(directory)
    sys.path.insert(0, directory)
    answer_to.send_bytes(inspect_workload(name, config, metric).encode())
    answer_to.close()
