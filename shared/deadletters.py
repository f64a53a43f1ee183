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
PERMANENT = (ValidationError, json.JSONDecodeError, UnicodeDecodeError)


def reason_of(exc: BaseException) -> str:
    """One line naming what was wrong: the fields for a validation error, else the error."""
    if isinstance(exc, ValidationError):
        fields = [f"{'.'.join(str(p) for p in e['loc']) or '(message)'}: {e['msg']}" for e in exc.errors()[:10]]
        return "invalid message: " + "; ".join(fields)
    return f"{type(exc).__name__}: {exc}"[:1000]


def backoff_s(deliveries: int) -> float:
    return BACKOFF_S[min(max(deliveries, 1), len(BACKOFF_S)) - 1]


def dead_letter(msg: NatsMessage, exc: BaseException, deliveries: int) -> DeadLetter:
    raw = msg.raw_message
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


def _deliveries(msg: NatsMessage) -> int:
    try:
        return msg.raw_message.metadata.num_delivered
    except Exception:  # a core-NATS message has no JetStream metadata: it is its first delivery
        return 1


def middleware() -> ExceptionMiddleware:
    errors = ExceptionMiddleware()

    @errors.add_handler(Exception)
    async def on_error(exc: Exception, message=Context(), broker=Context()) -> None:
        # message: NatsMessage, broker: NatsBroker; untyped, as fast_depends refuses the Annotated
        # aliases beside a Context() default
        deliveries = _deliveries(message)
        if isinstance(exc, PERMANENT) or deliveries >= MAX_DELIVER:
            letter = dead_letter(message, exc, deliveries)
            await broker.publish(letter.model_dump(mode="json"), f"{subjects.DEAD_LETTER_PREFIX}.{letter.subject}",
                                 headers={"Nats-Msg-Id": f"dead-{letter.consumer}-{letter.stream_seq or letter.event_id}"},
                                 stream=subjects.STREAM_NAME)
            await message.ack()
            log.error("dead-lettered %s (seq %s) after %d deliveries: %s", letter.subject, letter.stream_seq,
                      deliveries, letter.reason)
            return
        delay = backoff_s(deliveries)
        await message.nack(delay=delay)
        log.warning("%s on %s (delivery %d): retrying in %.0f s", reason_of(exc), message.raw_message.subject,
                    deliveries, delay)

    return errors
