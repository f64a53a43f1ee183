"""The loop on a three-node NATS cluster (the stream and every KV bucket kept by three nodes): stop
the node that leads the stream in the middle of a campaign, cleanly or by kill -9 as a host that
dies, and the campaign completes once (one deploy, one registry revision, every consumer drained),
the registry stays readable and writable, and the node rejoins when it comes back."""
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest

from shared import nats_server, subjects, supervisor
from shared.schemas import RegistryEntry
from test_crash_recovery import FAST, KEY, _count, _deploys, _longest_ack_wait, _unfinished
from test_nats_restart import _dead_letters

pytestmark = [pytest.mark.e2e, pytest.mark.nats]

ROOT = Path(__file__).resolve().parents[2]
REPLICAS = 3
# While the cluster elects new leaders for what the stopped node led, the JetStream API answers
# with errors or not at all; our checks ask again, as the services' retries do.
ELECTION_ERRORS = (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, TimeoutError)


async def _settled(call, *args, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call(*args)
        except ELECTION_ERRORS:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _stream_leader(js, stream: str) -> str:
    return (await js.stream_info(stream)).cluster.leader


async def _history(js) -> list:
    return await (await js.key_value(subjects.REGISTRY_BUCKET)).history(str(KEY))


async def _registry_round_trip(js) -> tuple[RegistryEntry, bytes]:
    """Read the deployed key, then write and delete a scratch key, as a person with admin rights would."""
    kv = await js.key_value(subjects.REGISTRY_BUCKET)
    entry = RegistryEntry.model_validate_json((await kv.get(str(KEY))).value)
    scratch = "scratch.cluster-check"
    await kv.put(scratch, b"written with a node down")
    read_back = (await kv.get(scratch)).value
    await kv.delete(scratch)
    return entry, read_back


async def _all_current(js, stream: str, names: set[str]) -> bool:
    """Every node holds a current copy: the leader plus the others as current, none offline."""
    cluster = (await js.stream_info(stream)).cluster
    current = {r.name for r in cluster.replicas or [] if r.current and not r.offline}
    return cluster.leader is not None and {cluster.leader} | current == names


def _kill(node: nats_server.NatsServer) -> None:
    node.process.kill()  # no leadership handed over, nothing flushed: a host that dies
    node.process.wait()


GO_DOWN = {"stopped": nats_server.NatsServer.stop, "killed": _kill}  # SIGTERM, or SIGKILL


async def _campaign_losing_a_node(cluster: nats_server.Cluster, loop: supervisor.Loop, event_file: Path,
                                  how: str) -> dict:
    nc = await nats.connect(cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    js = nc.jetstream()
    found = {}
    try:
        found["stream_replicas"] = (await js.stream_info(subjects.STREAM_NAME)).config.num_replicas
        published = subprocess.run([sys.executable, "-m", "kernelloop", "publish", "usage.changed", str(event_file)],
                                   cwd=ROOT, env=loop.env, capture_output=True, text=True, timeout=60)
        assert published.returncode == 0, published.stderr
        deadline = time.monotonic() + 180
        while await _count(nc, subjects.VARIANT_READY) == 0:
            assert time.monotonic() < deadline, "the campaign never reached the benchmarker"
            await asyncio.sleep(0.05)

        # The stream's leader: its loss forces an election while variants are being benchmarked.
        stopped = found["stopped"] = await _stream_leader(js, subjects.STREAM_NAME)
        await asyncio.to_thread(GO_DOWN[how], cluster.nodes[stopped])

        deadline = time.monotonic() + 420
        while not await _settled(_deploys, nc):
            assert not loop.dead(), f"{loop.dead()} exited; see {loop.state_dir / 'logs'}"
            assert time.monotonic() < deadline, "the campaign did not complete with a node down"
            await asyncio.sleep(2)
        # A message in hand at the stopped node's consumers comes back after its ack_wait.
        deadline = time.monotonic() + await _settled(_longest_ack_wait, nc) + 60
        while (unfinished := await _settled(_unfinished, nc)) and time.monotonic() < deadline:
            await asyncio.sleep(1)
        await asyncio.sleep(3)  # let anything the last redelivery published arrive
        found["unfinished"] = unfinished
        found["deploys"] = await _settled(_deploys, nc)
        found["dead"] = await _settled(_dead_letters, nc)
        registry_stream = f"KV_{subjects.REGISTRY_BUCKET}"
        found["registry_replicas"] = (await _settled(js.stream_info, registry_stream)).config.num_replicas
        found["history"] = await _settled(_history, js)
        found["entry"], found["read_back"] = await _settled(_registry_round_trip, js)
        found["new_leader"] = await _settled(_stream_leader, js, subjects.STREAM_NAME)

        # Back on its data, the node catches up and holds a current copy again.
        await asyncio.to_thread(cluster.nodes[stopped].restart)
        await asyncio.to_thread(cluster.wait_healthy, 120.0)
        names, deadline = set(cluster.nodes), time.monotonic() + 120
        while not all([await _settled(_all_current, js, s, names) for s in (subjects.STREAM_NAME, registry_stream)]):
            assert time.monotonic() < deadline, f"node {stopped} did not rejoin with current copies"
            await asyncio.sleep(1)
        return found
    finally:
        await nc.close()


@pytest.mark.parametrize("how", list(GO_DOWN))
def test_campaign_completes_once_when_the_stream_leader_goes_down(how, tmp_path):
    cluster = nats_server.start_cluster(tmp_path / "nats", size=REPLICAS)
    try:
        loop = supervisor.start(tmp_path / "loop", nats_url=cluster.url,
                                env={**FAST, "KERNELLOOP_NATS_REPLICAS": str(REPLICAS)})
        try:
            loop.wait_ready(timeout=120)
            event = tmp_path / "event.json"
            event.write_text(json.dumps({"key": KEY.model_dump(), "reason": "manual",
                                         "profile": [{"shape": [8, 1024], "weight": 1.0}]}))
            found = asyncio.run(_campaign_losing_a_node(cluster, loop, event, how))
            assert not loop.dead(), f"{loop.dead()} exited instead of going on with another node"
        finally:
            loop.stop()
    finally:
        cluster.stop()
    assert found["stream_replicas"] == REPLICAS and found["registry_replicas"] == REPLICAS
    deploys = found["deploys"]
    assert len(deploys) == 1 and deploys[0].key == KEY, deploys
    assert len(found["history"]) == 1, "one registry revision, not a second write of the same deploy"
    assert found["unfinished"] == {}, f"events left unprocessed: {found['unfinished']}"
    assert found["dead"] == 0, "an event was given up on while the cluster elected new leaders"
    assert found["entry"].variant_id == deploys[0].variant_id, "the registry does not serve what was deployed"
    assert found["read_back"] == b"written with a node down"
    assert found["new_leader"] != found["stopped"]
