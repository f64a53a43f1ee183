"""`docker compose up` as shipped: compose.yaml is valid Compose, runs real modules with every setting
they read, the NATS config lets each service do its work and nothing else, and the Dockerfile installs
what pyproject declares. Where a Docker engine answers, the stack is built and brought up for real."""
import asyncio
import importlib
import importlib.util
import json
import os
import re
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path

import jsonschema
import nats
import pytest
import yaml

from shared import nats_server, subjects, supervisor
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
# Services that run kernelloop's code (every one but NATS and Jaeger).
OURS = {name: svc for name, svc in SERVICES.items() if svc.get("command", [""])[0] == "python"}
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")
ALIASES = {field.alias: name for name, field in Settings.model_fields.items()}
# Where a process on the host would be right and a container wrong, compose must say.
MUST_SET = {"NATS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT", "KERNELLOOP_STATE_DIR"}


def _module(svc: dict) -> str:
    command = svc["command"]
    assert command[:2] == ["python", "-m"], f"command {command} is not `python -m <service>`"
    return command[2]


def _env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def _nats_users() -> dict[str, str]:
    """user -> the environment variable holding its password, from deploy/nats.conf."""
    text = (ROOT / "deploy" / "nats.conf").read_text()
    return dict(re.findall(r"\{user: (\w+), password: \$(\w+)", text))


def test_compose_file_validates_against_the_compose_specification():
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(COMPOSE)  # raises, naming the offending path, when invalid


def test_compose_runs_the_five_services_and_a_cpu_and_a_gpu_benchmarker():
    assert {_module(svc) for svc in OURS.values()} == set(supervisor.SERVICES)
    bench = {name: svc for name, svc in OURS.items() if _module(svc) == "benchmarker"}
    assert any("cpu" in svc.get("profiles", []) and svc["environment"].get("TRITON_INTERPRET") == "1"
               for svc in bench.values()), "no CPU benchmarker profile"
    gpus = [svc for svc in bench.values() if "deploy" in svc]
    assert gpus, "no GPU benchmarker"
    device_ids = [svc["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for svc in gpus]
    assert len({tuple(d) for d in device_ids}) == len(gpus), "two GPU benchmarkers pinned to the same device"


@pytest.mark.parametrize("name", sorted(OURS))
def test_every_service_command_and_healthcheck_resolve_to_real_code(name):
    module = _module(OURS[name])
    assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{name}: no module {module}.__main__"
    assert hasattr(importlib.import_module(f"{module}.app"), "build_app")
    test = OURS[name]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "kernelloop", "health"] and test[3] == module
    from kernelloop.cli import main

    with pytest.raises(SystemExit) as done:
        main(["health", module, "--help"])
    assert done.value.code == 0


@pytest.mark.parametrize("name", sorted(OURS))
def test_every_setting_a_service_reads_is_set_in_compose_with_the_settings_default(name):
    env = OURS[name]["environment"]
    missing = sorted(set(ALIASES) - set(env))
    assert not missing, f"{name}: settings not passed in compose.yaml: {missing}"
    for alias in MUST_SET:
        assert env[alias], f"{name}: {alias} must be set for containers"
    for alias, value in env.items():
        if alias not in ALIASES:
            assert alias in {"TRITON_INTERPRET"}, f"{name}: {alias} is no setting any service reads"
            continue
        match = INTERPOLATION.fullmatch(str(value)) if value is not None else None
        if match and match.group(2) is not None and alias not in MUST_SET:  # those differ on purpose
            field = ALIASES[alias]
            default = Settings.model_fields[field].default
            parsed = getattr(Settings(**{alias: match.group(2)}), field) if match.group(2) else ""
            assert parsed == default or (default is None and parsed == ""), \
                f"{name}: compose defaults {alias} to {match.group(2)!r}, Settings to {default!r}"


def test_env_example_shows_the_settings_defaults():
    for alias, value in _env_example().items():
        if alias in ALIASES and alias not in MUST_SET and value:
            field = ALIASES[alias]
            assert getattr(Settings(**{alias: value}), field) == Settings.model_fields[field].default, \
                f".env.example sets {alias}={value}, but its default is {Settings.model_fields[field].default!r}"


def test_every_variable_compose_interpolates_is_documented_in_env_example():
    documented = set(_env_example()) | set(re.findall(r"^# ([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    used = set(INTERPOLATION.findall((ROOT / "compose.yaml").read_text()))
    used = {var for var, _ in used}
    passed = {alias for svc in OURS.values() for alias, value in svc["environment"].items() if value is None}
    assert not (used | passed) - documented, f"not in .env.example: {sorted((used | passed) - documented)}"
    for var in _env_example():
        assert var in used | passed | {"COMPOSE_PROFILES"}, f".env.example sets {var}, which nothing reads"


def test_each_service_connects_as_its_own_nats_user_with_the_password_nats_is_given():
    users = _nats_users()
    nats_env = SERVICES["nats"]["environment"]
    for name, svc in OURS.items():
        url = svc["environment"]["NATS_URL"]
        user, password = re.match(r"nats://(\w+):(.+)@nats:4222$", url).groups()
        assert user == _module(svc), f"{name} connects as {user}"
        assert nats_env[users[user]] == password, f"{name}: its password is not the one nats-server reads"


def test_dockerfile_installs_what_pyproject_declares():
    dockerfile = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = set(re.findall(r"^COPY (\w+) \1$", dockerfile, re.M))
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"packages not copied into the image: {sorted(packages - copied)}"
    # Dependencies come from pyproject itself, torch first from the index matching the base.
    assert "tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']" in dockerfile
    assert any(d.startswith("torch") for d in project["project"]["dependencies"])
    assert 'pip install --index-url ${TORCH_INDEX} "$(grep \'^torch\' /tmp/requirements.txt)"' in dockerfile
    assert "pip install --no-deps ." in dockerfile
    args = set(re.findall(r"^ARG (\w+)", dockerfile, re.M))
    for svc in SERVICES.values():
        build = svc.get("build")
        if isinstance(build, dict):
            assert set(build.get("args", {})) <= args, f"build args {build['args']} not declared in the Dockerfile"


# ---- against a real nats-server with deploy/nats.conf -----------------------------------------


@pytest.fixture
def secured_nats(tmp_path):
    """nats-server with the compose NATS config; yields (url without credentials, user -> password)."""
    passwords = {user: f"{user}-secret" for user in _nats_users()}
    env = {**os.environ, **{var: passwords[user] for user, var in _nats_users().items()}}
    port, monitor = nats_server.free_port(), nats_server.free_port()
    process = subprocess.Popen([nats_server.find_binary(), "-c", str(ROOT / "deploy" / "nats.conf"), "-sd",
                                str(tmp_path), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = nats_server.NatsServer(process, port, monitor, tmp_path)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, "nats-server refused deploy/nats.conf"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "nats-server with deploy/nats.conf not ready"
                time.sleep(0.05)
        yield f"127.0.0.1:{port}", passwords
    finally:
        server.stop()


async def _denied(url: str, subject: str) -> bool:
    errors = []

    async def on_error(e):
        errors.append(str(e))

    nc = await nats.connect(url, error_cb=on_error, max_reconnect_attempts=0)
    try:
        await nc.publish(subject, b"{}")
        await nc.flush()
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    return any("permissions violation" in e.lower() for e in errors)


@pytest.mark.nats
async def test_nats_config_lets_each_service_start_and_publish_only_what_it_produces(secured_nats, tmp_path):
    address, passwords = secured_nats
    for service in supervisor.SERVICES:
        url = f"nats://{service}:{passwords[service]}@{address}"
        app = importlib.import_module(f"{service}.app").build_app(
            Settings(NATS_URL=url, KERNELLOOP_STATE_DIR=str(tmp_path)))
        await app.start()  # declares the stream and the service's durable consumers as that user
        try:
            produced = {p.subject.broker_address for p in app.broker.publishers}
        finally:
            await app.stop()
        assert produced, f"{service} declares no publisher"
        for subject in produced:
            assert not await _denied(url, subject), f"{service} may not publish {subject}"
        events = {s for s in subjects.ALL if not s.endswith(">")}
        for subject in events - produced:
            assert await _denied(url, subject), f"{service} may publish {subject}, which it does not produce"
        # A message it cannot use goes to dead.<subject>.
        assert not await _denied(url, f"{subjects.DEAD_LETTER_PREFIX}.{subjects.KERNEL_STATS}")
    with pytest.raises(Exception):
        await nats.connect(f"nats://deployer:wrong@{address}", max_reconnect_attempts=0, connect_timeout=2,
                           allow_reconnect=False)
    admin = f"nats://admin:{passwords['admin']}@{address}"
    assert not await _denied(admin, subjects.USAGE_CHANGED), "people publish hand-written events as admin"


# ---- with a Docker engine ---------------------------------------------------------------------


def _docker_answers() -> str | None:
    """None when a Docker engine answers, else why not."""
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return None
    except Exception as e:  # no socket, no permission, no engine: all mean this test cannot run here
        return f"no Docker engine answers ({type(e).__name__}: {str(e)[:120]})"


@pytest.mark.e2e
@pytest.mark.skipif(_docker_answers() is not None, reason=str(_docker_answers()))
def test_docker_compose_up_brings_the_loop_up_healthy():
    from testcontainers.compose import DockerCompose

    with DockerCompose(str(ROOT), compose_file_name="compose.yaml", build=True, wait=True,
                       profiles=["cpu"]) as stack:
        deadline = time.monotonic() + 300
        while True:
            states = {c.Service: c.Health for c in stack.get_containers()}
            if all(states.get(s) == "healthy" for s in ("nats", *supervisor.SERVICES)):
                break
            assert time.monotonic() < deadline, f"not healthy within 5 minutes: {states}"
            time.sleep(5)
        with urllib.request.urlopen("http://127.0.0.1:16686/", timeout=5) as r:
            assert r.status == 200, "Jaeger's UI does not answer"
