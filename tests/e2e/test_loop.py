"""The whole loop as a user runs it: five service processes on a real nats-server, a workload whose
usage shifts (the demo, shrunk), and a campaign started by a hand-published event."""
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from shared import subjects, supervisor
from shared.schemas import Deploy, KernelKey, RegistryEntry

pytestmark = [pytest.mark.e2e, pytest.mark.nats]

ROOT = Path(__file__).resolve().parents[2]
FIVE = {"observer", "detector", "generator", "benchmarker", "deployer"}
# Small shapes and few repetitions: the interpreter is slow, and the test asserts the loop, not speed.
FAST = {"KERNELLOOP_BENCH_REPS": "5", "KERNELLOOP_ROUNDS": "1", "KERNELLOOP_VARIANTS_PER_ROUND": "6",
        "KERNELLOOP_WINDOW_S": "1", "KERNELLOOP_CANARY_SLOT_S": "1", "TRITON_INTERPRET": "1"}


def _env(nats_url: str, state_dir: Path) -> dict:
    return {**os.environ, **FAST, "NATS_URL": nats_url, "KERNELLOOP_STATE_DIR": str(state_dir), "PYTHONUNBUFFERED": "1"}


def _kernelloop(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernelloop", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


async def _registry_entry(nats_url: str, key: str) -> RegistryEntry | None:
    nc = await nats.connect(nats_url)
    try:
        try:
            kv = await nc.jetstream().key_value(subjects.REGISTRY_BUCKET)
            return RegistryEntry.model_validate_json((await kv.get(key)).value)
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
            return None  # nothing deployed yet (the deployer creates the bucket on its first write)
    finally:
        await nc.close()


async def _deploy_events(nats_url: str) -> list[Deploy]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(subjects.DEPLOY, stream=subjects.STREAM_NAME)
        try:
            msgs = await sub.fetch(10, timeout=2)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):  # nothing there yet
            return []
        return [Deploy.model_validate_json(m.data) for m in msgs]
    finally:
        await nc.close()


def test_shifted_workload_gets_a_kernel_whose_canary_promotes_it_and_it_then_serves(nats_url, tmp_path):
    shifted = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
    demo = _kernelloop("up", "--demo", "--phase-s", "15", "--deadline-s", "420", "--shapes", "4x384", "8x1024",
                       "--dtype", "float32", env=_env(nats_url, tmp_path), timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]

    summary = json.loads((tmp_path / "demo-summary.json").read_text())
    assert summary["interpreter"] is True and "interpreter" in summary["fallback"]
    deployed = {d["key"]: d for d in summary["deploys"]}
    assert str(shifted) in deployed, f"no deploy for the shifted shape: {summary}"
    row = deployed[str(shifted)]
    assert row["after_us_per_call"] is not None, "the workload never served the deployed variant"
    assert row["stage"] == "promoted" and row["step_speedup"] > 1, "the canary did not promote it"
    assert FIVE <= set(row["trace_services"]), row["trace_services"]

    entry = asyncio.run(_registry_entry(nats_url, str(shifted)))
    assert entry is not None and entry.variant_id == row["variant_id"] and entry.speedup > 1
    assert entry.trace_id == row["trace_id"] and entry.stage == "promoted"
    events = [e for e in asyncio.run(_deploy_events(nats_url)) if e.key == shifted]
    assert [(e.variant_id, e.stage) for e in events] == [(row["variant_id"], "canary"), (row["variant_id"], "promoted")], \
        "expected one deploy as a canary, then its promotion"
    assert events[1].step_speedup_ci_low > 1 and events[1].trace_id == entry.trace_id


def test_hand_published_usage_changed_runs_a_campaign_that_trace_shows(nats_url, tmp_path):
    key = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
    env = _env(nats_url, tmp_path)
    loop = supervisor.start(tmp_path, nats_url=nats_url, env=FAST)
    try:
        loop.wait_ready()
        event = tmp_path / "shift.json"
        event.write_text(json.dumps({"key": key.model_dump(), "reason": "manual",
                                     "detail": "model roll-out: hidden 1024, decode batches of 8",
                                     "profile": [{"shape": [8, 1024], "weight": 1.0}]}))
        published = _kernelloop("publish", "usage.changed", str(event), "--json", env=env)
        assert published.returncode == 0, published.stderr
        trace_id = json.loads(published.stdout)["trace_id"]

        deadline = time.monotonic() + 420
        while (entry := asyncio.run(_registry_entry(nats_url, str(key)))) is None:
            assert not loop.dead(), f"{loop.dead()} exited; logs in {tmp_path / 'logs'}"
            assert time.monotonic() < deadline, "no deploy within 7 minutes"
            time.sleep(2)
        assert entry.trace_id == trace_id, "the deploy is not in the trace the publish started"
    finally:
        loop.stop()

    shown = _kernelloop("trace", trace_id, env=env)
    assert shown.returncode == 0, shown.stderr
    for service in ("kernelloop-cli", "detector", "generator", "benchmarker", "deployer"):
        assert service in shown.stdout.splitlines()[0], shown.stdout[:500]
    assert "hypothesise" in shown.stdout and "decide" in shown.stdout and entry.variant_id in shown.stdout
