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
