"""The pages under /ui: server-rendered shells whose scripts (static/*.js) fill them from the API.

Once API tokens exist every page needs a session: `/ui/login` checks a token and opens a session whose random id
(stored hashed, with an expiry) goes in the `koala_session` cookie (HttpOnly, SameSite=Strict, Secure behind TLS);
the API accepts it like a bearer token until it expires, the user signs out or the token is revoked. The pages'
scripts only ever call the API with that cookie, so which jobs a user sees is decided by the API, exactly as for the
SDK.
"""

from __future__ import annotations

import html
import importlib.util
import urllib.parse
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from koala_client.models import JOB_STATES
from service.auth import SESSION_COOKIE, Caller, caller
from service.problems import ProblemError
from service.recorder import study_name
from service.store import JobRow, Store

STATIC = Path(__file__).parent / "static"
# Pages may only load what the service itself serves; plotly styles its charts inline.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


class LoginRequiredError(Exception):
    """A page was asked for without a valid session; answered with a redirect to the login form."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


async def session(request: Request) -> Caller:
    """The caller behind the session cookie (or a bearer token); everyone while no token exists."""
    try:
        return await caller(request)
    except ProblemError:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequiredError(target) from None


Session = Annotated[Caller, Depends(session)]


def plotly_js() -> Path:
    """plotly.js as shipped inside the `plotly` package (found without importing it: that is slow)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dashboard needs the `plotly` package: pip install 'koala-optim[service]'")
    return Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"


def safe_next(target: str | None) -> str:
    """Where to go after login: a path on this site only (no `//host` or scheme), else the jobs list."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/ui"
    return target


router = APIRouter(include_in_schema=False)


def install_pages(app: FastAPI) -> None:
    """The /ui pages on `app`: their routes, static files and plotly.js, and the login redirect."""
    app.state.plotly_js = plotly_js()
    app.add_exception_handler(LoginRequiredError, to_login)  # type: ignore[arg-type]  # a handler of that error only
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    app.include_router(router)


async def to_login(request: Request, error: LoginRequiredError) -> Response:
    return RedirectResponse(f"/ui/login?next={urllib.parse.quote(error.next_path, safe='')}", status_code=303)


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


@router.get("/ui/vendor/plotly.min.js")
def plotly_bundle(request: Request) -> FileResponse:
    return FileResponse(
        request.app.state.plotly_js, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"}
    )


@router.get("/ui")
def jobs_page(request: Request, who: Session) -> HTMLResponse:
    return _page(request, "Jobs", _jobs_body(), script="jobs.js", current="jobs")


@router.get("/ui/jobs/{job_id}")
async def job_page(request: Request, job_id: str, who: Session) -> HTMLResponse:
    job = await run_in_threadpool(_store(request).get_job, job_id)
    if job is None or not who.may_see(job):
        body = f'<h1>Job not found</h1><p>There is no job {html.escape(job_id)}. <a href="/ui">All jobs</a></p>'
        return _page(request, "Job not found", body, status=404)
    return _page(request, job.name or job.id, _job_body(job), script="job.js", plotly=True, current="jobs")


@router.get("/ui/jobs/{job_id}/studies/{optimizer}")
async def study_link(request: Request, job_id: str, optimizer: str, who: Session) -> Response:
    """The optimizer's study in optuna-dashboard (its URL needs the study id, which the API does not carry)."""
    job = await run_in_threadpool(_store(request).get_job, job_id)
    if job is None or not who.may_see(job) or optimizer not in job.progress:
        raise ProblemError(404, "Not Found", f"no study for {optimizer} in job {job_id}")
    state = request.app.state
    try:
        study_id = await run_in_threadpool(state.storage.get_study_id_from_name, study_name(job_id, optimizer))
    except KeyError:
        raise ProblemError(404, "Not Found", f"job {job_id} has not started {optimizer} yet") from None
    base = (state.settings.optuna_dashboard_url or "/optuna").rstrip("/")
    return RedirectResponse(f"{base}/dashboard/studies/{study_id}", status_code=303)


@router.get("/ui/login")
async def login_form(request: Request, next: str | None = None) -> Response:
    try:
        await caller(request)
    except ProblemError:
        return _login(request, safe_next(next))
    return RedirectResponse(safe_next(next), status_code=303)  # open mode, or signed in already


@router.post("/ui/login")
async def login(request: Request) -> Response:
    form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
    token = form.get("token", [""])[0].strip()
    target = safe_next(form.get("next", [""])[0])
    store = _store(request)
    owner = await run_in_threadpool(store.token_owner, token) if token else None
    if owner is None:
        return _login(request, target, error="That token is not valid on this server.", status=401)
    settings = request.app.state.settings
    session_id = await run_in_threadpool(store.create_session, owner, settings.session_seconds)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=int(settings.session_seconds),
        httponly=True,
        samesite="strict",
        path="/",
        secure=settings.secure_cookies or request.url.scheme == "https",
    )
    return response


@router.post("/ui/logout")
def logout(request: Request) -> Response:
    session_id = request.cookies.get(SESSION_COOKIE, "")
    if session_id:
        _store(request).end_session(session_id)  # revoked on the server, not only forgotten by this browser
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


# ---- page bodies (HTML templates) ------------------------------------------------------------------------------


def _jobs_body() -> str:
    options = "".join(f'<option value="{s}">{s}</option>' for s in JOB_STATES)

    return f"""
<div class="page-head">
  <h1>Jobs</h1>
  <div class="toolbar">
    <label for="state-filter">State</label>
    <select id="state-filter" name="state"><option value="">All states</option>{options}</select>
  </div>
</div>
<div class="table-wrap">
  <table id="jobs" class="data">
    <caption>Comparison jobs, newest first</caption>
    <thead><tr>
      <th scope="col">Job</th><th scope="col">State</th><th scope="col">Workload</th>
      <th scope="col">Optimizers</th><th scope="col">Progress</th><th scope="col">Created</th>
    </tr></thead>
    <tbody><tr><td colspan="6" class="empty">Loading jobs…</td></tr></tbody>
  </table>
</div>
<nav class="pager" aria-label="Pages of jobs">
  <button type="button" id="newer" disabled>&larr; Newer</button>
  <span id="page-label" aria-live="polite"></span>
  <button type="button" id="older" disabled>Older &rarr;</button>
</nav>
"""


def _job_body(job: JobRow) -> str:
    name, jid = html.escape(job.name or job.id), html.escape(job.id)

    return f"""
<div class="page-head job-head" id="job" data-job-id="{jid}">
  <nav class="crumbs" aria-label="Breadcrumb"><a href="/ui">Jobs</a> <span aria-hidden="true">/</span>
    <span class="mono" aria-current="page">{jid}</span></nav>
  <div class="title-row">
    <h1>{name}</h1>
    <span id="job-state" class="badge state-{html.escape(job.state)}">{html.escape(job.state)}</span>
    <button type="button" id="cancel" class="danger" hidden>Cancel job</button>
  </div>
  <dl id="facts" class="facts"></dl>
  <p id="live" class="live" aria-live="polite"></p>
  <div id="job-error" class="alert" role="alert" hidden></div>
</div>
<section aria-labelledby="report-title">
  <h2 id="report-title">Comparison</h2>
  <div id="report"><p class="muted">Loading the report…</p></div>
</section>
<section aria-labelledby="hpo-title">
  <h2 id="hpo-title">HPO cost</h2>
  <p class="muted small">Tuning compute each tuned baseline spent until one of its tuning trials matched the best
    untuned KOALA result, in runs of that KOALA optimizer.</p>
  <div id="hpo" class="cards"></div>
</section>
<div class="charts">
  <section aria-labelledby="curves-title">
    <h2 id="curves-title">Learning curves</h2>
    <p class="muted small">Mean over seeds of the evaluation runs, with a band of &plusmn; one standard deviation.
      Click a legend entry to hide or show an optimizer.</p>
    <div id="curves" class="chart" role="figure" aria-labelledby="curves-title"></div>
  </section>
  <section aria-labelledby="spread-title">
    <h2 id="spread-title">Final result across seeds</h2>
    <p class="muted small">The final metric of every finished evaluation run, per optimizer.</p>
    <div id="spread" class="chart" role="figure" aria-labelledby="spread-title"></div>
  </section>
</div>
<section aria-labelledby="trials-title">
  <h2 id="trials-title">Trials</h2>
  <div class="toolbar filters">
    <span class="field"><label for="f-optimizer">Optimizer</label>
      <select id="f-optimizer"><option value="">All</option></select></span>
    <span class="field"><label for="f-phase">Phase</label>
      <select id="f-phase"><option value="">All</option><option value="tune">tune</option>
        <option value="eval">eval</option></select></span>
    <span class="field"><label for="f-state">State</label>
      <select id="f-state"><option value="">All</option></select></span>
    <span id="trial-count" class="muted" aria-live="polite"></span>
  </div>
  <div class="table-wrap"><table id="trials" class="data"></table></div>
</section>
<section aria-labelledby="studies-title">
  <h2 id="studies-title">Optuna studies</h2>
  <ul id="studies" class="links"></ul>
</section>
"""


def _login(request: Request, target: str, error: str | None = None, status: int = 200) -> HTMLResponse:
    message = f'<p id="login-error" class="alert" role="alert">{html.escape(error)}</p>' if error else ""
    described = ' aria-describedby="login-error" aria-invalid="true"' if error else ""
    body = f"""
<div class="login">
  <h1>Sign in</h1>
  <p class="muted">This server needs an API token. Create one where the server runs with
    <code>koala token create</code>.</p>
  {message}
  <form method="post" action="/ui/login" class="stack">
    <input type="hidden" name="next" value="{html.escape(target)}">
    <label for="token">API token</label>
    <input id="token" name="token" type="password" autocomplete="current-password" required autofocus{described}>
    <button type="submit" class="primary">Sign in</button>
  </form>
</div>
"""
    return _page(request, "Sign in", body, status=status, nav=False)


def _page(
    request: Request,
    title: str,
    body: str,
    *,
    script: str | None = None,
    plotly: bool = False,
    current: str = "",
    nav: bool = True,
    status: int = 200,
) -> HTMLResponse:
    scripts = '<script defer src="/ui/vendor/plotly.min.js"></script>' if plotly else ""
    if script:
        scripts += f'<script type="module" src="/ui/static/{script}"></script>'
    links = ""
    if nav:
        jobs_current = ' aria-current="page"' if current == "jobs" else ""
        links = f'<a href="/ui"{jobs_current}>Jobs</a><a href="/optuna/dashboard">Optuna studies</a>'
        if request.app.state.store.has_tokens():
            links += '<form method="post" action="/ui/logout"><button class="link">Sign out</button></form>'
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} · KOALA</title>
<link rel="icon" href="/ui/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/ui/static/style.css">
{scripts}
</head>
<body>
<a class="skip-link" href="#main">Skip to content</a>
<header class="topbar">
  <a class="brand" href="/ui"><img src="/ui/static/favicon.svg" alt="" width="24" height="24">
    <span>KOALA <span class="brand-sub">optimizer comparisons</span></span></a>
  <nav class="topnav" aria-label="Main">{links}</nav>
</header>
<main id="main">{body}</main>
</body>
</html>
"""
    return HTMLResponse(page, status_code=status, headers={"Content-Security-Policy": CSP})
