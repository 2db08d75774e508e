"""docker/: the compose file and both Dockerfiles, checked against what the project really has (no Docker needed).

Every command a service runs must parse with the real command line it names (`koala` through click, `ray` through
Ray's own click group, optuna-dashboard through its --help), every KOALA_* variable must be a setting that
`Settings` reads (and the whole environment must load), images and Python packages must be pinned, and the images
must run as a non-root user with a health check.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from sqlalchemy.engine import make_url

from koala_client.cli import main as koala_cli
from service.limits import Limits
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
SERVICES = {"postgres", "ray-head", "ray-worker", "api", "optuna-dashboard"}
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}")


def env_example() -> dict[str, str]:
    values = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, with `values` standing for docker/.env."""

    def substitute(match: re.Match[str]) -> str:
        value = values.get(match["name"], "")
        if not value and match["op"] == "-":
            return match["arg"]
        if not value:
            raise AssertionError(f"${{{match['name']}}} has no value: {match['arg'] or 'unset'}")
        return value

    return INTERPOLATION.sub(substitute, text)


SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "RAY_AUTH_TOKEN": "ray-secret"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    raw = (DOCKER / "compose.yaml").read_text()
    values = {**env_example(), **SECRETS}
    return yaml.safe_load(interpolate(raw, values))  # type: ignore[no-any-return]


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def options_of(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in param.opts if opt.startswith("-")}


def check_click_args(command: click.Command, args: list[str]) -> dict[str, Any]:
    """Parse `args` with the real click command; every option must exist. Returns the parsed parameters."""
    known = options_of(command)
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in known, f"{command.name} has no option {arg}"
    context = command.make_context(command.name, list(args), resilient_parsing=False)
    return dict(context.params)


def ray_command(name: str) -> click.Command:
    from ray.scripts.scripts import cli

    assert isinstance(cli, click.Group)
    assert name in cli.commands, f"`ray {name}` does not exist"
    return cli.commands[name]


def check_ray(args: list[str]) -> dict[str, Any]:
    assert args[0] == "ray"
    assert (BIN / "ray").exists()
    return check_click_args(ray_command(args[1]), args[2:])


def healthcheck_command(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert test[0] in {"CMD", "CMD-SHELL"}
    return [str(part) for part in test[1:]] if test[0] == "CMD" else shlex.split(test[1])


# ---- compose.yaml -------------------------------------------------------------------------------------------------


def test_services_images_healthchecks_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        image, _, tag = service["image"].rpartition(":")
        assert image, name
        assert re.search(r"\d", tag), f"{name}: image {service['image']} not pinned to a version"
        if "build" in service:
            assert service["build"]["context"] == ".."
            assert (ROOT / service["build"]["dockerfile"]).is_file()
        check = service["healthcheck"]
        assert check["test"], name
        assert check["interval"], name
        assert check["retries"], name
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services
            assert condition["condition"] == "service_healthy"
    declared = set(compose["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in declared, source
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert healthcheck_command(services["postgres"])[0] == "pg_isready"
    # The Ray nodes and the API share the data directory (Tune checkpoints survive a node).
    for name in ("ray-head", "ray-worker", "api"):
        assert "koala-data:/data" in services[name]["volumes"], name
        assert services[name]["environment"]["KOALA_DATA_DIR"] == "/data"


def test_ray_head_and_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    head = check_ray(command_of(services["ray-head"]))
    assert head["head"]
    assert head["block"]
    assert head["include_dashboard"] is False
    worker = check_ray(command_of(services["ray-worker"]))
    assert worker["block"]
    assert not worker["head"]
    host, _, port = worker["address"].partition(":")
    assert host == "ray-head"
    assert int(port) == head["port"]
    for name in ("ray-head", "ray-worker"):
        check = check_ray(healthcheck_command(services[name]))
        assert check["address"].partition(":")[2] == str(head["port"])
        environment = services[name]["environment"]
        assert environment["RAY_AUTH_MODE"] == "token"
        assert environment["RAY_AUTH_TOKEN"] == SECRETS["RAY_AUTH_TOKEN"]
    (gpus,) = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia"
    assert "gpu" in gpus["capabilities"]
    assert "ports" not in services["ray-head"]  # Ray stays on the compose network


def setting_exists(variable: str) -> bool:
    name = variable.removeprefix("KOALA_").lower()
    if "__" in name:
        group, _, field = name.partition("__")
        return group == "limits" and field in Limits.model_fields
    return name in Settings.model_fields


def test_every_koala_variable_is_a_setting(compose: dict[str, Any]) -> None:
    variables = {
        key
        for service in compose["services"].values()
        for key in service.get("environment", {})
        if key.startswith("KOALA_")
    }
    variables |= {key for key in env_example() if key.startswith("KOALA_")}
    assert {"KOALA_DATABASE_URL", "KOALA_DATA_DIR", "KOALA_LIMITS__MAX_GPU"} <= variables
    assert [v for v in sorted(variables) if not setting_exists(v)] == []


def test_api_command_and_environment(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose["services"]
    api = services["api"]
    command = command_of(api)
    assert command[:2] == ["koala", "serve"]
    assert (BIN / "koala").exists()
    serve = koala_cli.commands["serve"]
    assert check_click_args(serve, command[2:]) == {"host": "0.0.0.0", "port": 8000, "workers": 1}
    assert "8000:8000" in api["ports"]

    environment = {key: str(value) for key, value in api["environment"].items()}
    assert environment["RAY_ADDRESS"] == "ray-head:6379"
    assert environment["JOIN_RAY_CLUSTER"] == "true"
    assert environment["RAY_AUTH_TOKEN"] == SECRETS["RAY_AUTH_TOKEN"]
    # The settings load from exactly this environment, and point at the compose PostgreSQL.
    for key in list(os.environ):
        if key.startswith("KOALA_"):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    url = make_url(settings.database_url)
    postgres = services["postgres"]["environment"]
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port) == ("postgres", 5432)
    assert (url.username, url.password, url.database) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    )
    assert str(settings.data_dir) == "/data"
    assert settings.limits.max_gpu == 8
    assert settings.max_concurrent_jobs == 2
    assert healthcheck_command(api)[:2] == ["python", "-c"]
    assert "127.0.0.1:8000/healthz" in healthcheck_command(api)[2]


def test_optuna_dashboard_reads_the_same_database(compose: dict[str, Any]) -> None:
    services = compose["services"]
    command = command_of(services["optuna-dashboard"])
    executable = BIN / command[0]
    assert executable.exists()
    usage = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    options = [arg.split("=", 1)[0] for arg in command[1:] if arg.startswith("--")]
    assert options
    assert all(option in usage for option in options)
    (storage,) = [arg for arg in command[1:] if not arg.startswith("--")]
    assert storage == services["api"]["environment"]["KOALA_DATABASE_URL"]
    assert "--port=8080" in command
    assert services["optuna-dashboard"]["ports"] == ["127.0.0.1:8080:8080"]  # no authentication: loopback only
    assert "127.0.0.1:8080/" in healthcheck_command(services["optuna-dashboard"])[2]


def test_every_interpolated_variable_is_in_the_env_example() -> None:
    used = {match["name"] for match in INTERPOLATION.finditer((DOCKER / "compose.yaml").read_text())}
    assert used <= set(env_example())
    assert "docker/.env" in (ROOT / ".gitignore").read_text().splitlines()
    assert "docker/.env" in (ROOT / ".dockerignore").read_text().splitlines()
    assert ".venv" in (ROOT / ".dockerignore").read_text().splitlines()


def test_readme_commands_exist() -> None:
    readme = (DOCKER / "README.md").read_text()
    assert "docker compose run --rm api koala token create" in readme
    create = koala_cli.commands["token"].commands["create"]  # type: ignore[attr-defined]
    assert "--name" in options_of(create)
    assert "--scale ray-worker=" in readme
    assert "RAY_ADDRESS" in readme
    assert "KubeRay" in readme
    assert "-head-svc" in readme
    for command in ("submit", "watch", "results"):
        assert f"koala {command}" in readme
        assert command in koala_cli.commands


# ---- Dockerfiles --------------------------------------------------------------------------------------------------


def instructions(path: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    logical = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            keyword, _, arguments = logical.strip().partition(" ")
            yield keyword.upper(), arguments.strip()
        logical = ""


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile(name: str) -> None:
    steps = list(instructions(DOCKER / name))
    keywords = [keyword for keyword, _ in steps]
    (base,) = [arguments for keyword, arguments in steps if keyword == "FROM"]
    image, _, tag = base.rpartition(":")
    assert re.search(r"\d+\.\d+", tag), f"base image not pinned to a version: {base}"
    assert image == ("python" if name == "Dockerfile" else "nvidia/cuda")

    users = [arguments for keyword, arguments in steps if keyword == "USER"]
    assert users
    assert users[-1] not in {"root", "0"}
    assert keywords.index("USER") > max(i for i, keyword in enumerate(keywords) if keyword == "RUN")
    runs = " ".join(arguments for keyword, arguments in steps if keyword == "RUN")
    assert f"useradd --create-home --uid 1000 --shell /usr/sbin/nologin {users[-1]}" in runs
    index = "cpu" if name == "Dockerfile" else "cu128"
    assert "torch==2.13.0" in runs
    assert re.search(r"download\.pytorch\.org/whl/" + index, (DOCKER / name).read_text())
    assert 'pip install --constraint /opt/koala/constraints.txt "/src[service]"' in runs
    for keyword, arguments in steps:
        if keyword == "COPY" and not arguments.startswith("--from"):
            sources = [part for part in arguments.split()[:-1] if not part.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"

    (health,) = [arguments for keyword, arguments in steps if keyword == "HEALTHCHECK"]
    assert "CMD" in health
    if name == "Dockerfile":
        assert "127.0.0.1:8000/healthz" in health
    else:
        assert "ray health-check" in health
    assert dict(steps)["ENTRYPOINT"] == '["koala-entrypoint"]'


def test_constraints_pin_every_dependency() -> None:
    pins: dict[str, str] = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.]+", line), line
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    requirements = service_requirements()
    assert {"torch", "httpx", "click", "ray", "fastapi"} <= {canonicalize_name(r.name) for r in requirements}
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in docker/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {requirement}"


def service_requirements() -> list[Requirement]:
    """What `pip install .[service]` asks for: the base dependencies and the service extra, with the project's own
    extras it names (`koala-optim[optim,client]`) expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    own = canonicalize_name(project["name"])
    found: list[Requirement] = []
    pending = [Requirement(spec) for spec in project["dependencies"]] + [Requirement(f"{own}[service]")]
    seen: set[str] = set()
    while pending:
        requirement = pending.pop()
        if canonicalize_name(requirement.name) != own:
            found.append(requirement)
            continue
        for extra in sorted(requirement.extras - seen):
            seen.add(extra)
            pending.extend(Requirement(spec) for spec in project["optional-dependencies"][extra])
    return found


# ---- the entry point ----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """`ray` and `koala` stand-ins that append their arguments to calls.log."""
    for tool in ("ray", "koala"):
        script = tmp_path / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls.log"\n')
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def run_entrypoint(fake_bin: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": f"{fake_bin}:/usr/bin:/bin", **env}
    return subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), *args], env=environment, capture_output=True, text=True, timeout=30
    )


def calls(fake_bin: Path) -> list[str]:
    log = fake_bin / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_entrypoint_joins_the_cluster_before_serving(fake_bin: Path) -> None:
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)
    serve = ["koala", "serve", "--host", "0.0.0.0", "--port", "8000"]
    result = run_entrypoint(fake_bin, serve, JOIN_RAY_CLUSTER="true", RAY_ADDRESS="ray-head:6379")
    assert result.returncode == 0, result.stderr
    join, served = calls(fake_bin)
    assert served == "koala serve --host 0.0.0.0 --port 8000"
    args = shlex.split(join)
    assert args[:2] == ["ray", "start"]
    parsed = check_ray(args)
    assert (parsed["address"], parsed["num_cpus"], parsed["num_gpus"]) == ("ray-head:6379", 0, 0)


def test_entrypoint_runs_other_commands_without_joining(fake_bin: Path) -> None:
    result = run_entrypoint(fake_bin, ["koala", "token", "create"], JOIN_RAY_CLUSTER="true", RAY_ADDRESS="h:6379")
    assert result.returncode == 0, result.stderr
    assert calls(fake_bin) == ["koala token create"]
    result = run_entrypoint(fake_bin, ["koala", "serve"])  # not asked to join
    assert calls(fake_bin)[-1] == "koala serve"
    result = run_entrypoint(fake_bin, ["koala", "serve"], JOIN_RAY_CLUSTER="true")
    assert result.returncode != 0
    assert "needs RAY_ADDRESS" in result.stderr
