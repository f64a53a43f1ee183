"""The benchmark queue as the deployer sees it: how many variants wait for a benchmarker, and how
long the oldest has waited. Reported as metrics; a growing lag says the loop needs another GPU."""
import asyncio
import logging
from datetime import datetime, timezone

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from shared import subjects
from shared.schemas import VariantReady
from shared.telemetry import LoopMetrics

log = logging.getLogger("kernelloop.deployer")


async def benchmark_queue(js: JetStreamContext) -> tuple[int, float]:
    """(variants not yet taken by any benchmarker, seconds the oldest of them has waited)."""
    info = await js.consumer_info(subjects.STREAM_NAME, subjects.DURABLE[subjects.VARIANT_READY])
    waiting = info.num_pending or 0
    if not waiting:
        return 0, 0.0
    oldest = await js.get_msg(subjects.STREAM_NAME, seq=info.delivered.stream_seq + 1, subject=subjects.VARIANT_READY,
                              next=True)
    sent = VariantReady.model_validate_json(oldest.data).time
    return waiting, max((datetime.now(timezone.utc) - sent).total_seconds(), 0.0)


async def watch_benchmark_queue(js: JetStreamContext, metrics: LoopMetrics, interval_s: float = 5.0) -> None:
    while True:
        try:
            waiting, lag_s = await benchmark_queue(js)
            metrics.queue.set(waiting)
            metrics.queue_lag.set(lag_s)
        except (nats.errors.Error, nats.js.errors.Error, ValueError) as e:
            log.debug("benchmark queue not measured: %s", e)  # no consumer yet, or a foreign message
        await asyncio.sleep(interval_s)
