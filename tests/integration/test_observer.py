"""The observer against a real nats-server: the SDK publishes kernel.stats (waiting for a stream the
services declare), hot-swaps what the registry names and refuses tampered entries; the service
turns profiler traces into kernel.stats."""
import asyncio
import json
import threading
import time

import nats
import pytest
import torch
from nats.js.api import KeyValueConfig

from observer.app import build_app
from observer.demos.demo import format_summary, run_demo
from observer.sdk import observe, ops
from shared import hardware, subjects
from shared.broker import durable_subscriber, make_broker
from shared.ops import rmsnorm
from shared.schemas import KernelStats, ProfilerTrace, RegistryEntry
from shared.settings import Settings
from shared.variants import render, variant_id

pytestmark = pytest.mark.nats

HW = "cpu-interpreter"
DEVICE = hardware.device()
KEY = f"{HW}.rmsnorm.float16.h256-r16"
OTHER_KEY = f"{HW}.rmsnorm.float16.h128-r16"


async def declare_stream(nats_url: str):
    """What a service does at start: declare the stream with shared.broker.STREAM's exact config."""
    broker, _ = make_broker(nats_url)

    @durable_subscriber(broker, subjects.USAGE_CHANGED)
    async def on_usage_changed(event: dict) -> None:
        pass

    await broker.start()
    return broker


async def receive_stats(js, calls: int, timeout: float = 20.0) -> list:
    sub = await js.pull_subscribe(subjects.KERNEL_STATS, durable="test-stats", stream=subjects.STREAM_NAME)
    got, deadline = [], time.monotonic() + timeout
    while sum(KernelStats.model_validate_json(m.data).calls for m in got) < calls and time.monotonic() < deadline:
        try:
            got += await sub.fetch(10, timeout=0.5)
        except nats.errors.TimeoutError:
            continue
    for m in got:
        await m.ack()
    return got


async def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return False


def entry_for(params: dict, **changes) -> RegistryEntry:
    source = render(rmsnorm.TEMPLATE, params)
    fields = dict(variant_id=variant_id(source, params), source=source, params=params, speedup=1.25,
                  campaign_id="camp-7", approved_by="gate", trace_id="4bf92f3577b34da6a3ce929d0e0e4736")
    return RegistryEntry(**(fields | changes))


@pytest.fixture
async def js(nats_url):
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


async def test_windows_wait_for_the_stream_and_none_are_lost(nats_url, js, tmp_path):
    runtime = observe(nats_url, hardware=HW, window_s=0.3, sample_every=2, state_dir=tmp_path)
    try:
        x, w = rmsnorm.make_inputs([4, 256], torch.float16, DEVICE, seed=0)
        for _ in range(6):
            ops.rmsnorm(x, w)
        await asyncio.sleep(1.0)  # several windows close while no stream exists
        broker = await declare_stream(nats_url)
        for _ in range(4):
            ops.rmsnorm(x, w)
    finally:
        runtime.close()  # publishes the last window
    try:
        msgs = await receive_stats(js, calls=10)
    finally:
        await broker.stop()
    stats = [KernelStats.model_validate_json(m.data) for m in msgs]
    assert sum(s.calls for s in stats) == 10
    assert {str(s.key) for s in stats} == {KEY}
    assert sum(s.sampled_calls for s in stats) == 5 and all(s.variant_id is None for s in stats)
    assert all(m.headers["Nats-Msg-Id"] == s.event_id for m, s in zip(msgs, stats))


async def test_registry_entry_is_hot_swapped_in_and_deletion_restores_the_fallback(nats_url, js, tmp_path):
    kv = await js.create_key_value(KeyValueConfig(bucket=subjects.REGISTRY_BUCKET, history=subjects.REGISTRY_HISTORY))
    runtime = observe(nats_url, hardware=HW, window_s=0.5, state_dir=tmp_path)
    try:
        x, w = rmsnorm.make_inputs([4, 256], torch.float16, DEVICE, seed=1)
        ops.rmsnorm(x, w)
        assert runtime.serving("rmsnorm", "float16", "h256-r16") is None
        entry = entry_for({"BLOCK": 256, "ROWS": 2, "num_warps": 2})
        await kv.put(KEY, entry.model_dump_json().encode())
        assert await wait_for(lambda: runtime.serving("rmsnorm", "float16", "h256-r16") == entry.variant_id, 10)
        y = ops.rmsnorm(x, w)
        ref = rmsnorm.reference(x, w).float()
        assert (y.float() - ref).norm() / ref.norm() <= rmsnorm.TOLERANCE["float16"]
        (deploy,) = runtime.deploys
        assert (deploy.key, deploy.variant_id, deploy.speedup, deploy.campaign_id, deploy.trace_id) == (
            KEY, entry.variant_id, 1.25, "camp-7", entry.trace_id)

        assert runtime.withdrawals == []

        # a better variant, then a person's rollback to the first: the second was withdrawn here
        better = entry_for({"BLOCK": 256, "ROWS": 4, "num_warps": 2}, campaign_id="camp-8")
        await kv.put(KEY, better.model_dump_json().encode())
        assert await wait_for(lambda: runtime.serving("rmsnorm", "float16", "h256-r16") == better.variant_id, 10)
        assert runtime.withdrawals == [], "a newer deploy replaces a variant; it does not withdraw it"
        back = entry.model_copy(update={"approved_by": "erin", "previous_variant_id": better.variant_id})
        await kv.put(KEY, back.model_dump_json().encode())
        assert await wait_for(lambda: runtime.serving("rmsnorm", "float16", "h256-r16") == entry.variant_id, 10)
        (rolled,) = runtime.withdrawals
        assert (rolled.key, rolled.variant_id, rolled.replaced_by) == (KEY, better.variant_id, entry.variant_id)
        assert "erin" in rolled.why

        await kv.delete(KEY)
        assert await wait_for(lambda: runtime.serving("rmsnorm", "float16", "h256-r16") is None, 10)
        assert [(w.variant_id, w.replaced_by) for w in runtime.withdrawals[1:]] == [(entry.variant_id, None)]
    finally:
        runtime.close(timeout=0.5)  # no stream here: the last window has nowhere to go


async def test_a_restarted_workload_serves_the_deployed_variant_from_its_first_call(nats_url, js, tmp_path):
    """The registry is the tuning cache that outlives the process: nothing is tuned again."""
    kv = await js.create_key_value(KeyValueConfig(bucket=subjects.REGISTRY_BUCKET, history=subjects.REGISTRY_HISTORY))
    entry = entry_for({"BLOCK": 256, "ROWS": 2, "num_warps": 2})
    await kv.put(KEY, entry.model_dump_json().encode())
    runtime = observe(nats_url, hardware=HW, window_s=0.5, state_dir=tmp_path)  # a fresh process's start
    try:
        assert runtime.serving("rmsnorm", "float16", "h256-r16") == entry.variant_id, "not loaded before observe returned"
        x, w = rmsnorm.make_inputs([4, 256], torch.float16, DEVICE, seed=1)
        y = ops.rmsnorm(x, w)  # the first call
        ref = rmsnorm.reference(x, w).float()
        assert (y.float() - ref).norm() / ref.norm() <= rmsnorm.TOLERANCE["float16"]
    finally:
        runtime.close(timeout=0.5)


async def test_entry_whose_source_does_not_match_its_id_is_refused(nats_url, js, tmp_path):
    runtime = observe(nats_url, hardware=HW, window_s=0.5, state_dir=tmp_path)
    try:
        assert await wait_for(runtime.registry_synced.is_set, 10)  # the runtime created the bucket
        kv = await js.key_value(subjects.REGISTRY_BUCKET)
        good = entry_for({"BLOCK": 128, "ROWS": 1, "num_warps": 1})
        tampered = good.model_copy(update={"source": good.source.replace("1.0 / tl.sqrt", "1.01 / tl.sqrt")})
        await kv.put(KEY, tampered.model_dump_json().encode())
        await kv.put(OTHER_KEY, good.model_dump_json().encode())  # applied in order, after the tampered one
        assert await wait_for(lambda: runtime.serving("rmsnorm", "float16", "h128-r16") == good.variant_id, 10)
        assert runtime.serving("rmsnorm", "float16", "h256-r16") is None
        assert [k for k, _ in runtime.refused] == [KEY] and "hashes to" in runtime.refused[0][1]
        assert [d.key for d in runtime.deploys] == [OTHER_KEY]
    finally:
        runtime.close()


async def test_service_turns_a_profiler_trace_into_kernel_stats_once(nats_url, js, tmp_path):
    x, w = rmsnorm.make_inputs([4, 256], torch.float16, "cpu", seed=2)
    ops.rmsnorm(x, w)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):
            ops.rmsnorm(x, w)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    event = ProfilerTrace(source="host:9", hardware=HW, trace=json.loads((tmp_path / "trace.json").read_text()))
    app = build_app(Settings(NATS_URL=nats_url))
    async with app.broker:
        await app.broker.start()
        # the second copy stands for a redelivery: the service handles the same trace twice
        for msg_id in (event.event_id, "redelivered"):
            await js.publish(subjects.PROFILER_TRACE, event.model_dump_json().encode(), headers={"Nats-Msg-Id": msg_id})
        bad = ProfilerTrace(source="host:9", hardware=HW, trace={"not": "a trace"})
        await js.publish(subjects.PROFILER_TRACE, bad.model_dump_json().encode(), headers={"Nats-Msg-Id": bad.event_id})
        # all three are acked, the bad one too: nothing is redelivered
        assert await wait_for_async(js, lambda info: info.ack_floor.consumer_seq == 3 and not info.num_ack_pending)
        msgs = await receive_stats(js, calls=2, timeout=3.0)
        (stats,) = [KernelStats.model_validate_json(m.data) for m in msgs]
        assert str(stats.key) == KEY and stats.calls == 2 and stats.source == "host:9"
        info = await js.stream_info(subjects.STREAM_NAME, subjects_filter=subjects.KERNEL_STATS)
        assert info.state.subjects == {subjects.KERNEL_STATS: 1}, "the redelivered trace published stats again"


async def wait_for_async(js, check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await js.consumer_info(subjects.STREAM_NAME, subjects.DURABLE[subjects.PROFILER_TRACE])
        if check(info):
            return True
        await asyncio.sleep(0.1)
    return False


def test_workload_runs_on_and_closes_promptly_without_a_server(tmp_path, caplog):
    from shared.nats_server import free_port

    runtime = observe(f"nats://127.0.0.1:{free_port()}", hardware=HW, window_s=0.2, state_dir=tmp_path)
    x, w = rmsnorm.make_inputs([4, 256], torch.float16, DEVICE, seed=3)
    started = time.monotonic()
    for _ in range(5):
        ops.rmsnorm(x, w)
        time.sleep(0.1)
    closing = time.monotonic()
    runtime.close()
    assert time.monotonic() - closing < 3, "close() must not wait for a server that is not there"
    assert time.monotonic() - started < 10
    assert "unpublished windows at close" in caplog.text
    assert "registry did not answer" in caplog.text, "a workload without NATS says it serves the fallbacks"


async def test_windows_from_before_the_server_started_arrive_once_it_is_up(tmp_path):
    from shared import nats_server

    port = nats_server.free_port()
    runtime = observe(f"nats://127.0.0.1:{port}", hardware=HW, window_s=0.3, state_dir=tmp_path / "state")
    server = None
    try:
        x, w = rmsnorm.make_inputs([4, 256], torch.float16, DEVICE, seed=4)
        for _ in range(3):
            ops.rmsnorm(x, w)
        await asyncio.sleep(1.0)
        server = nats_server.start(tmp_path / "nats", port=port)
        broker = await declare_stream(server.url)
        nc = await nats.connect(server.url)
        msgs = await receive_stats(nc.jetstream(), calls=3)
        assert sum(KernelStats.model_validate_json(m.data).calls for m in msgs) == 3
        await nc.close()
        await broker.stop()
    finally:
        runtime.close()
        if server:
            server.stop()


def test_demo_runs_until_the_shifted_shape_is_served_by_its_deploy(nats_url, tmp_path):
    shapes = ([2, 128], [4, 256])  # the demo makes its inputs on the machine's device
    entry = entry_for({"BLOCK": 256, "ROWS": 4, "num_warps": 2})

    async def deploy():
        nc = await nats.connect(nats_url)
        kv = await nc.jetstream().create_key_value(
            KeyValueConfig(bucket=subjects.REGISTRY_BUCKET, history=subjects.REGISTRY_HISTORY))
        await kv.put(KEY, entry.model_dump_json().encode())
        await nc.close()

    async def with_stream(work):
        broker = await declare_stream(nats_url)
        try:
            return await asyncio.to_thread(work)
        finally:
            await broker.stop()

    lines = []
    # the loop deploys a kernel for the second shape while the demo already runs it on the fallback
    timer = threading.Timer(1.0, lambda: asyncio.run(deploy()))

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("phase 2"):
            timer.start()

    runtime = observe(nats_url, hardware=HW, window_s=0.3, sample_every=2, state_dir=tmp_path)
    try:
        started = time.monotonic()
        summary = asyncio.run(with_stream(lambda: run_demo(runtime, phase_s=1.0, shapes=shapes, deadline_s=30,
                                                           calls_per_window=5, echo=echo)))
        elapsed = time.monotonic() - started
    finally:
        if timer.is_alive():
            timer.join()
        runtime.close()
    print("\n".join(lines))
    assert elapsed < 20, "phase 2 must end once the deploy has served two windows, not at the deadline"
    first, second = summary["keys"]
    assert first["key"] == f"{HW}.rmsnorm.float16.h128-r16" and first["variant_id"] is None
    assert first["calls"] > 0 and first["before_us_per_call"] > 0 and first["after_us_per_call"] is None
    assert second["key"] == KEY and second["variant_id"] == entry.variant_id
    assert (second["speedup"], second["trace_id"], second["campaign_id"]) == (1.25, entry.trace_id, "camp-7")
    assert second["before_us_per_call"] > 0 and second["after_us_per_call"] > 0
    assert sum(f"served by {entry.variant_id}" in line for line in lines) >= 2
    table = format_summary(summary)
    assert KEY in table and entry.variant_id in table
    assert ("Triton interpreter" in table) == hardware.interpreted()


async def test_hot_swap_keeps_working_after_the_server_restarts(tmp_path):
    from shared import nats_server

    port = nats_server.free_port()
    server = nats_server.start(tmp_path / "nats", port=port)
    runtime = observe(server.url, hardware=HW, window_s=0.5, state_dir=tmp_path / "state")
    try:
        assert await wait_for(runtime.registry_synced.is_set, 10)
        server.stop()
        server = nats_server.start(tmp_path / "nats", port=port)  # same data: the bucket survives
        nc = await nats.connect(server.url)
        kv = await nc.jetstream().key_value(subjects.REGISTRY_BUCKET)
        entry = entry_for({"BLOCK": 512, "ROWS": 1, "num_warps": 4})
        await kv.put(KEY, entry.model_dump_json().encode())
        await nc.close()
        # the watch from before the restart is gone; the runtime must have watched again
        assert await wait_for(lambda: runtime.serving("rmsnorm", "float16", "h256-r16") == entry.variant_id, 15)
    finally:
        runtime.close(timeout=0.5)
        server.stop()
