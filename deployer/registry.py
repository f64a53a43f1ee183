"""The registry: JetStream KV from kernel key to the variant that serves it, with history for
rollback. Every write names the revision it expects to replace, so two deployers cannot both win."""
from datetime import datetime, timezone
from typing import NamedTuple

import nats.js.errors
from faststream.nats import NatsBroker
from nats.js.kv import KeyValue

from shared import subjects
from shared.broker import replicas
from shared.history import takes_back
from shared.schemas import KernelKey, RegistryEntry
from shared.variants import variant_id

_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's "wrong last sequence" error codes


class StaleRevision(Exception):
    """The key changed since it was read: someone else deployed first. Re-read and decide again."""


class Revision(NamedTuple):
    revision: int
    entry: RegistryEntry | None  # None: a delete marker, i.e. the op's fallback serves the key


def withdrawn(history: list[Revision]) -> dict[str, str]:
    """Variant id -> why it no longer serves, for every variant a rollback (after a live regression,
    or by a person) or a removal took off the key: the loop does not deploy those again by itself,
    or a variant that serves slower than it benchmarks would come back with every campaign. As far
    as the kept history reaches."""
    out: dict[str, str] = {}
    served: set[str] = set()  # variants that served the key before `before`
    for before, after in zip(history, history[1:]):
        if before.entry is None:
            continue
        if after.entry is None:
            out[before.entry.variant_id] = f"removed at revision {after.revision}"
        elif takes_back(before.entry.variant_id, after.entry, served):
            out[before.entry.variant_id] = f"rolled back at revision {after.revision} ({after.entry.approved_by})"
        served.add(before.entry.variant_id)
    return out


def _parse(entry: KeyValue.Entry) -> RegistryEntry | None:
    return None if entry.operation in ("DEL", "PURGE") else RegistryEntry.model_validate_json(entry.value)


class Registry:
    def __init__(self, kv: KeyValue):
        self.kv = kv

    @classmethod
    async def open(cls, broker: NatsBroker) -> "Registry":
        return cls(await broker.key_value(subjects.REGISTRY_BUCKET, history=subjects.REGISTRY_HISTORY,
                                           replicas=replicas()))

    async def read(self, key: KernelKey | str) -> Revision | None:
        """What serves the key now, or None when nothing is deployed (the op's fallback serves)."""
        try:
            entry = await self.kv.get(str(key))
        except nats.js.errors.KeyNotFoundError:
            return None
        return Revision(entry.revision, RegistryEntry.model_validate_json(entry.value))

    async def write(self, key: KernelKey | str, entry: RegistryEntry, expected_revision: int | None) -> int:
        """Write entry if the key is still at expected_revision (None: the key must be absent).
        Returns the new revision; raises StaleRevision when another writer got there first."""
        actual = variant_id(entry.source, entry.params)
        if actual != entry.variant_id:
            raise ValueError(f"registry entry for {key}: source hashes to {actual}, not {entry.variant_id}; "
                             "refusing to write it")
        value = entry.model_dump_json().encode()
        try:
            if expected_revision:
                return await self.kv.update(str(key), value, last=expected_revision)
            return await self.kv.create(str(key), value)
        except nats.js.errors.KeyWrongLastSequenceError as e:
            expected = f"revision {expected_revision}" if expected_revision else "no entry"
            raise StaleRevision(f"registry key {key} is no longer at {expected}: another deploy won") from e

    async def history(self, key: KernelKey | str) -> list[Revision]:
        """Every kept revision of the key, oldest first; delete markers have entry None."""
        try:
            entries = await self.kv.history(str(key))
        except nats.js.errors.NoKeysError:
            return []
        return [Revision(e.revision, _parse(e)) for e in entries]

    async def rollback(self, key: KernelKey | str, approved_by: str = "rollback",
                       trace_id: str | None = None) -> Revision:
        """Serve the key with what served it before the current entry, as a new revision.

        The earlier entry is re-written (not the history rewound), so the rollback is itself in the
        history and can be undone the same way. When the current entry replaced the op's fallback,
        the key is deleted and the fallback serves again (entry None in the result)."""
        history = await self.history(key)
        if not history or history[-1].entry is None:
            raise LookupError(f"registry key {key}: nothing deployed, nothing to roll back")
        current = history[-1]
        previous_id = current.entry.previous_variant_id
        if previous_id is None:
            return Revision(await self._delete(key, current.revision), None)
        earlier = [r for r in history[:-1] if r.entry is not None and r.entry.variant_id == previous_id]
        if not earlier:
            raise LookupError(f"registry key {key}: previous variant {previous_id} is no longer in the kept history")
        entry = earlier[-1].entry.model_copy(update={
            "approved_by": approved_by,
            "previous_variant_id": current.entry.variant_id,
            "trace_id": trace_id,
            "deployed_at": datetime.now(timezone.utc),
        })
        return Revision(await self.write(key, entry, current.revision), entry)

    async def _delete(self, key: KernelKey | str, expected_revision: int) -> int:
        try:
            await self.kv.delete(str(key), last=expected_revision)
        except nats.js.errors.APIError as e:
            if e.err_code in _WRONG_LAST_SEQUENCE:
                raise StaleRevision(f"registry key {key} is no longer at revision {expected_revision}") from e
            raise
        return (await self.history(key))[-1].revision
