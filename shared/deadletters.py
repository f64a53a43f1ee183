"""What a stage does with a message it cannot handle: a malformed or invalid message can never
succeed, so it goes to dead.<subject> at once with the reason, and is acked; any other error is
retried with growing delays, and after the last delivery it is dead-lettered too. Either way the
service keeps serving and nothing is silently lost."""
import json
import logging

from faststream import Context, ExceptionMiddleware
from faststream.nats import NatsMessage
from pydantic import ValidationError

from shared import subjects
from shared.schemas import DeadLetter

log = logging.getLogger("kernelloop.deadletters")

MAX_DELIVER = 5
BACKOFF_S = (1.0, 5.0, 15.0, 30.0)  # delay before the 2nd, 3rd, ... delivery
PAYLOAD_CHARS = 4096


class Refused(ValueError):
    """A valid message that can never succeed (it names an op that does not exist, say): raised by a
    handler, it is dead-lettered at once with this reason, like an invalid one."""


PERMANENT = (ValidationError, json.JSONDecodeError, UnicodeDecodeError, Refused)


def reason_of(exc: BaseException) -> str:
    """One line naming what was wrong: the fields for a validation error, else the error."""
    if isinstance(exc, ValidationError):
        fields = [f"{'.'.join(str(p) for p in e['loc']) or '(message)'}: {e['msg']}" for e in exc.errors()[:10]]
        return "invalid message: " + "; ".join(fields)
    if isinstance(exc, Refused):
        return f"refused: {exc}"[:1000]
    return f"{type(exc).__name__}: {exc}"[:1000]


def backoff_s(deliveries: int) -> float:
    return BACKOFF_S[min(max(deliveries, 1), len(BACKOFF_S)) - 1]


def dead_letter(msg, exc: BaseException, deliveries: int) -> DeadLetter:
    """msg: a FastStream NatsMessage, or a raw nats-py message."""
    raw = getattr(msg, "raw_message", msg)
    meta = getattr(raw, "metadata", None) if getattr(raw, "reply", None) else None
    return DeadLetter(
        subject=raw.subject,
        consumer=meta.consumer if meta else "",
        reason=reason_of(exc),
        deliveries=deliveries,
        stream_seq=meta.sequence.stream if meta else None,
        payload=raw.data[:PAYLOAD_CHARS].decode("utf-8", errors="backslashreplace"),
        original_event_id=(raw.headers or {}).get("Nats-Msg-Id"),
    )


def deliveries_of(raw) -> int:
    try:
        return raw.metadata.num_delivered
    except Exception:  # a core-NATS message has no JetStream metadata: it is its first delivery
        return 1


def _deliveries(msg: NatsMessage) -> int:
    return deliveries_of(msg.raw_message)


async def send(broker, raw, exc: BaseException, deliveries: int) -> DeadLetter:
    """Publish the dead letter of one raw message (the caller acks it)."""
    letter = dead_letter(raw, exc, deliveries)
    await broker.publish(letter.model_dump(mode="json"), f"{subjects.DEAD_LETTER_PREFIX}.{letter.subject}",
                         headers={"Nats-Msg-Id": f"dead-{letter.consumer}-{letter.stream_seq or letter.event_id}"},
                         stream=subjects.STREAM_NAME)
    log.error("dead-lettered %s (seq %s) after %d deliveries: %s", letter.subject, letter.stream_seq,
              deliveries, letter.reason)
    return letter


async def retry_or_dead_letter(broker, raw, exc: BaseException) -> None:
    """One raw message whose handling failed: retried later, or dead-lettered after its last delivery."""
    await _failed(broker, raw, exc, deliveries_of(raw), raw.ack, raw.nak)


async def _failed(broker, msg, exc: BaseException, deliveries: int, ack, nack) -> None:
    if isinstance(exc, PERMANENT) or deliveries >= MAX_DELIVER:
        await send(broker, msg, exc, deliveries)
        await ack()
        return
    delay = backoff_s(deliveries)
    await nack(delay=delay)
    subject = getattr(msg, "raw_message", msg).subject
    log.warning("%s on %s (delivery %d): retrying in %.0f s", reason_of(exc), subject, deliveries, delay)


def middleware() -> ExceptionMiddleware:
    errors = ExceptionMiddleware()

    @errors.add_handler(Exception)
    async def on_error(exc: Exception, message=Context(), broker=Context()) -> None:
        # message: NatsMessage, broker: NatsBroker; untyped, as fast_depends refuses the Annotated
        # aliases beside a Context() default
        if isinstance(message.raw_message, list):  # a batch: each message that is left, on its own
            for raw in [m for m in message.raw_message if not m.is_acked]:
                await retry_or_dead_letter(broker, raw, exc)
            return
        await _failed(broker, message, exc, _deliveries(message), message.ack, message.nack)

    return errors
