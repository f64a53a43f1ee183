"""The generator service in-process against a real nats-server: a hypothesis becomes a round of
variants on variant.ready, a refine the next round, and a repeated hypothesis adds nothing."""
import asyncio
import time

import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from generator.app import build_app
from shared import subjects, variants
from shared.schemas import Budget, Campaign, DeadLetter, Hypothesis, KernelKey, Refine, Scored, VariantReady, WeightedShape
from shared.settings import Settings

pytestmark = pytest.mark.nats

PER_ROUND = 4


def hypothesis(op="rmsnorm", campaign_id="camp-1") -> Hypothesis:
    key = KernelKey(hardware="cpu-interpreter", op=op, dtype="float16", bucket="h4096-r16")
    campaign = Campaign(campaign_id=campaign_id, key=key, profile=[WeightedShape(shape=[16, 4096], weight=1.0)],
                        budget=Budget(rounds=2, variants_per_round=PER_ROUND))
    return Hypothesis(campaign=campaign, reason="manual")


async def send(js, subject, event, headers=None):
    headers = {"Nats-Msg-Id": event.event_id, **(headers or {})}
    return await js.publish(subject, event.model_dump_json().encode(), headers=headers)


async def subject_count(js, subject) -> int:
    info = await js.stream_info(subjects.STREAM_NAME, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def wait_handled(js, subject, seq, timeout=15.0):
    """Until the generator's durable consumer has acked the message at stream sequence seq."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await js.consumer_info(subjects.STREAM_NAME, subjects.DURABLE[subject])
        if info.ack_floor.stream_seq >= seq and not info.num_ack_pending:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the generator did not ack {subject} #{seq} within {timeout} s")


async def receive(sub, count, timeout=15.0) -> list[VariantReady]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        try:
            msgs = await sub.fetch(count - len(got), timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        for m in msgs:
            await m.ack()
            got.append(VariantReady.model_validate_json(m.data))
    return got


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
async def generator(nats_url, spans):
    app = build_app(Settings(NATS_URL=nats_url), tracer_provider=spans[0])
    async with app.broker:
        await app.broker.start()  # declares the stream and the durable consumers
        nc = await nats.connect(nats_url)
        try:
            yield nc.jetstream()
        finally:
            await nc.close()


async def test_hypothesis_yields_one_round_of_variants_and_a_repeat_adds_none(generator):
    js = generator
    reader = await js.pull_subscribe(subjects.VARIANT_READY, durable="test-reader", stream=subjects.STREAM_NAME)
    event = hypothesis()
    ack = await send(js, subjects.HYPOTHESIS, event)
    got = await receive(reader, PER_ROUND)
    assert len(got) == PER_ROUND
    assert len({v.variant_id for v in got}) == PER_ROUND
    for v in got:
        assert v.campaign.campaign_id == "camp-1"
        assert (v.round, v.round_size, v.strategy) == (0, PER_ROUND, "grid")
        assert v.variant_id == variants.variant_id(v.source, v.params)
    await wait_handled(js, subjects.HYPOTHESIS, ack.seq)
    total = (await js.stream_info(subjects.STREAM_NAME)).state.messages

    again = await send(js, subjects.HYPOTHESIS, event)  # a retry with the same event id
    assert again.duplicate
    await asyncio.sleep(1.0)
    assert (await js.stream_info(subjects.STREAM_NAME)).state.messages == total

    # the detector re-sends the same campaign under a new event id: the variants' ids repeat,
    # so JetStream drops them and the benchmarker sees each variant once
    resent = await send(js, subjects.HYPOTHESIS, event.model_copy(update={"event_id": "another-id"}))
    assert not resent.duplicate
    await wait_handled(js, subjects.HYPOTHESIS, resent.seq)
    assert await subject_count(js, subjects.VARIANT_READY) == PER_ROUND


async def test_refine_yields_the_next_round_around_the_best(generator):
    js = generator
    reader = await js.pull_subscribe(subjects.VARIANT_READY, durable="test-reader", stream=subjects.STREAM_NAME)
    await send(js, subjects.HYPOTHESIS, hypothesis())
    round0 = await receive(reader, PER_ROUND)
    best = round0[0]
    refine = Refine(campaign=best.campaign, round=1, rounds_left=1, tried=[v.variant_id for v in round0],
                    best=[Scored(variant_id=best.variant_id, params=best.params,
                                 weighted_speedup=1.4, speedup_ci_low=1.3)])
    await send(js, subjects.REFINE, refine)
    round1 = await receive(reader, PER_ROUND)
    assert len(round1) == PER_ROUND
    assert all(v.round == 1 and v.strategy == "local" for v in round1)
    assert not {v.variant_id for v in round1} & set(refine.tried)
    assert any(v.parents == [best.variant_id] for v in round1)


async def test_unknown_op_is_dead_lettered_naming_the_field_without_variants(generator):
    js = generator
    bad = hypothesis(op="nosuchop")
    ack = await send(js, subjects.HYPOTHESIS, bad)
    await wait_handled(js, subjects.HYPOTHESIS, ack.seq)
    assert await subject_count(js, subjects.VARIANT_READY) == 0
    dead = await js.pull_subscribe(f"{subjects.DEAD_LETTER_PREFIX}.{subjects.HYPOTHESIS}", stream=subjects.STREAM_NAME)
    (msg,) = await dead.fetch(5, timeout=10)
    letter = DeadLetter.model_validate_json(msg.data)
    assert letter.original_event_id == bad.event_id and "campaign.key.op" in letter.reason and "nosuchop" in letter.reason


async def test_generate_span_joins_the_campaign_trace(generator, spans):
    js, (_, exporter) = generator, spans
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    ack = await send(js, subjects.HYPOTHESIS, hypothesis(),
                     headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    await wait_handled(js, subjects.HYPOTHESIS, ack.seq)
    [span] = [s for s in exporter.get_finished_spans() if s.name == "generate"]
    assert f"{span.context.trace_id:032x}" == trace_id
    assert span.attributes["campaign_id"] == "camp-1"
    assert span.attributes["kernel_key"] == "cpu-interpreter.rmsnorm.float16.h4096-r16"
    assert (span.attributes["op"], span.attributes["round"], span.attributes["variants"]) == ("rmsnorm", 0, PER_ROUND)
