"""Who may do what, enforced by the server: the embedded nats-server runs with the users and
permissions of shared/nats_auth.py, the same table deploy/nats.conf is rendered from. A user that
publishes what it does not produce, or writes a bucket it does not own, is refused by the server."""
import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
from nats.js.api import KeyValueConfig

from shared import nats_auth, nats_server, subjects, supervisor
from shared.broker import STREAM_CONFIG
from test_crash_recovery import FAST, KEY, _deploys

ROOT = Path(__file__).resolve().parents[2]


def test_compose_nats_config_is_the_rendering_of_the_permissions_table():
    assert (ROOT / "deploy" / "nats.conf").read_text() == nats_auth.render_config(), \
        "deploy/nats.conf is stale: python -m shared.nats_auth > deploy/nats.conf"


def test_generated_credentials_are_private_and_kept_across_starts(tmp_path):
    first = nats_auth.credentials(tmp_path / "auth")
    assert set(first) == set(nats_auth.USERS) and len(set(first.values())) == len(first)
    assert stat.S_IMODE(os.stat(tmp_path / "auth" / "nats.env").st_mode) == 0o600
    assert nats_auth.credentials(tmp_path / "auth") == first, "a restarted loop keeps its users"


def test_only_the_deployer_may_publish_deploy_and_write_the_registry():
    deployer, workload = nats_auth.ROLES["deployer"], nats_auth.ROLES["workload"]
    assert nats_auth.publish_allow(workload) == [*nats_auth.JETSTREAM, subjects.KERNEL_STATS,
                                                 subjects.CANARY_REPORT]
    for user, role in nats_auth.ROLES.items():
        allowed = nats_auth.publish_allow(role)
        if role is not deployer:
            assert subjects.DEPLOY not in allowed and f"$KV.{subjects.REGISTRY_BUCKET}.>" not in allowed, user
            assert f"$JS.API.STREAM.PURGE.KV_{subjects.REGISTRY_BUCKET}" in nats_auth.publish_deny(role), user


@pytest.fixture
def secured(tmp_path):
    """An embedded server with the generated config; yields user -> NATS URL."""
    folder = tmp_path / "auth"
    passwords = nats_auth.credentials(folder)
    server = nats_server.start(tmp_path / "nats", config=nats_auth.write_config(folder),
                               env=nats_auth.server_environment(passwords))
    try:
        yield {user: nats_auth.url_for(server.url, user, p) for user, p in passwords.items()}
    finally:
        server.stop()


async def _connect(url: str) -> tuple[nats.NATS, list[str]]:
    errors = []

    async def on_error(e):
        errors.append(str(e))

    return await nats.connect(url, error_cb=on_error, max_reconnect_attempts=0), errors


def _violation(errors: list[str], subject: str) -> bool:
    return any("permissions violation" in e.lower() and subject.lower() in e.lower() for e in errors)


async def _refused(url: str, action) -> tuple[bool, list[str]]:
    """Run action(js) as the URL's user: True when the server refused it (the publish gets no
    acknowledgement and the client is told of a permissions violation)."""
    nc, errors = await _connect(url)
    try:
        try:
            await action(nc.jetstream(timeout=2))
            refused = False
        except (nats.errors.TimeoutError, nats.js.errors.Error, nats.errors.Error):
            refused = True
        await nc.flush()
        await asyncio.sleep(0.2)  # the server's -ERR arrives after the publish
        return refused, errors
    finally:
        await nc.close()


@pytest.mark.nats
async def test_server_refuses_a_deploy_or_registry_write_from_the_workload_and_takes_them_from_the_deployer(secured):
    admin, _ = await _connect(secured[nats_auth.ADMIN])
    try:
        js = admin.jetstream()
        await js.add_stream(**STREAM_CONFIG)
        registry = await js.create_key_value(KeyValueConfig(bucket=subjects.REGISTRY_BUCKET,
                                                            history=subjects.REGISTRY_HISTORY))
        key, value = str(KEY), b'{"variant_id": "forged"}'

        async def deploy(js):
            await js.publish(subjects.DEPLOY, b"{}", headers={"Nats-Msg-Id": "forged-deploy"})

        async def write_registry(js):
            await (await js.key_value(subjects.REGISTRY_BUCKET)).put(key, value)

        async def purge_registry(js):
            await js.purge_stream(f"KV_{subjects.REGISTRY_BUCKET}")

        for user in ("workload", "detector", "benchmarker"):
            for action, subject in ((deploy, subjects.DEPLOY), (write_registry, f"$KV.{subjects.REGISTRY_BUCKET}"),
                                    (purge_registry, f"$JS.API.STREAM.PURGE.KV_{subjects.REGISTRY_BUCKET}")):
                refused, errors = await _refused(secured[user], action)
                assert refused and _violation(errors, subject), (user, action.__name__, errors)
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await registry.get(key)
        assert (await js.stream_info(subjects.STREAM_NAME)).state.messages == 0, "no deploy event got in"

        # What the workload does is allowed: publish its stats and canary reports, read and watch
        # the registry.
        async def stats_and_read(js):
            await js.publish(subjects.KERNEL_STATS, b"{}", headers={"Nats-Msg-Id": "stats-1"})
            await js.publish(subjects.CANARY_REPORT, b"{}", headers={"Nats-Msg-Id": "canary-1"})
            with pytest.raises(nats.js.errors.KeyNotFoundError):
                await (await js.key_value(subjects.REGISTRY_BUCKET)).get(key)

        refused, errors = await _refused(secured["workload"], stats_and_read)
        assert not refused and not errors, errors

        for action in (deploy, write_registry):
            refused, errors = await _refused(secured["deployer"], action)
            assert not refused and not errors, (action.__name__, errors)
        assert (await registry.get(key)).value == value
    finally:
        await admin.close()


def _violations(logs: Path) -> list[str]:
    return [line for log in logs.glob("*.log") for line in log.read_text(errors="replace").splitlines()
            if "violation" in line.lower()]


@pytest.mark.nats
@pytest.mark.e2e
def test_the_five_services_run_a_campaign_as_their_own_users(tmp_path):
    loop = supervisor.start(tmp_path, env=FAST)  # embedded: generated users and config
    try:
        assert loop.url_for("deployer") != loop.url_for("observer") != loop.nats_url
        loop.wait_ready()
        event = tmp_path / "event.json"
        event.write_text(json.dumps({"key": KEY.model_dump(), "reason": "manual",
                                     "profile": [{"shape": [8, 1024], "weight": 1.0}]}))
        published = subprocess.run([sys.executable, "-m", "kernelloop", "publish", "usage.changed", str(event)],
                                   cwd=ROOT, env=loop.env, capture_output=True, text=True, timeout=60)
        assert published.returncode == 0, published.stderr

        async def deployed() -> list:
            nc = await nats.connect(loop.nats_url)
            try:
                deadline = time.monotonic() + 420
                while not (found := await _deploys(nc)):
                    assert not loop.dead(), f"{loop.dead()} exited; see {loop.state_dir / 'logs'}"
                    assert time.monotonic() < deadline, "the campaign did not complete"
                    await asyncio.sleep(2)
                return found
            finally:
                await nc.close()

        deploys = asyncio.run(deployed())
    finally:
        loop.stop()
    assert len(deploys) == 1 and deploys[0].key == KEY
    assert _violations(tmp_path / "logs") == [], "a service was refused something it needs"
