"""Bad input through a real NATS: each junk message is dead-lettered with a reason naming what was
wrong, a failing handler is retried with back-off, and the service keeps serving."""
import asyncio
import json

import nats
import pytest

from detector.app import build_app
from shared import subjects
from shared.broker import durable_subscriber, make_broker
from shared.schemas import DeadLetter, Hypothesis, KernelKey, UsageChanged
from shared.settings import Settings

pytestmark = pytest.mark.nats

KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float32", bucket="h1024-r16")
GOOD = UsageChanged(key=KEY, reason="manual", profile=[{"shape": [8, 1024], "weight": 1.0}])


async def _fetch(js, subject: str, n: int, timeout: float = 10.0) -> list:
    sub = await js.pull_subscribe(subject, stream=subjects.STREAM_NAME)
    got = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(got) < n and asyncio.get_running_loop().time() < deadline:
        try:
            got += await sub.fetch(n - len(got), timeout=1)
        except nats.errors.TimeoutError:
            pass
    return got


JUNK = {
    "not json": (b"{not json", "invalid message"),
    "binary": (bytes(range(256)), "invalid message"),
    "wrong type": (json.dumps({**GOOD.model_dump(mode="json"), "key": {**KEY.model_dump(), "dtype": "float64"}}).encode(),
                   "key.dtype"),
    "missing field": (json.dumps({"reason": "manual"}).encode(), "key: Field required"),
    "unknown version": (json.dumps({**GOOD.model_dump(mode="json"), "schema_version": 7}).encode(), "schema_version"),
    "negative number": (json.dumps({**GOOD.model_dump(mode="json"),
                                    "profile": [{"shape": [8, 1024], "weight": -1}]}).encode(), "profile.0.weight"),
    "unknown op": (json.dumps({**GOOD.model_dump(mode="json"), "key": {**KEY.model_dump(), "op": "gelu"}}).encode(),
                   "key.op 'gelu'"),
    # under the server's payload limit, and not an event: the letter keeps its first 4 KiB
    "huge": (json.dumps({**GOOD.model_dump(mode="json"), "padding": "x" * 900_000}).encode(), "padding"),
}


async def test_junk_is_dead_lettered_with_the_field_named_and_the_detector_keeps_serving(nats_url):
    app = build_app(Settings(NATS_URL=nats_url))
    async with app.broker:
        await app.broker.start()
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        try:
            for name, (payload, _) in JUNK.items():
                await js.publish(subjects.USAGE_CHANGED, payload, headers={"Nats-Msg-Id": f"junk-{name}"})
            await js.publish(subjects.USAGE_CHANGED, GOOD.model_dump_json().encode(),
                             headers={"Nats-Msg-Id": GOOD.event_id})

            letters = [DeadLetter.model_validate_json(m.data)
                       for m in await _fetch(js, f"{subjects.DEAD_LETTER_PREFIX}.{subjects.USAGE_CHANGED}", len(JUNK))]
            by_id = {letter.original_event_id: letter for letter in letters}
            for name, (_, expected) in JUNK.items():
                letter = by_id.get(f"junk-{name}")
                assert letter is not None, f"{name}: not dead-lettered"
                assert expected in letter.reason, (name, letter.reason)
                assert letter.deliveries == 1 and letter.consumer == subjects.DURABLE[subjects.USAGE_CHANGED]
            assert len(by_id["junk-huge"].payload) <= 4096
            # over the server's limit a publish is refused at the client, and nothing reaches the stream
            with pytest.raises(nats.errors.MaxPayloadError):
                await js.publish(subjects.USAGE_CHANGED, b"{" + b" " * (nc.max_payload + 1) + b"}")
            hypotheses = await _fetch(js, subjects.HYPOTHESIS, 1)
            assert [Hypothesis.model_validate_json(m.data).campaign.key for m in hypotheses] == [KEY]
        finally:
            await nc.close()


async def test_a_failing_handler_is_retried_with_back_off_then_succeeds_once(nats_url):
    broker, _ = make_broker(nats_url)
    attempts: list[float] = []
    done: asyncio.Queue = asyncio.Queue()

    @durable_subscriber(broker, subjects.USAGE_CHANGED)
    async def on_usage_changed(event: UsageChanged) -> None:
        attempts.append(asyncio.get_running_loop().time())
        if len(attempts) < 3:
            raise ConnectionError("registry unreachable")  # transient: worth a retry
        await done.put(event.event_id)

    async with broker:
        await broker.start()
        await broker.publish(GOOD.model_dump(mode="json"), subjects.USAGE_CHANGED,
                             headers={"Nats-Msg-Id": GOOD.event_id}, stream=subjects.STREAM_NAME)
        assert await asyncio.wait_for(done.get(), 30) == GOOD.event_id
        await asyncio.sleep(1.5)
    assert len(attempts) == 3, "processed exactly once after two failures"
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.9 and gaps[1] >= 4.5, f"retries came without back-off: {gaps}"
