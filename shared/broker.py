"""make_broker(service): a NatsBroker with tracing, the one shared stream, and durable pull
subscribers that ack only after the handler's work is done."""
import asyncio

import nats.errors
from faststream import AckPolicy, BaseMiddleware, FastStream
from faststream.nats import ConsumerConfig, JStream, NatsBroker, PullSub
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from nats.js.api import StorageType
from nats.js.client import JetStreamContext
from opentelemetry.trace import TracerProvider

from shared import deadletters, subjects
from shared.schemas import Event
from shared.settings import nats_servers


def stream_config(replicas: int = 1) -> dict:
    """The stream as every service declares it: the server refuses a second declaration whose
    config differs (error 10058). replicas: how many nodes of a NATS cluster keep it."""
    config = dict(
        name=subjects.STREAM_NAME,
        subjects=list(subjects.ALL),
        storage=StorageType.FILE,
        duplicate_window=300.0,  # seconds; Nats-Msg-Id de-duplication horizon
        max_age=7 * 24 * 3600.0,
    )
    if replicas != 1:  # left out on one server, so its declaration stays what it always was
        config["num_replicas"] = replicas
    return config


STREAM_CONFIG = stream_config()
_replicas = 1


def use_replicas(replicas: int) -> None:
    """Declare the stream, every KV bucket and the object store with this many copies on a NATS
    cluster (KERNELLOOP_NATS_REPLICAS). Called once at start-up, before anything is declared: every
    process must declare them alike, or the server refuses the later ones."""
    global STREAM_CONFIG, _replicas
    STREAM_CONFIG, _replicas = stream_config(replicas), replicas


def replicas() -> int:
    """What a KV bucket or object store is declared with: the stream's replicas."""
    return _replicas


def stream() -> JStream:
    # A fresh object per subscriber: FastStream marks a JStream as declared after its first broker
    # starts, so a shared object would leave a second broker (or a fresh server) without the stream.
    return JStream(**STREAM_CONFIG)


STREAM = stream()  # for publishers' AsyncAPI declarations


def make_broker(nats_url: str, tracer_provider: TracerProvider | None = None) -> tuple[NatsBroker, FastStream]:
    # Telemetry outermost, so a failed message's span records the error before it is handled.
    middlewares = [NatsTelemetryMiddleware(tracer_provider=tracer_provider)] if tracer_provider else []
    middlewares += [deadletters.middleware(), Heartbeat]
    broker = NatsBroker(nats_servers(nats_url), middlewares=middlewares, max_reconnect_attempts=-1)
    return broker, FastStream(broker)


HEARTBEAT_S = 10.0


PullSubscription = JetStreamContext.PullSubscription


def _fetch_deadlines_as_nats_timeouts() -> None:
    """nats-py's fetch of several messages raises the builtin TimeoutError when its deadline passes
    before the server answers, where FastStream's batch loop catches only nats.errors.TimeoutError:
    the consume task would crash and be restarted with a growing back-off, stalling the stream for
    minutes. Raised as the error FastStream expects, a quiet moment is just an empty fetch."""
    original = PullSubscription.fetch
    if getattr(original, "kernelloop_shim", False):
        return

    async def fetch(self, *args, **kwargs):
        try:
            return await original(self, *args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as e:
            raise nats.errors.TimeoutError from e

    fetch.kernelloop_shim = True
    PullSubscription.fetch = fetch


_fetch_deadlines_as_nats_timeouts()


class Heartbeat(BaseMiddleware):
    """Tells JetStream "still working" every HEARTBEAT_S while a handler runs, so ack_wait can stay
    short: a crashed replica's message goes to another replica within ack_wait, while a long
    benchmark on a live one is never handed out twice."""

    async def consume_scope(self, call_next, msg):
        in_progress = getattr(msg.raw_message, "in_progress", None)
        if in_progress is None or not getattr(msg.raw_message, "reply", None):
            return await call_next(msg)  # not a JetStream delivery: nothing to extend

        async def beat() -> None:
            while True:
                await asyncio.sleep(HEARTBEAT_S)
                try:
                    await in_progress()
                except Exception:  # the connection is down: the server redelivers if we are gone
                    pass

        task = asyncio.create_task(beat())
        try:
            return await call_next(msg)
        finally:
            task.cancel()


def durable_subscriber(broker: NatsBroker, subject: str, *, ack_wait_s: float = 3 * HEARTBEAT_S,
                       max_deliver: int = deadletters.MAX_DELIVER):
    """A pull consumer shared by every replica of a stage: a work queue with explicit ack.

    A handler that raises is retried with back-off and dead-lettered after its last delivery; an
    invalid message is dead-lettered at once (shared/deadletters.py). Heartbeats keep a message
    while its handler runs, so ack_wait is how long a crashed replica holds it, not a work limit."""
    return broker.subscriber(
        subject,
        stream=stream(),
        durable=subjects.DURABLE[subject],
        pull_sub=PullSub(batch_size=1, timeout=2.0),
        config=ConsumerConfig(ack_wait=ack_wait_s, max_deliver=max_deliver),
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )


def batch_subscriber(broker: NatsBroker, subject: str, *, ack_wait_s: float = 3 * HEARTBEAT_S,
                     max_deliver: int = deadletters.MAX_DELIVER, fetch: int = 256, wait_s: float = 0.2):
    """A durable pull consumer for a high-rate subject of quick handlers (a fleet's kernel.stats):
    up to `fetch` messages per pull, handed over as one list in stream order, with FastStream's
    per-message work (span, log lines, validation) paid once per batch. A batch is pulled as soon as
    `wait_s` passes, so a quiet stream adds at most that latency.

    The handler takes `msg: NatsBatchMessage` (raw messages in `msg.raw_message`) and goes through
    them with `handle_each`, so one bad message is dead-lettered or retried alone instead of failing
    its batch. If the handler itself raises, the unacked rest is retried with back-off, as for
    durable_subscriber."""
    return broker.subscriber(
        subject,
        stream=stream(),
        durable=subjects.DURABLE[subject],
        pull_sub=PullSub(batch_size=fetch, timeout=wait_s, batch=True),
        config=ConsumerConfig(ack_wait=ack_wait_s, max_deliver=max_deliver),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=_raw_batch,  # no decoding here: a body that is not JSON must not fail its batch
    )


async def _raw_batch(msg) -> list[bytes]:
    return [m.data for m in msg.raw_message]


async def handle_each(broker: NatsBroker, model: type[Event], messages: list, handle) -> int:
    """Each message of a batch in stream order: a valid `model` event goes to `await handle(event,
    raw)` and is acked; an invalid one is dead-lettered with the field that is wrong; one whose
    handling raises is retried on its own with back-off (dead-lettered after its last delivery),
    and the rest of the batch goes on. Returns how many were handled."""
    handled = 0
    for raw in messages:
        try:
            event = model.model_validate_json(raw.data)
        except deadletters.PERMANENT as e:
            await deadletters.send(broker, raw, e, deadletters.deliveries_of(raw))
            await raw.ack()
            continue
        try:
            await handle(event, raw)
        except Exception as e:  # noqa: BLE001 - whatever it was, this message alone is retried
            await deadletters.retry_or_dead_letter(broker, raw, e)
            continue
        await raw.ack()
        handled += 1
    return handled


async def publish(broker: NatsBroker, subject: str, event: Event) -> None:
    """Publish through JetStream with the event id as Nats-Msg-Id, so a retry is de-duplicated."""
    await broker.publish(
        event.model_dump(mode="json"),
        subject,
        headers={"Nats-Msg-Id": event.event_id},
        stream=subjects.STREAM_NAME,
    )
