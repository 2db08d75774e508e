"""The dashboard (/ui) and optuna-dashboard (/optuna) in headless Chromium, against a real `koala serve`.

Chromium is Debian's (`apt-get install chromium`), driven by playwright without its own browser download. Screenshots
of each page go to the test's tmp dir; with KOALA_SCREENSHOT_DIR set they are also written there (`docs/` keeps one of
each: KOALA_SCREENSHOT_DIR=docs pytest tests/test_dashboard.py).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Locator, Page, expect, sync_playwright

from service.recorder import storage_for
from service.store import Store
from tests.helpers import Factory, tiny_spec, wait_for, wait_until

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install chromium"),
    pytest.mark.slow,
]

WIDE = {"width": 1280, "height": 900}
NARROW = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


class Console:
    """Every console error and uncaught exception of the pages opened through it.

    Chromium also logs an error for a page answered with an error status; `expect_status` excuses the pages a test
    asks for to see that status (a refused login, another owner's job)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.excused: set[str] = set()

    def page(self, context: BrowserContext) -> Page:
        page = context.new_page()
        page.on("console", lambda message: self._on_console(page, message))
        page.on("pageerror", lambda error: self.errors.append(f"{page.url}: {error}"))
        return page

    def expect_status(self, url: str) -> None:
        self.excused.add(url)

    def _on_console(self, page: Page, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        if message.text.startswith("Failed to load resource") and message.location.get("url") in self.excused:
            return
        self.errors.append(f"{page.url}: {message.text} {message.location}")


@pytest.fixture
def shoot(tmp_path: Path) -> Callable[[Page, str], Path]:
    """Screenshot a whole page as a test artifact (and into KOALA_SCREENSHOT_DIR, when set)."""
    artifacts = tmp_path / "screenshots"
    artifacts.mkdir()
    keep = os.environ.get("KOALA_SCREENSHOT_DIR")

    def take(page: Page, name: str) -> Path:
        path = artifacts / f"dashboard-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(keep) / path.name)
        return path

    return take


def fixed(value: float | None, digits: int) -> str:
    """JavaScript's value.toFixed(digits), as the pages format numbers ("–" for none)."""
    if value is None:
        return "–"
    return str(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def trials_running(client: httpx.Client, job_id: str) -> bool:
    return any(t["epochs_done"] >= 1 for t in client.get(f"/v1/jobs/{job_id}/trials").json())


# ---- open mode: the pages of a finished and a running job ----------------------------------------------------------


def test_dashboard_shows_jobs_live_and_cancels(
    server_factory: Factory, browser: Browser, shoot: Callable[[Page, str], Path]
) -> None:
    # The long job must still run when the browser gets to it: full digits, small batches, many epochs.
    server = server_factory(max_concurrent_jobs=2, limits__max_epochs=2000)
    finished_spec = tiny_spec(
        name="koala-v vs tuned adam",
        epochs=3,
        optimizers=[
            {"name": "koala-v"},
            {"name": "adam", "search": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}, "trials": 2},
        ],
    )
    long_spec = tiny_spec(
        name="long sgd run",
        epochs=2000,
        seeds=1,
        workload_config={"batch_size": 4, "hidden": 16, "limit_train": 0},
        optimizers=[{"name": "sgd", "params": {"lr": 0.05}}],
    )
    console = Console()
    with server.client() as client:
        finished = client.post("/v1/jobs", json=finished_spec).json()["id"]
        running = client.post("/v1/jobs", json=long_spec).json()["id"]
        assert wait_for(client, finished, {"succeeded", "failed", "cancelled"})["state"] == "succeeded"
        wait_until(lambda: trials_running(client, running), 120, "the long job never reached its first epoch", 0.5)
        report = client.get(f"/v1/jobs/{finished}/results").json()
        trials = client.get(f"/v1/jobs/{finished}/trials").json()

        context = browser.new_context(viewport=WIDE)
        page = console.page(context)

        # The jobs list, then filtered by state.
        page.goto(f"{server.url}/ui")
        expect(page.locator("#jobs tbody tr[data-job-id]")).to_have_count(2)
        expect(page.locator(f'tr[data-job-id="{running}"] .badge')).to_have_text("running")
        shoot(page, "jobs")
        page.get_by_label("State").select_option("succeeded")
        expect(page.locator("#jobs tbody tr[data-job-id]")).to_have_count(1)
        expect(page.locator(f'tr[data-job-id="{finished}"]')).to_be_visible()
        assert "state=succeeded" in page.url

        # The finished job: report table, charts, HPO cost, trials.
        page.locator(f'tr[data-job-id="{finished}"] a').click()
        page.wait_for_url(f"**/ui/jobs/{finished}")
        check_report(page, report)
        check_charts(page, report, trials)
        shoot(page, "job")
        check_trials_table(page, trials)

        # Each study opens in optuna-dashboard, mounted in the same app.
        page.get_by_role("link", name=f"job-{finished}/adam").click()
        page.wait_for_url(re.compile(r"/optuna/dashboard/studies/\d+$"))
        expect(page.get_by_text(f"job-{finished}/adam").first).to_be_visible(timeout=20_000)

        narrow = console.page(browser.new_context(viewport=NARROW))
        narrow.goto(f"{server.url}/ui/jobs/{finished}")
        narrow.wait_for_function("() => document.querySelector('#curves').dataset.series")
        width = narrow.evaluate("document.documentElement.scrollWidth")
        assert width <= NARROW["width"], "the page scrolls sideways (only tables may)"
        shoot(narrow, "job-narrow")

        # The running job follows its events, and its Cancel button cancels it.
        page.goto(f"{server.url}/ui/jobs/{running}")
        expect(page.locator("#live")).to_contain_text("epoch", timeout=30_000)
        expect(page.locator("#cancel")).to_be_visible()
        page.once("dialog", lambda dialog: dialog.accept())
        page.locator("#cancel").click()
        expect(page.locator("#job-state")).to_have_text(re.compile("^cancell"))
        assert client.get(f"/v1/jobs/{running}").json()["state"] in {"cancelling", "cancelled"}
        expect(page.locator("#job-state")).to_have_text("cancelled", timeout=60_000)
        expect(page.locator("#cancel")).to_be_hidden()
        context.close()
    assert console.errors == []


def check_report(page: Page, report: dict[str, Any]) -> None:
    """The report table shows exactly what GET /results says, formatted as the page formats it."""
    table = page.locator("#report-table")
    expect(table).to_be_visible()
    rows = table.locator("tbody tr")
    expect(rows).to_have_count(len(report["optimizers"]))
    for rank, name in enumerate(report["ranking"], start=1):
        assert rows.nth(rank - 1).get_attribute("data-optimizer") == name
    for entry in report["optimizers"]:
        row = table.locator(f'tr[data-optimizer="{entry["optimizer"]}"]')

        def cell(field: str, row: Locator = row) -> str:
            return row.locator(f'[data-field="{field}"]').inner_text()

        for field in ("final_mean", "final_std", "final_min", "final_max"):
            assert cell(field) == fixed(entry[field], 4), field
        assert cell("compute_seconds") == fixed(entry["compute_seconds"], 1)
        assert cell("tuning_seconds") == fixed(entry["tuning_seconds"], 1)
        assert cell("seeds") == str(entry["seeds"])
        assert cell("mode") == entry["mode"]
        counts = ", ".join(f"{state.lower()} {n}" for state, n in entry["trials"].items())
        assert cell("trials") == counts
    (cost,) = report["hpo_cost"]
    card = page.locator(f'#hpo .card[data-optimizer="{cost["optimizer"]}"]')
    if cost["matched"]:
        expect(card.locator('[data-field="ratio"]')).to_have_text(f"{fixed(cost['ratio'], 1)}×")
    else:
        bound = fixed(cost["ratio_lower_bound"], 1)
        expect(card.locator('[data-field="ratio_lower_bound"]')).to_have_text(f"> {bound}×")


def check_charts(page: Page, report: dict[str, Any], trials: list[dict[str, Any]]) -> None:
    """One learning-curve series (mean line, with its band) per optimizer; one box of finals per optimizer."""
    page.wait_for_function("() => document.querySelector('#curves').dataset.series")
    names = {entry["optimizer"] for entry in report["optimizers"]}
    means = page.evaluate(
        "() => document.querySelector('#curves').data.filter(t => t.meta && t.meta.role === 'mean').map(t => t.name)"
    )
    assert sorted(means) == sorted(names)
    assert set(page.locator("#curves").get_attribute("data-series").split()) == names  # type: ignore[union-attr]
    assert page.locator("#curves .legendtext").count() == len(names)
    boxes = page.evaluate("() => document.querySelector('#spread').data.map(t => [t.name, t.y.length])")
    finals = {name: sum(1 for t in trials if t["optimizer"] == name and t["phase"] == "eval") for name in names}
    assert dict(boxes) == finals


def check_trials_table(page: Page, trials: list[dict[str, Any]]) -> None:
    """Filters narrow the rows to what the API lists for them; headers sort, from the keyboard too."""
    rows = page.locator("#trials tbody tr")
    expect(rows).to_have_count(len(trials))
    page.get_by_label("Optimizer", exact=True).select_option("adam")
    page.get_by_label("Phase", exact=True).select_option("tune")
    tuned = [t for t in trials if t["optimizer"] == "adam" and t["phase"] == "tune"]
    expect(rows).to_have_count(len(tuned))
    for i in range(len(tuned)):
        assert rows.nth(i).get_attribute("data-optimizer") == "adam"
        assert rows.nth(i).get_attribute("data-phase") == "tune"
    expect(page.locator("#trial-count")).to_have_text(f"Showing {len(tuned)} of {len(trials)} trials")
    page.get_by_label("Optimizer", exact=True).select_option("")
    page.get_by_label("Phase", exact=True).select_option("")
    expect(rows).to_have_count(len(trials))

    header = page.locator('#trials th[data-key="wall_seconds"]')
    header.get_by_role("button").focus()
    page.keyboard.press("Enter")
    expect(header).to_have_attribute("aria-sort", "ascending")
    page.keyboard.press("Enter")  # focus stays on the header's button
    expect(header).to_have_attribute("aria-sort", "descending")
    shown = [float(rows.nth(i).locator("td").nth(7).inner_text()) for i in range(len(trials))]
    assert shown == sorted(shown, reverse=True)


# ---- with tokens: login, sessions, ownership -----------------------------------------------------------------------


def test_login_session_and_optuna_behind_auth(
    server_factory: Factory, browser: Browser, shoot: Callable[[Page, str], Path]
) -> None:
    server = server_factory(run_scheduler="false", token_cache_seconds=0)
    store = Store(server.database_url)
    alice, bob = store.create_token("alice").token, store.create_token("bob").token
    store.close()
    jobs = {}
    for who, token in (("alice", alice), ("bob", bob)):
        with server.client(token) as client:
            jobs[who] = client.post("/v1/jobs", json=tiny_spec(name=f"{who}'s job")).json()["id"]
    storage = storage_for(server.database_url)
    for job_id in jobs.values():
        optuna.create_study(study_name=f"job-{job_id}/sgd", storage=storage, direction="maximize")

    console = Console()
    context = browser.new_context(viewport=WIDE)
    page = console.page(context)
    page.goto(f"{server.url}/ui")
    page.wait_for_url("**/ui/login?next=%2Fui")
    shoot(page, "login")

    console.expect_status(f"{server.url}/ui/login")  # the refused login is a 401
    page.get_by_label("API token").fill("koala_not-a-token")
    with page.expect_response(lambda r: r.request.method == "POST") as refused:
        page.get_by_role("button", name="Sign in").click()
    assert refused.value.status == 401
    expect(page.locator("#login-error")).to_contain_text("not valid")
    assert not context.cookies()

    page.get_by_label("API token").fill(alice)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{server.url}/ui")
    expect(page.locator("#jobs tbody tr[data-job-id]")).to_have_count(1)
    expect(page.locator(f'tr[data-job-id="{jobs["alice"]}"]')).to_contain_text("alice's job")
    (cookie,) = context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (
        "koala_session",
        True,
        "Strict",
        "/",
    )
    assert alice not in cookie["value"]  # a random session id, never the token

    # Another owner's job page is a 404, as in the API.
    console.expect_status(f"{server.url}/ui/jobs/{jobs['bob']}")
    assert page.goto(f"{server.url}/ui/jobs/{jobs['bob']}").status == 404  # type: ignore[union-attr]

    # optuna-dashboard: the session's studies only, read-only.
    studies = context.request.get(f"{server.url}/optuna/api/studies").json()["study_summaries"]
    assert [s["study_name"] for s in studies] == [f"job-{jobs['alice']}/sgd"]
    bob_study = storage.get_study_id_from_name(f"job-{jobs['bob']}/sgd")
    assert context.request.get(f"{server.url}/optuna/api/studies/{bob_study}").status == 404
    assert context.request.delete(f"{server.url}/optuna/api/studies/{bob_study}").status == 405
    page.goto(f"{server.url}/optuna/dashboard")
    expect(page.get_by_text(f"job-{jobs['alice']}/sgd")).to_be_visible(timeout=20_000)
    expect(page.get_by_text(f"job-{jobs['bob']}/sgd")).to_have_count(0)

    # Without the cookie: browsers go to the login form, programs get a 401.
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.get("/optuna/api/studies").status_code == 401
        to_login = anonymous.get("/optuna/dashboard", headers={"Accept": "text/html"})
        assert to_login.status_code == 303
        assert to_login.headers["location"] == "/ui/login?next=%2Foptuna%2Fdashboard"
        assert anonymous.get(f"/ui/jobs/{jobs['alice']}").headers["location"].startswith("/ui/login?next=")

    page.goto(f"{server.url}/ui")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/ui/login")
    assert not context.cookies()
    page.goto(f"{server.url}/ui")
    page.wait_for_url("**/ui/login?next=%2Fui")
    context.close()
    assert console.errors == []
