"""The detector's reads beside kernel.stats (detector/lookups.py): a registry entry it cannot read
leaves the key unserved instead of stopping the detector, and a variant that starts serving is held
to what its benchmark promised, looked up once per variant."""
import logging

import nats
import pytest
from nats.js.api import KeyValueConfig

from detector.change import ChangeDetector
from detector.lookups import learn_promise, served
from detector.simulator import scenario, windows
from shared import subjects
from shared.registry import Registry
from shared.schemas import KernelKey, RegistryEntry

pytestmark = pytest.mark.nats

KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float16", bucket="h512-r16")


def entry(variant_id: str, speedup: float) -> RegistryEntry:
    return RegistryEntry(variant_id=variant_id, source="source text", speedup=speedup, campaign_id="c-1",
                         approved_by="auto-gate")


async def test_registry_entry_that_does_not_validate_reads_as_unserved(nats_url, caplog):
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket=subjects.REGISTRY_BUCKET,
                                                                  history=subjects.REGISTRY_HISTORY))
        registry = Registry(kv)
        assert await served(registry, KEY) is None  # nothing deployed
        await kv.put(str(KEY), b'{"variant_id": "v-1"}')  # written by something else, missing fields
        with caplog.at_level(logging.ERROR, logger="kernelloop.detector"):
            assert await served(registry, KEY) is None
        assert "is not a RegistryEntry" in caplog.text and str(KEY) in caplog.text
        await kv.put(str(KEY), entry("v-2", 1.3).model_dump_json().encode())
        assert (await served(registry, KEY)).variant_id == "v-2"
    finally:
        await nc.close()


async def test_a_newly_serving_variant_is_held_to_what_its_benchmark_promised():
    s = scenario("regression", slots=90, seed=0, at=60)
    reads = []

    async def registry(key):
        reads.append(key)
        return entry("v-slow", 1.25)  # deployed with the benchmark's 1.25x

    detector = ChangeDetector(slot_s=s.slot_s)
    found = []
    for w in windows(s):
        await learn_promise(detector, w, registry)
        found += detector.observe(w)
    (event,) = found
    assert event.reason == "regression" and event.variant_id == "v-slow"
    assert "the benchmark promised" in event.detail and "1.25x" in event.detail
    serving = {(str(w.key), w.variant_id) for w in windows(s) if w.variant_id is not None}
    assert len(reads) == len(serving), "one registry read per variant seen serving a key"


async def test_a_variant_the_registry_does_not_name_promises_nothing():
    s = scenario("regression", slots=90, seed=0, at=60)
    reads = []

    async def registry(key):
        reads.append(key)
        return entry("v-other", 1.25)  # the registry moved on: what serves is not what it names

    detector = ChangeDetector(slot_s=s.slot_s)
    found = []
    for w in windows(s):
        await learn_promise(detector, w, registry)
        found += detector.observe(w)
    (event,) = found
    assert event.reason == "regression" and "the benchmark promised" not in event.detail
    assert detector.knows_variant(event.key, "v-slow"), "known as promising nothing, so not read again"
    assert len(reads) == len({(str(w.key), w.variant_id) for w in windows(s) if w.variant_id is not None})
