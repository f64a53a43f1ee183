"""A restarted detector rebuilds its state from the stream: the kernel.stats of the last few minutes
are fed to a fresh ChangeDetector before it judges anything new.

Replay over a KV snapshot: the stream already holds every window (it is the source of truth, kept
for days), a replay needs no write path that can fall behind or disagree with it, and it rebuilds
the tests' levels and noise, not just totals. Events the replay raises are dropped: they went out
when those windows were first judged (with the same event ids, so JetStream would drop a copy).
`Restorer` runs the replay once per process and tells the live consumer which windows it counted.
"""
import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from detector.change import ChangeDetector
from shared import subjects
from shared.schemas import KernelStats

log = logging.getLogger("kernelloop.detector")

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


def _metadata(raw):
    """A live JetStream message's metadata; None for anything else (no message, a plain one)."""
    return raw.metadata if raw is not None and getattr(raw, "reply", None) else None


class Restorer:
    """The one replay after a start, and which live windows it already counted.

    Either handler may restore first (the hypothesis stage needs the profile as much as the change
    detector needs its levels), so the replay runs under a lock, once. `feed(since, before_seq)`
    replays into the detector (`replay` above, bound to a JetStream context and the detector);
    given the first live window, it stops before that window's stream sequence, and every live
    window up to it counts as replayed."""

    def __init__(self, feed: Callable[[datetime, int | None], Awaitable[Replayed]], replay_s: float,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self.feed, self.replay_s, self.now = feed, replay_s, now
        self.up_to: int | None = None  # the stream sequence up to which windows were replayed
        self._lock = asyncio.Lock()

    async def restore(self, raw=None) -> Replayed | None:
        """Replay the last replay_s seconds of kernel.stats, up to raw (a live window's raw message)
        when given; None when it ran already."""
        async with self._lock:
            if self.up_to is not None:
                return None
            meta = _metadata(raw)
            done = await self.feed(self.now() - timedelta(seconds=self.replay_s),
                                   meta.sequence.stream if meta else None)
            self.up_to = meta.sequence.stream - 1 if meta else done.last_seq
            log.info("rebuilt the workload profile from %d kernel.stats windows of the last %.0f s",
                     done.windows, self.replay_s)
            return done

    def replayed(self, raw) -> bool:
        """Whether the restore counted this live window already."""
        meta = _metadata(raw)
        return meta is not None and self.up_to is not None and meta.sequence.stream <= self.up_to
