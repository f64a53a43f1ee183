"""The restore after a detector starts (detector/replay.py Restorer): one replay, whichever handler
asks first, and every live window the replay already counted is skipped, so each window counts once."""
import asyncio
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from detector.replay import Replayed, Restorer

NOW = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
STORED = range(1, 11)  # stream sequences of the kernel.stats windows stored before the start


def live(seq: int):
    """A JetStream message as the stats consumer gets it: an ack subject and its stream sequence."""
    return SimpleNamespace(reply=f"$JS.ACK.stream.durable.1.{seq}.{seq}.0.0",
                           metadata=SimpleNamespace(sequence=SimpleNamespace(stream=seq)))


class Stream:
    """What the feed replays: the stored windows before `before_seq`; each counted window noted."""

    def __init__(self):
        self.counted: list[int] = []
        self.calls: list[tuple[datetime, int | None]] = []

    async def feed(self, since: datetime, before_seq: int | None) -> Replayed:
        self.calls.append((since, before_seq))
        await asyncio.sleep(0)  # let a second caller in while the replay runs
        seqs = [s for s in STORED if before_seq is None or s < before_seq]
        self.counted += seqs
        return Replayed(len(seqs), seqs[-1] if seqs else 0)


async def consume(restorer: Restorer, stream: Stream, batch: range) -> None:
    for seq in batch:
        if not restorer.replayed(live(seq)):
            stream.counted.append(seq)


async def test_replayed_windows_are_not_counted_twice():
    # the hypothesis stage restored first: everything stored was replayed; the stats consumer's
    # first batch then starts at the windows the last process never acked
    stream = Stream()
    restorer = Restorer(stream.feed, replay_s=300, now=lambda: NOW)
    await restorer.restore()
    await restorer.restore(live(6))  # the stats consumer's turn: nothing more to replay
    await consume(restorer, stream, range(6, 13))
    assert sorted(stream.counted) == list(range(1, 13))
    assert stream.calls == [(NOW - timedelta(seconds=300), None)]


async def test_restore_from_a_live_window_stops_just_before_it():
    stream = Stream()
    restorer = Restorer(stream.feed, replay_s=60, now=lambda: NOW)
    done = await restorer.restore(live(6))
    assert done == Replayed(5, 5) and stream.calls == [(NOW - timedelta(seconds=60), 6)]
    await consume(restorer, stream, range(6, 13))
    assert sorted(stream.counted) == list(range(1, 13))


async def test_both_handlers_restoring_at_once_replay_once():
    stream = Stream()
    restorer = Restorer(stream.feed, replay_s=300, now=lambda: NOW)
    results = await asyncio.gather(restorer.restore(live(4)), restorer.restore())
    assert len(stream.calls) == 1 and results.count(None) == 1
    assert sorted(stream.counted) == [1, 2, 3]


async def test_a_message_without_a_stream_sequence_is_never_skipped():
    restorer = Restorer(Stream().feed, replay_s=300, now=lambda: NOW)
    await restorer.restore()
    assert not restorer.replayed(SimpleNamespace(reply=None, metadata=None))  # a core NATS message
    assert restorer.replayed(live(10)) and not restorer.replayed(live(11))
