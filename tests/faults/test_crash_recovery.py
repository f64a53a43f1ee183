"""kill -9 one service in the middle of a campaign and restart it: the campaign completes, every
event is processed, and nothing happens twice (one deploy, one registry revision)."""
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from shared import subjects, supervisor
from shared.schemas import Deploy, KernelKey

pytestmark = [pytest.mark.e2e, pytest.mark.nats]

ROOT = Path(__file__).resolve().parents[2]
KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
FAST = {"KERNELLOOP_BENCH_REPS": "5", "KERNELLOOP_ROUNDS": "1", "KERNELLOOP_VARIANTS_PER_ROUND": "4",
        "TRITON_INTERPRET": "1"}
# Kill each stage once the campaign has reached it: the event it works on is then in flight.
KILL_WHEN = {
    "detector": subjects.USAGE_CHANGED,
    "generator": subjects.HYPOTHESIS,
    "benchmarker": subjects.VARIANT_READY,
    "deployer": subjects.BENCH_RESULT,
    "observer": subjects.USAGE_CHANGED,
}


async def _count(nc, subject: str) -> int:
    info = await nc.jetstream().stream_info(subjects.STREAM_NAME, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def _deploys(nc) -> list[Deploy]:
    sub = await nc.jetstream().pull_subscribe(subjects.DEPLOY, stream=subjects.STREAM_NAME)
    try:
        return [Deploy.model_validate_json(m.data) for m in await sub.fetch(10, timeout=2)]
    except (nats.errors.TimeoutError, asyncio.TimeoutError):  # nothing there yet
        return []


async def _longest_ack_wait(nc) -> float:
    js = nc.jetstream()
    return max([(await js.consumer_info(subjects.STREAM_NAME, d)).config.ack_wait or 0
                for d in subjects.DURABLE.values()])


async def _unfinished(nc) -> dict[str, tuple[int, int]]:
    """Durable consumers with messages not yet delivered or not yet acked."""
    js = nc.jetstream()
    left = {}
    for durable in subjects.DURABLE.values():
        info = await js.consumer_info(subjects.STREAM_NAME, durable)
        if info.num_pending or info.num_ack_pending:
            left[durable] = (info.num_pending, info.num_ack_pending)
    return left


async def _campaign_with_a_crash(nats_url: str, loop: supervisor.Loop, victim: str, event_file: Path) -> tuple:
    nc = await nats.connect(nats_url)
    try:
        published = subprocess.run([sys.executable, "-m", "kernelloop", "publish", "usage.changed", str(event_file)],
                                   cwd=ROOT, env=loop.env, capture_output=True, text=True, timeout=60)
        assert published.returncode == 0, published.stderr
        deadline = time.monotonic() + 120
        while await _count(nc, KILL_WHEN[victim]) == 0:
            assert time.monotonic() < deadline, f"the campaign never reached {victim}"
            await asyncio.sleep(0.05)
        loop.kill(victim)
        await asyncio.sleep(1.0)
        loop.restart(victim)

        return await _completed(nc, loop, "the crash")
    finally:
        await nc.close()


async def _completed(nc, loop: supervisor.Loop, after: str) -> tuple:
    """Wait for the campaign's deploy, then for every consumer to drain: a message in hand when a
    process or the server went away comes back only after its ack_wait, and a duplicate deploy from
    that redelivery must be seen. Returns (deploys, registry history of KEY, unfinished consumers)."""
    deadline = time.monotonic() + 420
    while not await _deploys(nc):
        assert not loop.dead(), f"{loop.dead()} exited; see {loop.state_dir / 'logs'}"
        assert time.monotonic() < deadline, f"the campaign did not complete after {after}"
        await asyncio.sleep(2)
    deadline = time.monotonic() + await _longest_ack_wait(nc) + 60
    while (unfinished := await _unfinished(nc)) and time.monotonic() < deadline:
        await asyncio.sleep(1)
    await asyncio.sleep(3)  # let anything the last redelivery published arrive
    kv = await nc.jetstream().key_value(subjects.REGISTRY_BUCKET)
    return await _deploys(nc), await kv.history(str(KEY)), unfinished


@pytest.mark.parametrize("victim", list(KILL_WHEN))
def test_killed_service_restarts_and_the_campaign_completes_once(victim, nats_url, tmp_path):
    loop = supervisor.start(tmp_path, nats_url=nats_url, env=FAST)
    try:
        loop.wait_ready()
        event = tmp_path / "event.json"
        event.write_text(json.dumps({"key": KEY.model_dump(), "reason": "manual",
                                     "profile": [{"shape": [8, 1024], "weight": 1.0}]}))
        deploys, history, unfinished = asyncio.run(_campaign_with_a_crash(nats_url, loop, victim, event))
    finally:
        loop.stop()
    assert len(deploys) == 1 and deploys[0].key == KEY, deploys
    assert len(history) == 1, "one registry revision, not a second write of the same deploy"
    assert unfinished == {}, f"events left unprocessed: {unfinished}"
