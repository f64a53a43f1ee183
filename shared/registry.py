"""The loop's records in JetStream KV, read and written in one place.

The registry maps a kernel key to the variant that serves it, with history for rollback. This
module is its only writer: the deployer's deploys and automatic rollbacks and a person's rollback
from the command line all call `Registry`, and every write names the revision it expects to replace,
so two writers cannot both win. The detector, the workload's hot swap and the status views read it
here too. The campaign records (shared/schemas.py CampaignState) are written by the deployer alone;
their key and read side are here so the detector and the command line read them the same way."""
import asyncio
import hashlib
import re
from datetime import datetime, timezone
from typing import NamedTuple, TypeVar

import nats.js.errors
from faststream.nats import NatsBroker
from nats.js.kv import KeyValue
from pydantic import BaseModel

from shared import subjects
from shared.broker import replicas
from shared.schemas import CampaignState, KernelKey, RegistryEntry
from shared.variants import variant_id

_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's "wrong last sequence" error codes


def takes_back(replaced: str | None, entry: RegistryEntry, served_before: set[str]) -> bool:
    """Whether a registry entry that replaces the variant `replaced` is a rollback: approved as one
    by the deployer, or back to a variant that served the key before (a person's rollback is
    approved by that person, so it is known by its shape). A new variant replacing one is not."""
    return replaced is not None and entry.variant_id != replaced and (
        entry.approved_by.startswith("rollback") or entry.variant_id in served_before)


HISTORY_READS = 10
M = TypeVar("M", bound=BaseModel)


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
        except nats.js.errors.KeyNotFoundError:  # get() raises this for a deleted key too
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
        # nats-py's history() is a watch that may say "no more" before the kept entries arrived
        # (seen on a loaded machine): a short history would hide a withdrawn variant from the gate.
        # So it is read again until it holds as many entries as the stream keeps for the key.
        kept = await self._kept(str(key))
        entries: list = []
        for attempt in range(HISTORY_READS):
            try:
                entries = await self.kv.history(str(key))
            except nats.js.errors.NoKeysError:
                entries = []
            if len(entries) >= kept:
                break
            await asyncio.sleep(0.05 * (attempt + 1))
        else:
            raise RuntimeError(f"registry key {key}: history read {len(entries)} of {kept} kept entries")
        return [Revision(e.revision, _parse(e)) for e in entries]

    async def _kept(self, key: str) -> int:
        """How many entries the bucket's stream keeps for the key (the KeyValue's own stream and
        subject prefix: nats-py exposes no public accessor for them)."""
        subject = f"{self.kv._pre}{key}"
        info = await self.kv._js.stream_info(self.kv._stream, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)

    async def rollback(self, key: KernelKey | str, approved_by: str = "rollback", trace_id: str | None = None,
                       to: int | None = None, expect: int | None = None) -> Revision:
        """Serve the key with what served it before the current entry (or with what revision `to`
        held), as a new revision.

        The earlier entry is re-written (not the history rewound), so the rollback is itself in the
        history and can be undone the same way; it comes back promoted, never as a canary. When the
        current entry replaced the op's fallback, the key is deleted and the fallback serves again
        (entry None in the result). LookupError when there is nothing to go back to; ValueError when
        `to` names no kept variant or the one serving now; StaleRevision when `expect` is given and
        the key is no longer at that revision."""
        history = await self.history(key)
        current = history[-1] if history else None
        if expect is not None and (current is None or current.revision != expect):
            raise StaleRevision(f"registry key {key} is no longer at revision {expect}")
        serving = current.entry.variant_id if current and current.entry else None
        if to is not None:
            target = next((r for r in history if r.revision == to), None)
            if target is None or target.entry is None:
                revs = ", ".join(str(r.revision) for r in history if r.entry is not None) or "none"
                raise ValueError(f"revision {to} of {key} holds no variant in the kept history (kept: {revs})")
            if serving == target.entry.variant_id:
                raise ValueError(f"{key} already serves {serving} (revision {current.revision})")
            earlier = target.entry
        else:
            if serving is None:
                raise LookupError(f"registry key {key}: nothing deployed, nothing to roll back")
            previous_id = current.entry.previous_variant_id
            if previous_id is None:
                return Revision(await self._delete(key, current.revision), None)
            kept = [r for r in history[:-1] if r.entry is not None and r.entry.variant_id == previous_id]
            if not kept:
                raise LookupError(f"registry key {key}: previous variant {previous_id} is no longer in the kept history")
            earlier = kept[-1].entry
        entry = earlier.model_copy(update={
            "stage": "promoted",
            "approved_by": approved_by,
            "previous_variant_id": serving,
            "trace_id": trace_id,
            "deployed_at": datetime.now(timezone.utc),
        })
        return Revision(await self.write(key, entry, current.revision if current else None), entry)

    async def promote(self, key: KernelKey | str, revision: int, step_speedup: float | None = None) -> Revision:
        """The canary entry at `revision`, written again as promoted (a new revision): its variant
        goes on serving, now alone. StaleRevision when the key is no longer at that revision."""
        current = await self.read(key)
        if current is None or current.revision != revision:
            raise StaleRevision(f"registry key {key} is no longer at revision {revision}")
        entry = current.entry.model_copy(update={"stage": "promoted", "step_speedup": step_speedup,
                                                 "deployed_at": datetime.now(timezone.utc)})
        return Revision(await self.write(key, entry, revision), entry)

    async def deployed(self) -> dict[str, Revision]:
        """key -> what serves it, for every key a variant serves now."""
        try:
            names = sorted(await self.kv.keys())
        except nats.js.errors.NoKeysError:
            return {}
        out = {}
        for name in names:
            revision = await self.read(name)
            if revision is not None:
                out[name] = revision
        return out

    async def _delete(self, key: KernelKey | str, expected_revision: int) -> int:
        try:
            await self.kv.delete(str(key), last=expected_revision)
        except nats.js.errors.APIError as e:
            if e.err_code in _WRONG_LAST_SEQUENCE:
                raise StaleRevision(f"registry key {key} is no longer at revision {expected_revision}") from e
            raise
        return (await self.history(key))[-1].revision


# ---- campaign records: written by the deployer (deployer/campaign.py), read by anyone --------------

_VALID_KEY = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")


def campaign_key(campaign_id: str) -> str:
    """The KV key of a campaign's record; a hand-written id that is no valid key is hashed instead."""
    if _VALID_KEY.match(campaign_id):
        return campaign_id
    return "c-" + hashlib.sha256(campaign_id.encode()).hexdigest()[:32]


async def read_record(kv: KeyValue, key: str, model: type[M]) -> tuple[M | None, int]:
    """A KV record and its revision; (None, 0) when there is none."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None, 0
    return model.model_validate_json(entry.value), entry.revision


async def read_campaign(campaigns: KeyValue, campaign_id: str) -> CampaignState | None:
    """The deployer's record of a campaign, or None when it has none (no result arrived yet)."""
    return (await read_record(campaigns, campaign_key(campaign_id), CampaignState))[0]
