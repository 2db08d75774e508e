"""Workload code shipped with a job, through real `koala serve` processes and the `koala` command line: packing
(what is left out, size limits refused before sending), the upload API (permission, content addressing, owners,
hostile packs), JobSpecs naming an upload (checked without importing it), retention, and on a loopback two-node Ray
cluster an uploaded workload installed nowhere: its trials run on both nodes, its import's side effect happens in
Ray's worker processes only, and a broken upload fails its job with the reason."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from koala_client import packing
from service.jobspec import JobSpec
from service.store import Store
from service.testing import LiveServer, LoopbackCluster, RayNode, kill_drivers, server_environment
from service.upload_runtime import WorkloadCheckError, _parse_answer, check_key, passed_before, remember_pass
from service.uploads import blobs
from tests.helpers import create_token, koala_cli, start_server, wait_for, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_workload"
TINY = {"samples": 256, "hidden": 8}
# Prepended to the copied example's __init__.py: every process that imports the package appends a line to MARKER.
MARKER_CODE = """import json as _json, os as _os
with open({marker!r}, "a") as _out:
    _out.write(_json.dumps({{"pid": _os.getpid(), "file": __file__}}) + "\\n")
"""


def workload(root: Path, name: str = "my_workload", marker: Path | None = None) -> Path:
    """A copy of the example workload as package `name` under `root` (importable nowhere but there)."""
    target = root / name
    shutil.copytree(EXAMPLE / "tiny_regression", target)
    if marker is not None:
        init = target / "__init__.py"
        init.write_text(MARKER_CODE.format(marker=str(marker)) + init.read_text())
    return target


def spec(path: Path, workload_name: str = "my_workload.model:TinyRegression", **changes: Any) -> Path:
    """A small JobSpec file naming `workload_name`."""
    body: dict[str, Any] = {
        "name": "uploaded",
        "workload": workload_name,
        "workload_config": TINY,
        "epochs": 2,
        "seeds": 2,
        "max_concurrent_trials": 2,
        "optimizers": [{"name": "sgd", "params": {"lr": 0.05}}],
    }
    body.update(changes)
    path.write_text(yaml.safe_dump(body))
    return path


def stderr_of(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join(result.stderr.split())  # rich wraps long lines


def zip_bytes(entries: list[tuple[str, bytes, int | None]]) -> bytes:
    """A zip archive of (name, data, unix mode or None)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name, which one test wants
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.create_system = 3
                info.external_attr = mode << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def stored_packs(server: LiveServer) -> int:
    store = Store(server.database_url)
    try:
        with store.engine.connect() as db:
            return int(db.execute(sa.select(sa.func.count()).select_from(blobs)).scalar_one())
    finally:
        store.close()


# ---- packing, on the client ---------------------------------------------------------------------------------------


def test_a_pack_leaves_out_caches_environments_and_what_koalaignore_lists(tmp_path: Path) -> None:
    root = workload(tmp_path)
    for folder in (".git", "__pycache__", "sub/__pycache__", "env", "data", "sub/data"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "x.bin").write_bytes(b"x")
    (root / "env" / "pyvenv.cfg").write_text("home = /usr/bin\n")  # a virtual environment by any name
    (root / "model.cpython-311.pyc").write_bytes(b"x")
    (root / "weights.ckpt").write_bytes(b"x")
    (root / "notes.md").write_text("kept")
    (root / "sub" / "notes.md").write_text("kept too")
    (root / ".koalaignore").write_text("# checkpoints and data\n*.ckpt\n/data/\n")
    packed = packing.pack(root)
    assert [path for path, _ in packed.files] == [
        "my_workload/.koalaignore",
        "my_workload/__init__.py",
        "my_workload/model.py",
        "my_workload/notes.md",
        "my_workload/sub/data/x.bin",  # `/data/` is anchored at the top
        "my_workload/sub/notes.md",
    ]
    with zipfile.ZipFile(io.BytesIO(packed.data)) as archive:
        assert archive.namelist() == [path for path, _ in packed.files]
    # The same files make the same bytes (and digest), whatever their timestamps.
    os.utime(root / "model.py", (1_000_000, 1_000_000))
    assert packing.pack(root).digest == packed.digest


def test_a_pack_refuses_links_and_sizes_over_the_limit_before_sending(tmp_path: Path) -> None:
    root = workload(tmp_path)
    (root / "link.py").symlink_to(root / "model.py")
    with pytest.raises(packing.PackError, match=r"link\.py is a link"):
        packing.pack(root)
    (root / "link.py").unlink()
    (root / "weights.bin").write_bytes(os.urandom(100_000))
    with pytest.raises(packing.PackError, match=r"too large.*weights\.bin \(0\.1 MiB\).*\.koalaignore"):
        packing.pack(root, max_bytes=50_000)
    with pytest.raises(packing.PackError, match=r"at most 2"):
        packing.pack(root, max_files=2)


# ---- the upload API (scheduler off: jobs stay queued) ------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    """A server with tokens: alice, bob and mallory may upload; carol may not. Packs: at most 64 KiB, 20 entries."""
    server = start_server(tmp_path_factory.mktemp("uploads"), "server", max_upload_bytes="65536", max_upload_files="20")
    tokens = {name: create_token(server, "--name", name, "--allow-uploads") for name in ("alice", "bob", "mallory")}
    tokens["carol"] = create_token(server, "--name", "carol")
    yield server, tokens
    server.stop()


def test_uploading_code_needs_a_permission_an_operator_grants(
    api: tuple[LiveServer, dict[str, str]], tmp_path: Path
) -> None:
    server, tokens = api
    root = workload(tmp_path)
    job = spec(tmp_path / "job.yaml")
    refused = koala_cli(server, "submit", str(job), "--workload-dir", str(root), token=tokens["carol"])
    assert refused.returncode == 1
    assert "koala token create --allow-uploads" in stderr_of(refused)
    assert "KOALA_ALLOW_UPLOADS=true" in stderr_of(refused)
    with server.client(tokens["carol"]) as carol:
        response = carol.post("/v1/uploads", content=packing.pack(root).data)
        assert response.status_code == 403
        assert "--allow-uploads" in response.json()["detail"]
        assert carol.get("/v1/uploads/limits").json()["allowed"] is False
    listed = koala_cli(server, "token", "list").stdout.splitlines()
    assert "allowed" in next(line for line in listed if " alice " in line)
    assert "allowed" not in next(line for line in listed if " carol " in line)

    # KOALA_ALLOW_UPLOADS=true: every token may.
    everyone = start_server(tmp_path, "everyone", allow_uploads="true")
    try:
        plain = create_token(everyone, "--name", "plain")
        added = koala_cli(everyone, "uploads", "add", str(root), token=plain)
        assert added.returncode == 0, added.stderr
        assert added.stdout.strip() == packing.pack(root).digest
    finally:
        everyone.stop()


def test_the_same_bytes_are_stored_once_and_each_owner_sees_only_its_own(
    api: tuple[LiveServer, dict[str, str]], tmp_path: Path
) -> None:
    server, tokens = api
    root = workload(tmp_path, "shared_workload")
    before = stored_packs(server)
    first = koala_cli(server, "uploads", "add", str(root), token=tokens["alice"])
    assert first.returncode == 0, first.stderr
    digest = first.stdout.strip()
    assert digest.startswith("sha256:")
    assert "uploaded" in stderr_of(first)
    again = koala_cli(server, "uploads", "add", str(root), token=tokens["alice"])
    assert again.stdout.strip() == digest
    assert "already on the server" in stderr_of(again)
    bob = koala_cli(server, "uploads", "add", str(root), token=tokens["bob"])
    assert bob.stdout.strip() == digest
    assert "uploaded" in stderr_of(bob)
    assert stored_packs(server) == before + 1  # two owners, one copy

    # Another owner's digest is 404, for reading it and for a job naming it.
    with server.client(tokens["mallory"]) as mallory:
        assert mallory.get(f"/v1/uploads/{digest}").status_code == 404
        assert mallory.delete(f"/v1/uploads/{digest}").status_code == 404
    job = spec(tmp_path / "job.yaml", "shared_workload.model:TinyRegression", upload=digest)
    stolen = koala_cli(server, "submit", str(job), token=tokens["mallory"])
    assert stolen.returncode == 1
    assert f"no upload {digest}" in stderr_of(stolen)

    # `koala uploads list|show|delete`; deleting bob's leaves alice's.
    shown = koala_cli(server, "uploads", "show", digest[7:19], token=tokens["bob"])
    assert "shared_workload/model.py" in shown.stdout
    deleted = koala_cli(server, "uploads", "delete", digest[7:19], token=tokens["bob"])
    assert deleted.returncode == 0, deleted.stderr
    assert digest not in koala_cli(server, "uploads", "list", token=tokens["bob"]).stdout
    assert digest in koala_cli(server, "uploads", "list", token=tokens["alice"]).stdout


def test_a_pack_over_the_size_limit_is_refused(api: tuple[LiveServer, dict[str, str]], tmp_path: Path) -> None:
    server, tokens = api
    root = workload(tmp_path, "heavy_workload")
    (root / "weights.bin").write_bytes(os.urandom(100_000))
    job = spec(tmp_path / "job.yaml", "heavy_workload.model:TinyRegression")
    before = koala_cli(server, "uploads", "list", token=tokens["alice"]).stdout
    refused = koala_cli(server, "submit", str(job), "--workload-dir", str(root), token=tokens["alice"])
    assert refused.returncode == 1
    assert "too large to upload: the server accepts 0.1 MiB" in stderr_of(refused)
    assert "weights.bin" in stderr_of(refused)
    assert koala_cli(server, "uploads", "list", token=tokens["alice"]).stdout == before  # nothing was sent
    big = tmp_path / "big.zip"
    big.write_bytes(zip_bytes([("heavy/weights.bin", os.urandom(100_000), None)]))
    assert koala_cli(server, "uploads", "add", str(big), token=tokens["alice"]).returncode == 1

    # The server enforces it too: by Content-Length, and while a body without one streams in.
    with server.client(tokens["alice"]) as alice:
        assert alice.post("/v1/uploads", content=big.read_bytes()).status_code == 413

        def chunks() -> Iterator[bytes]:
            data = big.read_bytes()
            for start in range(0, len(data), 8192):
                yield data[start : start + 8192]

        response = alice.post("/v1/uploads", content=chunks())
        assert response.status_code == 413
        assert "larger than this server accepts" in response.json()["detail"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("pkg/__init__.py", b"", None), ("pkg/../../evil.py", b"x", None)], "leaves the pack (`..`)"),
        ([("/etc/cron.d/evil", b"x", None)], "is an absolute path"),
        ([("pkg/model.py", b"x", None), ("pkg/link", b"/etc/passwd", stat.S_IFLNK | 0o777)], "is a symbolic link"),
        ([(f"pkg/m{i}.py", b"", None) for i in range(21)], "this server accepts at most 20"),
        ([("pkg/model.py", b"x", None), ("pkg/model.py", b"y", None)], "appears twice"),
    ],
    ids=["dot-dot", "absolute", "link", "too-many-files", "duplicate"],
)
def test_a_hostile_pack_is_refused_with_the_reason(
    api: tuple[LiveServer, dict[str, str]],
    tmp_path: Path,
    entries: list[tuple[str, bytes, int | None]],
    message: str,
) -> None:
    server, tokens = api
    archive = tmp_path / "pack.zip"
    archive.write_bytes(zip_bytes(entries))
    before = stored_packs(server)
    refused = koala_cli(server, "uploads", "add", str(archive), token=tokens["alice"])
    assert refused.returncode == 1
    assert message in stderr_of(refused)
    assert stored_packs(server) == before
    with server.client(tokens["alice"]) as alice:
        response = alice.post("/v1/uploads", content=archive.read_bytes())
        assert response.status_code == 422
        assert message in response.json()["detail"]
        not_a_zip = alice.post("/v1/uploads", content=b"#!/bin/sh\nrm -rf /\n")
        assert not_a_zip.status_code == 422
        assert "not a zip archive" in not_a_zip.json()["detail"]


def test_a_job_naming_an_upload_is_checked_without_importing_it(
    api: tuple[LiveServer, dict[str, str]], tmp_path: Path
) -> None:
    server, tokens = api
    marker = tmp_path / "imported-by.jsonl"
    root = workload(tmp_path, "marked_workload", marker=marker)
    job_file = spec(tmp_path / "job.yaml", "marked_workload.model:TinyRegression")
    submitted = koala_cli(server, "submit", str(job_file), "--workload-dir", str(root), token=tokens["alice"])
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    digest = packing.pack(root).digest
    with server.client(tokens["alice"]) as alice:
        job = alice.get(f"/v1/jobs/{job_id}").json()
        assert job["upload"]["digest"] == digest
        assert [f["path"] for f in job["upload"]["files"]] == [
            "marked_workload/__init__.py",
            "marked_workload/model.py",
        ]
        assert job["spec"]["upload"] == digest
        # module:Class without an upload is still refused, with the way to send the code.
        body = yaml.safe_load(job_file.read_text())
        response = alice.post("/v1/jobs", json=body)
        assert response.status_code == 422
        assert "--workload-dir" in response.json()["detail"]
        # With an upload, the workload must have the form package.module:Class ...
        response = alice.post("/v1/jobs", json={**body, "upload": digest, "workload": "os.system"})
        assert response.status_code == 422
        assert response.json()["field"] == "workload"
        # ... and name a module inside it.
        response = alice.post("/v1/jobs", json={**body, "upload": digest, "workload": "json.decoder:JSONDecoder"})
        assert response.status_code == 422
        assert "module 'json.decoder' is not in the upload (its top level holds: marked_workload)" in response.text

    # A pack with requirements.txt, on a server that does not install packages.
    (root / "requirements.txt").write_text("# what it needs\nscikit-learn>=1.5\n")
    needs = koala_cli(server, "submit", str(job_file), "--workload-dir", str(root), token=tokens["alice"])
    assert needs.returncode == 1
    assert "KOALA_ALLOW_PACKAGE_INSTALLS=true" in stderr_of(needs)
    (root / "requirements.txt").unlink()

    # A queued job keeps its upload; once it has ended the upload may go.
    in_use = koala_cli(server, "uploads", "delete", digest, token=tokens["alice"])
    assert in_use.returncode == 1
    assert f"job(s) {job_id} still need" in stderr_of(in_use)
    assert koala_cli(server, "cancel", job_id, token=tokens["alice"]).stdout.strip() == "cancelled"
    assert koala_cli(server, "uploads", "delete", digest, token=tokens["alice"]).returncode == 0
    assert not marker.exists()  # nothing above imported the uploaded code


def test_an_upload_is_deleted_after_the_retention_period(tmp_path: Path) -> None:
    # Long enough for the first listing (a CLI process, slow to start on a busy machine) to come before the sweep.
    server = start_server(tmp_path, "retention", run_scheduler="true", upload_retention_seconds="8")
    try:
        root = workload(tmp_path)
        added = koala_cli(server, "uploads", "add", str(root))  # an open server on loopback allows uploads
        assert added.returncode == 0, added.stderr
        assert added.stdout.strip() in koala_cli(server, "uploads", "list").stdout
        wait_until(
            lambda: "no uploads" in koala_cli(server, "uploads", "list").stderr,
            40,
            "the upload was still listed after its retention period",
            interval=0.5,
        )
        # The bytes follow a few seconds later.
        wait_until(lambda: not stored_packs(server), 40, "the pack's bytes were not deleted", interval=0.5)
    finally:
        server.stop()


# ---- running uploaded workloads on a loopback two-node Ray cluster ----------------------------------------------


@pytest.fixture(scope="module")
def cluster_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, RayNode, RayNode]]:
    """An open server whose drivers join a two-node loopback Ray cluster (1 CPU per node); uploads are kept 10 s
    after their last job ends."""
    root = tmp_path_factory.mktemp("upload-cluster")
    with LoopbackCluster() as cluster:
        head = cluster.add_node("a", num_cpus=1)
        worker = cluster.add_node("b", num_cpus=1)
        env = server_environment(root, env=cluster.env, max_concurrent_jobs=3, upload_retention_seconds=10)
        server = LiveServer(root, env).start()
        try:
            yield server, head, worker
        finally:
            server.stop()
            kill_drivers(server.database_url)
    assert cluster.leftover_pids() == set(), "Ray processes survived the cluster"


def uploaded_spec(**changes: Any) -> JobSpec:
    body: dict[str, Any] = {
        "workload": "my_workload.model:TinyRegression",
        "upload": "sha256:" + "ab" * 32,
        "workload_config": TINY,
        "epochs": 1,
        "seeds": 1,
        "optimizers": [{"name": "sgd"}],
    }
    return JobSpec.parse({**body, **changes})


def test_a_passed_check_is_remembered_per_pack_workload_config_and_metric(tmp_path: Path) -> None:
    key = check_key(uploaded_spec())
    assert check_key(uploaded_spec()) == key
    others = [
        uploaded_spec(upload="sha256:" + "cd" * 32),
        uploaded_spec(workload="my_workload.model:Other"),
        uploaded_spec(workload_config={**TINY, "hidden": 9}),
        uploaded_spec(metric="val_rmse"),
    ]
    assert len({key, *(check_key(spec) for spec in others)}) == 5

    assert passed_before(tmp_path, key, 60) is None
    remember_pass(tmp_path, key, "val_rmse", {"val_rmse": "min", "train_loss": "min"})
    assert passed_before(tmp_path, key, 60) == ("val_rmse", {"val_rmse": "min", "train_loss": "min"})
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.json"]  # no partial file left behind

    # Past the retention period the entry is dropped, and the workload is checked again.
    os.utime(tmp_path / f"{key}.json", (time.time() - 120, time.time() - 120))
    assert passed_before(tmp_path, key, 60) is None
    assert not (tmp_path / f"{key}.json").exists()
    (tmp_path / f"{key}.json").write_text("{not json")
    assert passed_before(tmp_path, key, 60) is None


def test_the_checks_answer_is_read_with_its_timing_and_nothing_else() -> None:
    answer = {"metric": "m", "modes": {"m": "max"}, "timing": {"start": 2.0, "x": "no"}, "extra": "ignored"}
    assert _parse_answer(json.dumps(answer)) == {"metric": "m", "modes": {"m": "max"}, "timing": {"start": 2.0}}
    assert _parse_answer(json.dumps({"error": "E" * 3000}))["error"] == "E" * 2000
    for bad in ("[]", "nope", json.dumps({"metric": "m", "modes": {"other": "max"}}), 3):
        with pytest.raises(WorkloadCheckError):
            _parse_answer(bad)


@pytest.mark.slow
def test_an_uploaded_workload_runs_on_both_nodes_and_is_imported_only_there(
    cluster_server: tuple[LiveServer, RayNode, RayNode], tmp_path: Path
) -> None:
    server, head, worker = cluster_server
    # The service keeps a warm checker on the cluster (a Ray actor forking checks from a server with torch loaded).
    checker_log = server.data_dir / "logs" / "workload-checker.log"
    wait_until(
        lambda: checker_log.exists() and "workload checker warm" in checker_log.read_text(),
        timeout=180,
        message="the service's workload checker warm on the cluster",
    )
    marker = tmp_path / "imported-by.jsonl"
    root = workload(tmp_path, "marked_regression", marker=marker)
    job_file = spec(
        tmp_path / "job.yaml",
        "marked_regression.model:TinyRegression",
        seeds=4,
        resources={"cpu": 1},
    )
    submitted = koala_cli(server, "submit", str(job_file), "--workload-dir", str(root), "--watch")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[0]
    with server.client() as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "succeeded", job
        assert [f["path"] for f in job["upload"]["files"]] == [
            "marked_regression/__init__.py",
            "marked_regression/model.py",
        ]
        trials = client.get(f"/v1/jobs/{job_id}/trials").json()
        report = client.get(f"/v1/jobs/{job_id}/results").json()
    assert len(trials) == 4
    assert all(t["state"] == "complete" for t in trials)
    assert {t["node"] for t in trials} == {head.node_id, worker.node_id}
    assert report["metric"] == "val_rmse"
    assert report["direction"] == "minimize"

    # The module ran where Ray unpacked the pack, on both nodes, in Ray's worker processes, and once in the warm
    # checker's forked child, which unpacked the pack in a directory of its own: never in the API process or the job's
    # driver.
    imports = [json.loads(line) for line in marker.read_text().splitlines()]
    store = Store(server.database_url)
    try:
        driver = store.get_job(job_id)
    finally:
        store.close()
    assert driver is not None
    assert driver.driver_pid is not None
    assert server.process is not None
    pids = {entry["pid"] for entry in imports}
    assert server.process.pid not in pids
    assert driver.driver_pid not in pids
    checked = [entry for entry in imports if "/koala-workload-checks-" in entry["file"]]
    assert len(checked) == 1, imports
    for entry in imports:
        assert entry in checked or "/runtime_resources/working_dir_files/" in entry["file"], entry
    driver_log = (server.data_dir / "logs" / f"{job_id}.log").read_text()
    assert "check of marked_regression.model:TinyRegression (warm checker)" in driver_log
    for node in (head, worker):
        assert any(f"{node.directory}/" in entry["file"] for entry in imports), (node.name, imports)

    # Kept while its job ran; deleted with it once the retention period (10 s) has passed.
    digest = job["upload"]["digest"]
    wait_until(
        lambda: digest not in koala_cli(server, "uploads", "list").stdout,
        60,
        f"upload {digest} outlived its 10 s retention period",
        interval=1,
    )


@pytest.mark.slow
def test_a_broken_upload_fails_its_job_with_the_reason(
    cluster_server: tuple[LiveServer, RayNode, RayNode], tmp_path: Path
) -> None:
    server, _, _ = cluster_server
    syntax = tmp_path / "syntax" / "broken"
    syntax.mkdir(parents=True)
    (syntax / "model.py").write_text("def train(:\n")
    plain = tmp_path / "plain" / "plain"
    plain.mkdir(parents=True)
    (plain / "model.py").write_text("class Model:\n    pass\n")
    good = workload(tmp_path / "good", "config_workload")
    cases = [
        (syntax, "broken.model:Model", {}, "SyntaxError: invalid syntax"),
        (plain, "plain.model:Model", {}, "is <class 'plain.model.Model'>, not a koala.workloads.Workload subclass"),
        (good, "config_workload.model:Missing", {}, "has no attribute 'Missing'"),
        (good, "config_workload.model:TinyRegression", {"hidden": 0}, "hidden: must be between 1 and 1024, got 0"),
        (good, "config_workload.model:TinyRegression", {"depth": 3}, "unknown config key(s) depth"),
    ]
    jobs = []
    for i, (directory, name, config, message) in enumerate(cases):
        job_file = spec(tmp_path / f"job{i}.yaml", name, workload_config={**TINY, **config})
        submitted = koala_cli(server, "submit", str(job_file), "--workload-dir", str(directory))
        assert submitted.returncode == 0, submitted.stderr
        jobs.append((submitted.stdout.strip(), message))
    for job_id, message in jobs:
        watched = koala_cli(server, "watch", job_id)
        assert watched.returncode == 1
        assert message in stderr_of(watched), (message, watched.stderr)
        with server.client() as client:
            job = wait_for(client, job_id, {"failed"}, timeout=10)
            assert job["error"].startswith("the uploaded workload ")
            assert client.get(f"/v1/jobs/{job_id}/trials").json() == []  # failed before any trial was planned


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium")
def test_the_job_page_shows_the_upload_and_its_files(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    server = start_server(tmp_path, "page")  # open, on loopback; the scheduler is off: the job stays queued
    try:
        root = workload(tmp_path)
        submitted = koala_cli(server, "submit", str(spec(tmp_path / "job.yaml")), "--workload-dir", str(root))
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        digest = packing.pack(root).digest
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium")
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(f"{server.url}/ui/jobs/{job_id}")
                fact = page.locator("#facts div", has_text="Uploaded code")
                expect(fact.locator("code.digest")).to_have_attribute("title", digest)
                fact.get_by_text("2 files").click()
                expect(fact.locator("ul.files li")).to_have_count(2)
                expect(fact.locator("ul.files")).to_contain_text("my_workload/model.py")
                page.screenshot(path=str(tmp_path / "job-page.png"), full_page=True)
                assert errors == []
            finally:
                browser.close()
    finally:
        server.stop()


def test_requirements_go_to_rays_pip_environment_only_where_installs_are_allowed(tmp_path: Path) -> None:
    from service.jobspec import JobSpec
    from service.packs import PackInfo, inspect_pack
    from service.settings import Settings
    from service.upload_runtime import WorkloadCheckError, runtime_environment
    from service.uploads import Uploads

    store = Store(f"sqlite:///{tmp_path / 'koala.db'}")
    try:
        store.migrate()
        root = workload(tmp_path)
        (root / "requirements.txt").write_text("# pinned\nscikit-learn>=1.5  # the digits\n\npyyaml\n")
        packed = packing.pack(root)
        info: PackInfo = inspect_pack(io.BytesIO(packed.data), max_files=100, max_unpacked_bytes=1 << 20)
        assert info.requirements == ["scikit-learn>=1.5", "pyyaml"]
        Uploads(store).add("", packed.digest, packed.data, info)
        job = JobSpec.parse(yaml.safe_load(spec(tmp_path / "job.yaml").read_text()) | {"upload": packed.digest})
        allowed = Settings(data_dir=tmp_path, allow_package_installs=True)
        environment = runtime_environment(store, allowed, job, tmp_path / "scratch")
        assert environment["pip"] == {"packages": ["scikit-learn>=1.5", "pyyaml"], "pip_check": False}
        assert Path(environment["working_dir"]).read_bytes() == packed.data  # handed to Ray as it was uploaded
        with pytest.raises(WorkloadCheckError, match="does not install packages"):
            runtime_environment(store, Settings(data_dir=tmp_path), job, tmp_path / "scratch")
    finally:
        store.close()
