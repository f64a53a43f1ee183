"""The detector's reads of the loop's KV buckets, tolerant of what it cannot read: what serves a key
(the registry, through shared/registry.py), a card's roofline (the hardware bucket), and what the
benchmark promised for a variant that starts serving (for a regression's evidence)."""
import logging
from collections.abc import Awaitable, Callable

import nats.js.errors
from faststream.nats import NatsBroker
from nats.js.kv import KeyValue
from pydantic import ValidationError

from detector.change import ChangeDetector
from detector.hypothesis import Peaks, peaks_for
from shared import subjects
from shared.broker import replicas
from shared.registry import Registry
from shared.schemas import Hardware, KernelKey, KernelStats, RegistryEntry

log = logging.getLogger("kernelloop.detector")

RegistryRead = Callable[[KernelKey], Awaitable[RegistryEntry | None]]
PeaksRead = Callable[[str], Awaitable[Peaks | None]]


async def served(registry: Registry, key: KernelKey) -> RegistryEntry | None:
    """What serves the key; None when nothing is deployed, the key was deleted, or its entry does
    not read as a RegistryEntry (logged: a detector must keep judging the other keys)."""
    try:
        revision = await registry.read(key)
    except ValidationError as e:
        log.error("registry entry %s is not a RegistryEntry (%s); treating the key as unserved", key, e)
        return None
    return revision.entry if revision is not None else None


async def roofline(hardware_kv: KeyValue, hardware: str) -> Peaks | None:
    """The roofline of a hardware key: measured by a benchmarker on it where one has, else
    the datasheet's (detector/hypothesis.py peaks_for)."""
    try:
        entry = await hardware_kv.get(hardware)
    except nats.js.errors.KeyNotFoundError:  # get() raises this for a deleted key too
        return peaks_for(hardware)
    try:
        return peaks_for(hardware, Hardware.model_validate_json(entry.value))
    except ValidationError as e:
        log.error("hardware entry %s is not a Hardware (%s); using the datasheet", hardware, e)
        return peaks_for(hardware)


class Lookups:
    """The reads above through a broker's buckets, each declared on first use (the broker keeps
    it), so a detector that never needs one does not create it."""

    def __init__(self, broker: NatsBroker):
        self.broker = broker

    async def bucket(self, name: str, history: int) -> KeyValue:
        return await self.broker.key_value(name, history=history, replicas=replicas())

    async def registry(self, key: KernelKey) -> RegistryEntry | None:
        return await served(await Registry.open(self.broker), key)

    async def peaks(self, hardware: str) -> Peaks | None:
        return await roofline(await self.bucket(subjects.HARDWARE_BUCKET, subjects.HARDWARE_HISTORY), hardware)


async def learn_promise(detector: ChangeDetector, stats: KernelStats, read_registry: RegistryRead) -> None:
    """What the benchmark measured for the variant now serving, for the evidence of a regression;
    looked up once per variant the detector has not seen serve the key."""
    if stats.variant_id is None or detector.knows_variant(stats.key, stats.variant_id):
        return
    entry = await read_registry(stats.key)
    speedup = entry.speedup if entry is not None and entry.variant_id == stats.variant_id else None
    detector.promise(stats.key, stats.variant_id, speedup)
