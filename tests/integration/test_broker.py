"""The shared broker plumbing against a real nats-server: durable pull consumer, de-duplication."""
import asyncio

import pytest

from shared import subjects
from shared.broker import durable_subscriber, make_broker, publish
from shared.schemas import KernelKey, UsageChanged

pytestmark = pytest.mark.nats


async def test_republished_event_is_delivered_once(nats_url):
    broker, _ = make_broker(nats_url)
    got: asyncio.Queue = asyncio.Queue()

    @durable_subscriber(broker, subjects.USAGE_CHANGED)
    async def on_usage_changed(event: UsageChanged) -> None:
        await got.put(event)

    async with broker:
        await broker.start()
        key = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float16", bucket="h4096-r16")
        event = UsageChanged(key=key, reason="manual")
        await publish(broker, subjects.USAGE_CHANGED, event)
        await publish(broker, subjects.USAGE_CHANGED, event)  # a retry after a lost ack
        first = await asyncio.wait_for(got.get(), 10)
        assert first.event_id == event.event_id
        await asyncio.sleep(1.0)
        assert got.empty(), "the re-published event was delivered a second time"


async def test_a_batch_is_handled_in_order_and_a_bad_message_fails_alone(nats_url):
    from datetime import datetime, timezone

    import nats
    from faststream import Context
    from faststream.nats.message import NatsBatchMessage

    from shared.broker import batch_subscriber, handle_each
    from shared.schemas import DeadLetter, KernelStats

    broker, _ = make_broker(nats_url)
    seen, failed_once = [], set()
    done = asyncio.Event()

    async def handle(stats: KernelStats, raw) -> None:
        if stats.source == "flaky" and stats.source not in failed_once:
            failed_once.add(stats.source)
            raise RuntimeError("the registry did not answer")
        seen.append(stats.source)
        if len(seen) == 20:
            done.set()

    @batch_subscriber(broker, subjects.KERNEL_STATS, wait_s=0.5)
    async def on_stats(body: list[bytes], msg: NatsBatchMessage = Context("message")) -> None:
        await handle_each(broker, KernelStats, msg.raw_message, handle)

    key = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float16", bucket="h4096-r16")

    def window(source: str) -> bytes:
        return KernelStats(key=key, source=source, window_start=datetime.now(timezone.utc), window_s=1.0,
                           calls=1, sampled_calls=1, sampled_time_us=1.0).model_dump_json().encode()

    nc = await nats.connect(nats_url)
    async with broker:
        await broker.start()
        js = nc.jetstream()
        for i in range(10):
            await js.publish(subjects.KERNEL_STATS, window(f"p{i:02d}"))
        await js.publish(subjects.KERNEL_STATS, b"\x00\xffjunk", headers={"content-type": "application/json"})
        await js.publish(subjects.KERNEL_STATS, window("flaky"))
        for i in range(10, 19):
            await js.publish(subjects.KERNEL_STATS, window(f"p{i:02d}"))
        await asyncio.wait_for(done.wait(), 30)  # the flaky one comes back after its back-off
    dead = await js.pull_subscribe(f"{subjects.DEAD_LETTER_PREFIX}.{subjects.KERNEL_STATS}", stream=subjects.STREAM_NAME)
    (letter,) = [DeadLetter.model_validate_json(m.data) for m in await dead.fetch(5, timeout=5)]
    await nc.close()
    assert seen == [f"p{i:02d}" for i in range(19)] + ["flaky"], "in stream order; the retried one last"
    assert letter.subject == subjects.KERNEL_STATS and "invalid" in letter.reason
