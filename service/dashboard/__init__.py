"""The web dashboard of the service: the pages under /ui and optuna-dashboard under /optuna.

The pages are HTML shells filled in by small ES modules that call the API with the session cookie set at login, so
the API decides what each user may see. Everything ships with the service (plotly.js comes from the `plotly` package):
the dashboard works without network access.
"""

from __future__ import annotations

from fastapi import FastAPI

from service.dashboard.optuna_mount import OptunaDashboard
from service.dashboard.pages import install_pages

__all__ = ["mount"]


def mount(app: FastAPI) -> None:
    """Add the dashboard to an app made by `service.app.create_app` (it reads the app's store and storage)."""
    install_pages(app)
    app.mount("/optuna", OptunaDashboard(app.state.storage, app.state.store))
