"""Stop the embedded nats-server in the middle of a campaign and start it again on the same port,
data folder and users: the services reconnect on their own, JetStream's file storage keeps every
event, and the campaign completes once (one deploy, one registry revision, every consumer drained)."""
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from shared import subjects, supervisor
from test_crash_recovery import FAST, KEY, _completed, _count

pytestmark = [pytest.mark.e2e, pytest.mark.nats]

ROOT = Path(__file__).resolve().parents[2]
DOWN_S = 5.0  # long enough for every service to notice and enter its reconnect loop


async def _connect(url: str):
    # Our own client rides the outage like the services do.
    return await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.5)


async def _dead_letters(nc) -> int:
    info = await nc.jetstream().stream_info(subjects.STREAM_NAME, subjects_filter=f"{subjects.DEAD_LETTER_PREFIX}.>")
    return sum((info.state.subjects or {}).values())


async def _campaign_across_a_restart(loop: supervisor.Loop, when: str, event_file: Path) -> tuple:
    nc = await _connect(loop.nats_url)
    try:
        published = subprocess.run([sys.executable, "-m", "kernelloop", "publish", "usage.changed", str(event_file)],
                                   cwd=ROOT, env=loop.env, capture_output=True, text=True, timeout=60)
        assert published.returncode == 0, published.stderr
        deadline = time.monotonic() + 180
        while await _count(nc, when) == 0:
            assert time.monotonic() < deadline, f"the campaign never reached {when}"
            await asyncio.sleep(0.05)

        await asyncio.to_thread(loop.server.restart, DOWN_S)

        deploys, history, unfinished = await _completed(nc, loop, "the restart")
        return deploys, history, unfinished, await _dead_letters(nc)
    finally:
        await nc.close()


# Down while the generator, the benchmarker and then the deployer have work in hand.
@pytest.mark.parametrize("when", [subjects.HYPOTHESIS, subjects.VARIANT_READY, subjects.BENCH_RESULT])
def test_services_reconnect_after_nats_restart_and_nothing_is_lost(when, tmp_path):
    loop = supervisor.start(tmp_path, env=FAST)  # the embedded server, as `kernelloop up` runs it
    try:
        loop.wait_ready()
        event = tmp_path / "event.json"
        event.write_text(json.dumps({"key": KEY.model_dump(), "reason": "manual",
                                     "profile": [{"shape": [8, 1024], "weight": 1.0}]}))
        deploys, history, unfinished, dead = asyncio.run(_campaign_across_a_restart(loop, when, event))
        assert not loop.dead(), f"{loop.dead()} exited instead of reconnecting"
    finally:
        loop.stop()
    assert len(deploys) == 1 and deploys[0].key == KEY, deploys
    assert len(history) == 1, "one registry revision, not a second write of the same deploy"
    assert unfinished == {}, f"events left unprocessed: {unfinished}"
    assert dead == 0, "an event was given up on while the server was away"
