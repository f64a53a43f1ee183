"""No second campaign for a key while one is in flight.

The guard is a small detector-owned JetStream KV bucket, kernel key -> the campaign last started
for it. The deployer's own campaign state (subjects.CAMPAIGN_BUCKET) is keyed by campaign id and
only exists once a first benchmark result arrived, so it cannot answer "is anything running for this
key?" alone; it does say when a campaign has ended. So: the guard names the campaign, the deployer's
state says whether it is over, and a campaign with no verdict after `timeout_s` (its generator or
benchmarker died) stops blocking the key. Claims use the KV's compare-and-set, so two detector
replicas cannot both start one.
"""
import json
from dataclasses import dataclass
from datetime import datetime, timezone

import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import ValidationError

from shared.registry import read_campaign
from shared.schemas import CAMPAIGN_IN_FLIGHT


@dataclass(frozen=True)
class Claim:
    granted: bool
    reason: str  # in words, for the log


def _now() -> datetime:
    return datetime.now(timezone.utc)


class CampaignGuard:
    def __init__(self, guard: KeyValue, campaigns: KeyValue, timeout_s: float):
        self.guard, self.campaigns, self.timeout_s = guard, campaigns, timeout_s

    async def _status(self, campaign_id: str) -> str | None:
        try:
            state = await read_campaign(self.campaigns, campaign_id)
        except ValidationError:
            return None  # a record this version cannot read: judged by its age, as one not yet written
        return state.status if state else None

    async def claim(self, key: str, campaign_id: str, event_id: str, now: datetime | None = None,
                    force: bool = False) -> Claim:
        """Record campaign_id as the key's campaign unless another one is still in flight (force: a
        person asked for it by hand, which overrides the guard but is still recorded)."""
        now = now or _now()
        value = json.dumps({"campaign_id": campaign_id, "event_id": event_id, "started_at": now.isoformat()}).encode()
        try:
            current = await self.guard.get(key)
        except nats.js.errors.KeyNotFoundError:  # KeyDeletedError included: create() re-creates it
            current = None
        if current is not None and current.value:
            held = json.loads(current.value)
            if held.get("event_id") == event_id:
                # the same usage.changed again (a redelivery after a crash): finish what it started
                return Claim(True, f"campaign {held['campaign_id']} was already claimed by this event")
            status = await self._status(held["campaign_id"])
            age_s = (now - datetime.fromisoformat(held["started_at"])).total_seconds()
            if not force and (status in CAMPAIGN_IN_FLIGHT or (status is None and age_s < self.timeout_s)):
                return Claim(False, f"campaign {held['campaign_id']} for {key} is still in flight "
                                    f"({status or 'no verdict yet'}, started {age_s:.0f} s ago)")
        try:
            if current is None:
                await self.guard.create(key, value)
            else:
                await self.guard.update(key, value, last=current.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return Claim(False, f"another detector replica claimed {key} at the same moment")
        return Claim(True, "no campaign in flight for the key")
