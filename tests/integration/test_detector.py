"""The detector service over a real nats-server: stats in, one campaign out, in one trace; manual
events, registry incumbents, refused events and redeliveries."""
import asyncio
import json
from datetime import datetime, timedelta, timezone

import nats
import pytest
from nats.js.api import KeyValueConfig
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from detector.app import build_app
from detector.lookups import served
from shared import subjects
from shared.registry import Registry
from shared.schemas import (DeadLetter, Hardware, Hypothesis, KernelKey, KernelStats, RegistryEntry, ShapeCount,
                            UsageChanged, UsageSnapshot, WeightedShape)
from shared.settings import Settings

pytestmark = pytest.mark.nats

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
DECODE = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float16", bucket="h512-r16")
PREFILL = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float16", bucket="h512-r4k")


def stats(key: KernelKey, slot: int, calls: int, us: float, shape: list[int], variant_id=None) -> KernelStats:
    return KernelStats(key=key, source="host:7", window_start=T0 + timedelta(seconds=5 * slot), window_s=5.0,
                       calls=calls, shapes=[ShapeCount(shape=shape, calls=calls)], sampled_calls=calls // 8,
                       sampled_time_us=calls // 8 * us, variant_id=variant_id)


async def publish_raw(js, subject: str, event) -> None:
    """As any NATS client would: JSON body, event id as Nats-Msg-Id, no trace context."""
    await js.publish(subject, event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id})


def trace_id(msg) -> str:
    return msg.headers["traceparent"].split("-")[1]  # 00-<trace id>-<span id>-<flags>


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def detector_app(nats_url, exporter):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(NATS_URL=nats_url, KERNELLOOP_WINDOW_S=5.0, KERNELLOOP_CONFIRM_WINDOWS=2,
                        KERNELLOOP_MIN_TIME_SHARE=0.1, KERNELLOOP_ROUNDS=2, KERNELLOOP_VARIANTS_PER_ROUND=3)
    app = build_app(settings, provider)
    async with app.broker:
        await app.broker.start()
        yield app


@pytest.fixture
async def js(nats_url, detector_app):
    nc = await nats.connect(nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def test_new_bucket_in_stats_starts_a_campaign_rooted_in_one_trace(js, exporter):
    changed = await js.pull_subscribe(subjects.USAGE_CHANGED, stream=subjects.STREAM_NAME)
    hypotheses = await js.pull_subscribe(subjects.HYPOTHESIS, stream=subjects.STREAM_NAME)
    for slot in range(8):
        await publish_raw(js, subjects.KERNEL_STATS, stats(DECODE, slot, 800, 20.0, [8, 512], variant_id="v-decode"))
        if slot >= 4:  # prefill arrives and takes half of the op's time
            await publish_raw(js, subjects.KERNEL_STATS, stats(PREFILL, slot, 40, 400.0, [2048, 512]))

    (usage_msg,) = await changed.fetch(1, timeout=20)
    (hypothesis_msg,) = await hypotheses.fetch(1, timeout=20)
    usage = UsageChanged.model_validate_json(usage_msg.data)
    hypothesis = Hypothesis.model_validate_json(hypothesis_msg.data)

    assert usage.key == PREFILL and usage.reason == "new_shape"
    assert hypothesis.event_id == f"hypothesis-{usage.event_id}"
    assert hypothesis.campaign.key == PREFILL
    assert [(w.shape, w.weight) for w in hypothesis.campaign.profile] == [([2048, 512], 1.0)]
    assert hypothesis.campaign.incumbent.variant_id is None  # nothing deployed: the op's fallback
    assert (hypothesis.campaign.budget.rounds, hypothesis.campaign.budget.variants_per_round) == (2, 3)
    assert hypothesis.expected_gain == pytest.approx(0.5)

    assert trace_id(hypothesis_msg) == trace_id(usage_msg)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    detect, hypothesise = spans["detect"], spans["hypothesise"]
    assert detect.parent is None, "the campaign's trace must be rooted at detection"
    assert f"{detect.context.trace_id:032x}" == trace_id(usage_msg)
    assert detect.links, "the detect span links the stats window that tipped it"
    assert hypothesise.context.trace_id == detect.context.trace_id
    assert hypothesise.attributes["campaign_id"] == hypothesis.campaign.campaign_id
    with pytest.raises(nats.errors.TimeoutError):
        await changed.fetch(1, timeout=1)  # one change, one event


async def test_manual_event_gets_example_shapes_and_the_registry_incumbent(js):
    kv = await js.create_key_value(KeyValueConfig(bucket=subjects.REGISTRY_BUCKET, history=subjects.REGISTRY_HISTORY))
    entry = RegistryEntry(variant_id="v-prefill", source="source text", params={"BLOCK": 512, "ROWS": 4},
                          speedup=1.2, campaign_id="earlier", approved_by="gate")
    await kv.put(str(PREFILL), entry.model_dump_json().encode())
    hypotheses = await js.pull_subscribe(subjects.HYPOTHESIS, stream=subjects.STREAM_NAME)

    await publish_raw(js, subjects.USAGE_CHANGED, UsageChanged(key=PREFILL, reason="manual", detail="by hand"))
    (msg,) = await hypotheses.fetch(1, timeout=20)
    hypothesis = Hypothesis.model_validate_json(msg.data)
    assert hypothesis.reason == "manual"
    assert [(w.shape, w.weight) for w in hypothesis.campaign.profile] == [([4096, 512], 1.0)]
    assert hypothesis.campaign.incumbent.variant_id == "v-prefill"
    assert hypothesis.campaign.incumbent.params == {"BLOCK": 512, "ROWS": 4}


async def test_a_deleted_or_unreadable_registry_entry_leaves_the_key_unserved(js):
    kv = await js.create_key_value(KeyValueConfig(bucket=subjects.REGISTRY_BUCKET, history=subjects.REGISTRY_HISTORY))
    registry = Registry(kv)
    entry = RegistryEntry(variant_id="v-prefill", source="source text", speedup=1.2, campaign_id="earlier",
                          approved_by="gate")
    await kv.put(str(PREFILL), entry.model_dump_json().encode())
    assert (await served(registry, PREFILL)).variant_id == "v-prefill"
    await kv.delete(str(PREFILL))
    assert await registry.read(PREFILL) is None  # nats-py's get() turns a delete marker into KeyNotFoundError
    assert await served(registry, PREFILL) is None
    await kv.put(str(PREFILL), entry.model_dump_json().encode())
    await kv.purge(str(PREFILL))
    assert await served(registry, PREFILL) is None

    # an entry the detector cannot read: logged, and the campaign starts from the op's fallback
    await kv.put(str(PREFILL), b'{"variant_id": "v-prefill"}')
    assert await served(registry, PREFILL) is None
    hypotheses = await js.pull_subscribe(subjects.HYPOTHESIS, stream=subjects.STREAM_NAME)
    await publish_raw(js, subjects.USAGE_CHANGED, UsageChanged(key=PREFILL, reason="manual"))
    (msg,) = await hypotheses.fetch(1, timeout=20)
    assert Hypothesis.model_validate_json(msg.data).campaign.incumbent.variant_id is None


async def test_the_roofline_is_what_a_benchmarker_measured_on_the_card(js):
    from benchmarker.app import record_peaks

    kv = await js.create_key_value(KeyValueConfig(bucket=subjects.HARDWARE_BUCKET, history=subjects.HARDWARE_HISTORY))
    cpu = Hardware(key="cpu-interpreter", name="CPU (Triton interpreter)", interpreter=True, torch="2", triton="3")
    assert not await record_peaks(kv, cpu), "the interpreter measures no peaks"
    card = Hardware(key="nvidia-h100-80gb-hbm3", name="NVIDIA H100 80GB HBM3", interpreter=False, torch="2.11",
                    triton="3.6", device_id="GPU-1", copy_gbps=2000.0, matmul_tflops=700.0)
    assert await record_peaks(kv, card)
    hypotheses = await js.pull_subscribe(subjects.HYPOTHESIS, stream=subjects.STREAM_NAME)

    key = KernelKey(hardware=card.key, op="rmsnorm", dtype="bfloat16", bucket="h4096-r4k")
    bytes_moved = (2 * 4096 * 4096 + 4096) * 2
    at_roofline_us = bytes_moved / 2000e9 * 1e6  # at the measured 2.0 TB/s, not the datasheet's 3.35
    await publish_raw(js, subjects.USAGE_CHANGED, UsageChanged(
        key=key, reason="manual", after=UsageSnapshot(windows=2, calls=100, time_share=0.5,
                                                      time_us_per_call=4 * at_roofline_us)))
    (msg,) = await hypotheses.fetch(1, timeout=20)
    hypothesis = Hypothesis.model_validate_json(msg.data)
    assert hypothesis.efficiency == pytest.approx(0.25)
    assert "peaks measured by a benchmarker" in hypothesis.detail and "2.00 TB/s" in hypothesis.detail


async def test_unknown_op_is_dead_lettered_naming_the_field_and_the_stage_keeps_serving(js, nats_url):
    hypotheses = await js.pull_subscribe(subjects.HYPOTHESIS, stream=subjects.STREAM_NAME)
    bad = UsageChanged(key=PREFILL.model_copy(update={"op": "gelu"}), reason="manual")
    good = UsageChanged(key=PREFILL, reason="manual", profile=[WeightedShape(shape=[300, 512], weight=1.0)])
    await publish_raw(js, subjects.USAGE_CHANGED, bad)
    await publish_raw(js, subjects.USAGE_CHANGED, good)

    (msg,) = await hypotheses.fetch(1, timeout=20)
    assert Hypothesis.model_validate_json(msg.data).event_id == f"hypothesis-{good.event_id}"
    # the good event's ack follows its hypothesis' publish: give it a moment under load
    for _ in range(50):
        consumer = await js.consumer_info(subjects.STREAM_NAME, subjects.DURABLE[subjects.USAGE_CHANGED])
        if consumer.num_ack_pending == 0:
            break
        await asyncio.sleep(0.1)
    assert consumer.num_ack_pending == 0 and consumer.num_redelivered == 0, "the refused event must be acked"
    dead = await js.pull_subscribe(f"{subjects.DEAD_LETTER_PREFIX}.{subjects.USAGE_CHANGED}", stream=subjects.STREAM_NAME)
    (letter,) = [DeadLetter.model_validate_json(m.data) for m in await dead.fetch(5, timeout=10)]
    assert letter.original_event_id == bad.event_id and "key.op 'gelu'" in letter.reason


async def test_redelivered_usage_changed_does_not_start_a_second_campaign(js):
    hypotheses = await js.pull_subscribe(subjects.HYPOTHESIS, stream=subjects.STREAM_NAME)
    event = UsageChanged(key=PREFILL, reason="manual")
    body = event.model_dump_json().encode()
    # the same event twice past the stream's own de-duplication, as a redelivery would hand it over
    await js.publish(subjects.USAGE_CHANGED, body, headers={"Nats-Msg-Id": "first-delivery"})
    await js.publish(subjects.USAGE_CHANGED, body, headers={"Nats-Msg-Id": "second-delivery"})

    (msg,) = await hypotheses.fetch(1, timeout=20)
    assert json.loads(msg.data)["event_id"] == f"hypothesis-{event.event_id}"
    with pytest.raises(nats.errors.TimeoutError):
        await hypotheses.fetch(1, timeout=3)
