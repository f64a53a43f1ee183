"""A restarted detector rebuilds its state from the stream: the kernel.stats of the last few minutes
are fed to a fresh ChangeDetector before it judges anything new.

Replay over a KV snapshot: the stream already holds every window (it is the source of truth, kept
for days), a replay needs no write path that can fall behind or disagree with it, and it rebuilds
the tests' levels and noise, not just totals. Events the replay raises are dropped: they went out
when those windows were first judged (with the same event ids, so JetStream would drop a copy).
"""
import asyncio
from datetime import datetime
from typing import NamedTuple

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from detector.change import ChangeDetector
from shared import subjects
from shared.schemas import KernelStats

BATCH = 512


class Replayed(NamedTuple):
    windows: int  # fed to the detector
    last_seq: int  # stream sequence of the last message read (0: none)


async def replay(js: JetStreamContext, detector: ChangeDetector, since: datetime, before_seq: int | None = None,
                 timeout_s: float = 2.0) -> Replayed:
    """Feed the detector every kernel.stats stored at or after `since` and (when given) before
    stream sequence `before_seq`."""
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since.isoformat(),
                            ack_policy=AckPolicy.NONE, inactive_threshold=30.0)
    sub = await js.pull_subscribe(subjects.KERNEL_STATS, stream=subjects.STREAM_NAME, config=config)
    fed = last = 0
    try:
        if (await sub.consumer_info()).num_pending == 0:
            return Replayed(0, 0)  # nothing stored since: no fetch to wait out
        while True:
            try:
                msgs = await sub.fetch(BATCH, timeout=timeout_s)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):  # nats-py raises either
                return Replayed(fed, last)  # nothing left
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if before_seq is not None and seq >= before_seq:
                    return Replayed(fed, last)
                last = seq
                try:
                    stats = KernelStats.model_validate_json(msg.data)
                except ValidationError:
                    continue  # the live consumer dead-lettered it when it first came
                detector.observe(stats)
                fed += 1
            if msgs and msgs[-1].metadata.num_pending == 0:
                return Replayed(fed, last)
    finally:
        await sub.unsubscribe()
