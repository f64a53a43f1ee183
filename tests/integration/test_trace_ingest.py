"""Profiler traces into the observer service over a real nats-server: a model's trace sent with
`kernelloop observe trace` (inline, or through the object-store inbox when it is over the server's
max payload), dropped into the watched folder, or put into the object store by any client becomes
kernel.stats with the model's shapes and counts; `kernelloop status` lists the mapped and the hot
unmapped ops; junk files are refused with their reason and the service keeps serving."""
import asyncio
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
from faststream import TestApp

from observer.app import build_app
from shared import subjects
from shared.schemas import Hypothesis, KernelStats, ProfilerTrace, TraceSummary
from shared.settings import Settings
from support.profiled_model import profile_block

pytestmark = pytest.mark.nats

ROOT = Path(__file__).resolve().parents[2]
HW = "cpu-interpreter"
CALLS_PER_STEP = 7  # rmsnorm, gate, up, down, silu_and_mul, softmax, layernorm
MAPPED_OPS = {"matmul", "rmsnorm", "silu_and_mul", "softmax", "layernorm"}


def cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernelloop", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
async def js(nats_url):
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


@pytest.fixture
async def observer(nats_url, tmp_path):
    """The observer service in this process, its whole lifecycle (so the inbox pollers run)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    settings = Settings(NATS_URL=nats_url, KERNELLOOP_TRACE_DIR=str(inbox), KERNELLOOP_TRACE_POLL_S=0.2,
                        KERNELLOOP_TRACE_MAX_MB=8, KERNELLOOP_STATE_DIR=str(tmp_path / "state"))
    async with TestApp(build_app(settings)):
        yield settings


def _env(settings: Settings) -> dict:
    return {**os.environ, "NATS_URL": settings.nats_url, "KERNELLOOP_STATE_DIR": str(settings.state_dir)}


async def stats_until(js, calls: int, timeout: float = 30.0) -> list[KernelStats]:
    """kernel.stats from the stream until they hold this many calls (or the time is up)."""
    sub = await js.subscribe(subjects.KERNEL_STATS, stream=subjects.STREAM_NAME, ordered_consumer=True)
    got, deadline = [], time.monotonic() + timeout
    try:
        while sum(s.calls for s in got) < calls and time.monotonic() < deadline:
            try:
                got.append(KernelStats.model_validate_json((await sub.next_msg(timeout=0.5)).data))
            except nats.errors.TimeoutError:
                continue
    finally:
        await sub.unsubscribe()
    return got


async def summaries(js) -> dict[str, TraceSummary]:
    try:
        kv = await js.key_value(subjects.TRACE_SUMMARY_BUCKET)
        keys = await kv.keys()
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NoKeysError):
        return {}
    return {k: TraceSummary.model_validate_json((await kv.get(k)).value) for k in keys}


async def eventually(check, timeout: float = 30.0):
    """check's first truthy answer (check may be a coroutine function), or None after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found := (await found if asyncio.iscoroutine(found) else found):
            return found
        await asyncio.sleep(0.2)
    return None


def _by_op(stats: list[KernelStats]) -> dict[str, int]:
    calls: dict[str, int] = {}
    for s in stats:
        calls[s.key.op] = calls.get(s.key.op, 0) + s.calls
    return calls


async def test_cli_sends_a_model_trace_and_status_lists_mapped_and_unmapped_hot_ops(observer, js, tmp_path):
    profile_block(tmp_path / "run.json", steps=3)
    sent = await asyncio.to_thread(cli, "observe", "trace", str(tmp_path / "run.json"), "--source", "llama:1",
                                   "--json", env=_env(observer))
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["via"] == "event"

    stats = await stats_until(js, calls=3 * CALLS_PER_STEP)
    assert _by_op(stats) == {"matmul": 9, "rmsnorm": 3, "silu_and_mul": 3, "softmax": 3, "layernorm": 3}
    assert {s.source for s in stats} == {"llama:1"} and all(s.key.hardware == HW for s in stats)
    assert await eventually(lambda: summaries(js))

    status = await asyncio.to_thread(cli, "status", "--json", env=_env(observer))
    assert status.returncode == 0, status.stderr
    (trace,) = json.loads(status.stdout)["traces"]
    assert trace["source"] == "llama:1" and trace["status"] == "ok"
    assert {m["key"]["op"] for m in trace["mapped"]} == MAPPED_OPS
    sort = next(u for u in trace["unmapped"] if u["name"] == "aten::sort")
    assert sort["calls"] == 3 and sort["time_us"] > 0 and 0 < sort["share"] < 1

    text = await asyncio.to_thread(cli, "status", env=_env(observer))
    print(text.stdout)
    assert "unmapped  aten::sort" in text.stdout and "mapped    matmul.bfloat16.n96-k64-m16" in text.stdout
    assert "<- HF RMSNorm pattern" in text.stdout


async def test_a_trace_over_the_max_payload_goes_through_the_object_store_inbox(observer, js, tmp_path):
    steps = 40
    profile_block(tmp_path / "long.json", steps=steps)
    sent = await asyncio.to_thread(cli, "observe", "trace", str(tmp_path / "long.json"), "--json", env=_env(observer))
    assert sent.returncode == 0, sent.stderr
    out = json.loads(sent.stdout)
    assert out["via"] == "object" and out["bucket"] == subjects.TRACE_OBJECT_BUCKET

    stats = await stats_until(js, calls=steps * CALLS_PER_STEP, timeout=60)
    assert sum(s.calls for s in stats) == steps * CALLS_PER_STEP
    assert {s.source for s in stats} == {out["source"]}
    store = await js.object_store(subjects.TRACE_OBJECT_BUCKET)

    async def emptied():
        try:
            return not await store.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return True

    assert await eventually(emptied), "an ingested object stays in the inbox"


async def test_any_clients_object_store_upload_is_ingested_and_removed(observer, js, tmp_path):
    profile_block(tmp_path / "up.json", steps=2)
    store = await js.create_object_store(subjects.TRACE_OBJECT_BUCKET)
    await store.put("uploads/run-7.json.gz", gzip.compress((tmp_path / "up.json").read_bytes()))
    stats = await stats_until(js, calls=2 * CALLS_PER_STEP)
    assert sum(s.calls for s in stats) == 2 * CALLS_PER_STEP
    assert all(s.source.endswith(":uploads/run-7.json.gz") for s in stats)


async def test_dropped_files_are_ingested_once_and_junk_is_rejected_with_its_reason(observer, js, tmp_path):
    inbox = observer.trace_dir
    good = profile_block(tmp_path / "good.json", steps=2)
    profile_block(tmp_path / "noshapes.json", steps=1, record_shapes=False)
    text = (tmp_path / "good.json").read_bytes()
    # written beside the folder, then moved in, as a watched folder expects
    for name, data in {"good.json.gz": gzip.compress(text), "noshapes.json": (tmp_path / "noshapes.json").read_bytes(),
                       "truncated.json": text[: len(text) // 2], "junk.json": bytes(range(256)) * 16,
                       "empty.json": b"{}"}.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).rename(inbox / name)

    def settled() -> bool:
        return not any(p.is_file() for p in inbox.iterdir())

    assert await eventually(settled), sorted(p.name for p in inbox.rglob("*"))
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["good.json.gz", "noshapes.json"]
    reasons = {p.name: p.read_text() for p in (inbox / "rejected").glob("*.reason")}
    assert "ends early (truncated?)" in reasons["truncated.json.reason"]
    assert "not text" in reasons["junk.json.reason"]
    assert "no traceEvents list" in reasons["empty.json.reason"]

    stats = await stats_until(js, calls=2 * CALLS_PER_STEP)
    assert sum(s.calls for s in stats) == 2 * CALLS_PER_STEP and {s.key.op for s in stats} == MAPPED_OPS
    kept = await summaries(js)
    by_status = {t.source.split(":")[-1]: t.status for t in kept.values()}
    assert by_status == {"good.json.gz": "ok", "noshapes.json": "partial", "truncated.json": "rejected",
                         "junk.json": "rejected", "empty.json": "rejected"}

    # the service still serves: an inline trace after all that junk gives its stats
    again = ProfilerTrace(source="after-junk", hardware=HW, trace=good)
    await js.publish(subjects.PROFILER_TRACE, again.model_dump_json().encode(), headers={"Nats-Msg-Id": again.event_id})
    assert await eventually(lambda: _has_source(js, "after-junk"))


async def _has_source(js, source: str) -> bool:
    return any(t.source == source and t.status == "ok" for t in (await summaries(js)).values())


async def test_model_traces_start_campaigns_for_their_mapped_ops(nats_url, js, tmp_path):
    """Observer and detector as they run in the loop, fed as a serving process profiled now and then
    would feed them: the detector judges a slot of windows when a later one arrives, so two traces
    recorded a slot apart (KERNELLOOP_WINDOW_S=1), and one confirming slot (KERNELLOOP_CONFIRM_WINDOWS=1)."""
    from detector.app import build_app as build_detector

    settings = Settings(NATS_URL=nats_url, KERNELLOOP_CONFIRM_WINDOWS=1, KERNELLOOP_WINDOW_S=1.0,
                        KERNELLOOP_TRACE_POLL_S=0.2, KERNELLOOP_STATE_DIR=str(tmp_path / "state"))
    profile_block(tmp_path / "serve-1.json", steps=3)
    time.sleep(1.5)
    profile_block(tmp_path / "serve-2.json", steps=3)
    async with TestApp(build_app(settings)), TestApp(build_detector(settings)):
        sub = await js.subscribe(subjects.HYPOTHESIS, stream=subjects.STREAM_NAME, ordered_consumer=True)
        for name in ("serve-1.json", "serve-2.json"):
            sent = await asyncio.to_thread(cli, "observe", "trace", str(tmp_path / name), "--source", "serve:1",
                                           env=_env(settings))
            assert sent.returncode == 0, sent.stderr
        campaigns, deadline = {}, time.monotonic() + 60
        while "matmul" not in campaigns and time.monotonic() < deadline:
            try:
                h = Hypothesis.model_validate_json((await sub.next_msg(timeout=0.5)).data)
                campaigns[h.campaign.key.op] = h.campaign
            except nats.errors.TimeoutError:
                continue
        await sub.unsubscribe()
    assert "matmul" in campaigns, f"no matmul campaign from the traces; got {sorted(campaigns)}"
    matmul = campaigns["matmul"]
    assert str(matmul.key) == f"{HW}.matmul.bfloat16.n96-k64-m16"  # gate and up: the hottest matmul
    assert [w.shape for w in matmul.profile] == [[10, 96, 64]]
    assert set(campaigns) <= MAPPED_OPS
