"""Errors as `application/problem+json` (RFC 9457): the one shape every error of the API and dashboard takes."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from koala_client import models

PROBLEM = "application/problem+json"


class ProblemError(Exception):
    """An error answered as problem+json; `headers` go on the response (e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        field: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.field, self.extra = status, title, detail, field, extra
        self.headers = headers or {}
        if status == 401:
            self.headers.setdefault("WWW-Authenticate", "Bearer")

    def response(self) -> JSONResponse:
        problem = models.Problem(
            type=self.extra.get("type", "about:blank"),
            title=self.title,
            status=self.status,
            detail=self.detail,
            field=self.field,
        )
        return problem_response(problem, self.headers)


def problem_response(problem: models.Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    body = problem.model_dump(exclude_none=True)
    return JSONResponse(body, status_code=problem.status, media_type=PROBLEM, headers=headers)
