"""The check of an uploaded workload, run as a short Ray task where the job's pack is unpacked (see
service/upload_runtime.py). A module of its own, importing nothing beyond the standard library until it runs, so the Ray
worker that runs it pays only for the workload's own imports."""

from __future__ import annotations

import json
from typing import Any


def inspect_workload(name: str, config: dict[str, Any], metric: str | None) -> str:
    """Import the workload `name` ("package.module:Class", from the job's upload) and check it and its config.

    Answers JSON text, never an object of the uploaded code: {"metric": default metric, "modes": {metric: "max" |
    "min"}} or {"error": message}."""
    try:
        from koala import workloads

        try:
            cls = workloads.workload_class(name)  # imports the uploaded module, here on a Ray node
        except ValueError as error:  # what went wrong, said by the registry: import error, not a Workload, ...
            return json.dumps({"error": str(error)})
        paths = sorted(set(cls.Config.path_fields()) & set(config))
        if paths:
            return json.dumps({"error": f"workload_config.{paths[0]}: a job sent to the service may not name a path"})
        try:
            cls.Config.from_mapping(name, config)
        except ValueError as error:
            return json.dumps({"error": f"workload_config: {error}"})
        modes = {str(key): str(value) for key, value in cls.metric_modes().items()}
        if metric is not None and metric not in modes:
            return json.dumps({"error": f"metric: {metric!r} is not reported by {name}; valid: {', '.join(modes)}"})
        return json.dumps({"metric": str(cls.metric), "modes": modes})
    except BaseException as error:  # whatever the uploaded code raises is reported as text
        return json.dumps({"error": f"{type(error).__name__}: {error}"})
