"""The registry over a real JetStream KV: compare-and-set, history, rollback."""
import asyncio

import pytest

from shared.broker import make_broker
from shared.ops import get_op
from shared.registry import Registry, StaleRevision
from shared.schemas import KernelKey, RegistryEntry
from shared.variants import render, variant_id

pytestmark = pytest.mark.nats

OP = get_op("rmsnorm")
KEY = KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float16", bucket="h4096-r16")


def entry(block: int, previous: str | None = None, campaign_id: str = "c1") -> RegistryEntry:
    params = {**OP.DEFAULT, "BLOCK": block}
    source = render(OP.TEMPLATE, params)
    return RegistryEntry(variant_id=variant_id(source, params), source=source, params=params, speedup=1.2,
                         campaign_id=campaign_id, approved_by="auto-gate", previous_variant_id=previous)


@pytest.fixture
async def registry(nats_url):
    broker, _ = make_broker(nats_url)
    async with broker:
        await broker.connect()
        yield await Registry.open(broker)


async def test_two_writers_with_the_same_expected_revision_exactly_one_wins(registry):
    # Both see an empty key...
    outcomes = await asyncio.gather(registry.write(KEY, entry(1024, campaign_id="a"), None),
                                    registry.write(KEY, entry(2048, campaign_id="b"), None),
                                    return_exceptions=True)
    assert sum(isinstance(o, int) for o in outcomes) == 1
    assert sum(isinstance(o, StaleRevision) for o in outcomes) == 1
    current = await registry.read(KEY)
    # ...and then both see the same revision.
    outcomes = await asyncio.gather(registry.write(KEY, entry(256, campaign_id="c"), current.revision),
                                    registry.write(KEY, entry(4096, campaign_id="d"), current.revision),
                                    return_exceptions=True)
    winners = [o for o in outcomes if isinstance(o, int)]
    assert len(winners) == 1 and sum(isinstance(o, StaleRevision) for o in outcomes) == 1
    after = await registry.read(KEY)
    assert after.revision == winners[0] and after.entry.campaign_id in {"c", "d"}


async def test_write_refuses_source_that_does_not_hash_to_the_variant_id(registry):
    forged = entry(1024).model_copy(update={"source": render(OP.TEMPLATE, {**OP.DEFAULT, "BLOCK": 4096})})
    with pytest.raises(ValueError, match="hashes to"):
        await registry.write(KEY, forged, None)
    assert await registry.read(KEY) is None


async def test_history_keeps_every_deploy_and_rollback_restores_the_previous_one(registry):
    a = entry(1024)
    b = entry(2048, previous=a.variant_id)
    c = entry(4096, previous=b.variant_id)
    rev_a = await registry.write(KEY, a, None)
    rev_b = await registry.write(KEY, b, rev_a)
    rev_c = await registry.write(KEY, c, rev_b)
    history = await registry.history(KEY)
    assert [(h.revision, h.entry.variant_id) for h in history] == [(rev_a, a.variant_id), (rev_b, b.variant_id),
                                                                   (rev_c, c.variant_id)]

    rolled = await registry.rollback(KEY, approved_by="alice")
    assert rolled.revision > rev_c
    assert rolled.entry.variant_id == b.variant_id and rolled.entry.previous_variant_id == c.variant_id
    current = await registry.read(KEY)
    assert current.revision == rolled.revision and current.entry.approved_by == "alice"
    assert current.entry.source == b.source
    assert len(await registry.history(KEY)) == 4


async def test_rollback_of_the_first_deploy_returns_the_key_to_the_fallback(registry):
    await registry.write(KEY, entry(1024), None)
    rolled = await registry.rollback(KEY)
    assert rolled.entry is None
    assert await registry.read(KEY) is None
    with pytest.raises(LookupError, match="nothing deployed"):
        await registry.rollback(KEY)
    # The key can be deployed again after the fallback came back.
    assert await registry.write(KEY, entry(2048), None) > rolled.revision
