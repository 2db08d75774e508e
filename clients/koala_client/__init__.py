"""The KOALA client: the Python SDK (`KoalaClient`) and the `koala` command line.

Importing the package loads only httpx, pydantic and PyYAML (no torch, Ray or Optuna), so the SDK suits any process
that talks to a KOALA server; `pip install "koala-optim[client]"` installs it, and the command line's remote
commands, without the service's dependencies.
"""

from koala_client.models import (
    JOB_STATES,
    TERMINAL_STATES,
    Event,
    Job,
    JobPage,
    OptimizerInfo,
    OptimizerProgress,
    Report,
    Trial,
    Upload,
    UploadLimits,
    WorkloadInfo,
)
from koala_client.sdk import (
    KoalaAPIError,
    KoalaAuthError,
    KoalaClient,
    KoalaConnectionError,
    KoalaError,
    KoalaNotFound,
    KoalaPackError,
)

__all__ = [
    "JOB_STATES",
    "TERMINAL_STATES",
    "Event",
    "Job",
    "JobPage",
    "KoalaAPIError",
    "KoalaAuthError",
    "KoalaClient",
    "KoalaConnectionError",
    "KoalaError",
    "KoalaNotFound",
    "KoalaPackError",
    "OptimizerInfo",
    "OptimizerProgress",
    "Report",
    "Trial",
    "Upload",
    "UploadLimits",
    "WorkloadInfo",
]
