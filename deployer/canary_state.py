"""The deployer's canary records: one per hardware in JetStream KV (CanaryState, keyed by the hardware
token), holding the canary in flight there, or the last one, and the deploys waiting their turn.

One canary at a time per hardware, so a change in step time is the candidate's alone: a deploy
claims its hardware's record before it writes the registry, and a second winner finds the claim
and waits (its campaign stays pending "deploy", its id on the record's waiting list) until the
canary is done. The transitions are pure; CanaryStore applies them with compare-and-set, so deployer
replicas and restarts never lose a report nor run two canaries on one hardware."""
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Literal, TypeVar

import nats.js.errors
from faststream.nats import NatsBroker
from nats.js.kv import KeyValue

from deployer.campaign import update_record
from shared.registry import read_record
from deployer.canary import Policy, Verdict, WindowPair, decide
from shared import subjects
from shared.broker import replicas
from shared.schemas import CanaryReport, CanaryState, KernelKey

Claim = Literal["ours", "wait", "same_key"]
T = TypeVar("T")


@dataclass(frozen=True)
class CanaryConfig:
    """How the deployer runs canaries (None in its place: deploys are final, no canary)."""

    max_s: float = 180.0  # undecided this long after its entry was written: withdrawn
    policy: Policy = field(default_factory=Policy)


def claim(run: CanaryState | None, campaign_id: str, key: KernelKey, variant_id: str, incumbent: str | None,
          speedup: float, speedup_ci_low: float, now: datetime) -> tuple[CanaryState, Claim]:
    """Take the hardware for a campaign's canary: "ours" when it is free (or already this campaign's),
    "wait" when another canary holds it (the campaign joins the waiting list), "same_key" when
    another canary is taking over this very key from the incumbent the winner was measured against,
    which then no longer serves. A winner measured against the canary's own candidate waits: if that
    is promoted, it is the incumbent still."""
    if run is not None and not run.done:
        if run.campaign_id == campaign_id:
            return run, "ours"
        if run.key == key and run.variant_id != incumbent:
            return run, "same_key"
        if campaign_id in run.waiting:
            return run, "wait"
        return run.model_copy(update={"waiting": [*run.waiting, campaign_id]}), "wait"
    waiting = [c for c in run.waiting if c != campaign_id] if run is not None else []
    return CanaryState(hardware=key.hardware, campaign_id=campaign_id, key=key, variant_id=variant_id,
                       incumbent_variant_id=incumbent, speedup=speedup, speedup_ci_low=speedup_ci_low,
                       claimed_at=now, waiting=waiting), "ours"


def written(run: CanaryState | None, campaign_id: str, revision: int, trace_id: str | None, span_id: str | None,
            now: datetime) -> tuple[CanaryState | None, None]:
    """The canary entry is in the registry at `revision`: from now on reports for it count."""
    if run is None or run.campaign_id != campaign_id or run.done or run.revision == revision:
        return run, None
    return run.model_copy(update={"revision": revision, "trace_id": trace_id, "span_id": span_id,
                                  "written_at": now}), None


def release(run: CanaryState | None, campaign_id: str, why: str, now: datetime) -> tuple[CanaryState | None, None]:
    """A claim whose deploy never happened (the incumbent changed meanwhile): the hardware is free."""
    if run is None or run.campaign_id != campaign_id or run.done or run.revision is not None:
        return run, None
    return run.model_copy(update={"done": True, "outcome": f"not deployed: {why}", "decided_at": now}), None


def pairs(run: CanaryState) -> list[WindowPair]:
    return [WindowPair(w.step_kind, source, w.window, w.candidate_us, w.incumbent_us, w.candidate_steps,
                       w.incumbent_steps) for source, windows in sorted(run.windows.items()) for w in windows]


def add_report(run: CanaryState | None, report: CanaryReport, now: datetime) -> tuple[CanaryState | None, str]:
    """Merge a workload's windows into the canary they are for. A window already counted (a
    redelivered report) counts once; a report for another canary, or for one already decided, is
    ignored, and the note says why ("" when windows were added)."""
    key = f"{report.key} revision {report.revision}"
    if run is None or run.key != report.key or run.revision != report.revision:
        return run, f"no canary in flight for {key}"
    if run.action is not None or run.done:
        return run, f"the canary for {key} is already decided ({run.action or run.outcome})"
    known = {(w.step_kind, w.window): w for w in run.windows.get(report.source, [])}
    fresh, conflicting = [], 0
    for w in report.windows:
        seen = known.get((w.step_kind, w.window))
        if seen is None:
            known[(w.step_kind, w.window)] = w
            fresh.append(w)
        elif seen != w:
            conflicting += 1  # a pair, once sent, never changes: keep the first
    if not fresh:
        return run, f"nothing new from {report.source}" + (f" ({conflicting} conflicting windows)" if conflicting else "")
    windows = {**run.windows, report.source: [*run.windows.get(report.source, []), *fresh]}
    return run.model_copy(update={"windows": windows, "measures": {**run.measures, report.source: report.measure},
                                  "last_report_at": now}), ""


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def judge(run: CanaryState | None, config: CanaryConfig, now: datetime) -> tuple[CanaryState | None, Verdict | None]:
    """The verdict on every window so far, its figures kept on the record. A promote or withdraw
    becomes the record's action, to be carried out; so does a withdraw once max_s has passed
    without a verdict, because nothing was validated (with no windows at all: no evidence)."""
    if run is None or run.done or run.action is not None or run.revision is None:
        return run, None
    verdict = decide(pairs(run), config.policy)
    low, high = verdict.speedup_ci
    update = {"step_speedup": _finite(verdict.speedup), "judged_windows": verdict.windows, "reason": verdict.reason,
              "step_speedup_ci": (low, high) if math.isfinite(high) and low > 0 else None}
    action = verdict.action if verdict.action != "continue" else None
    elapsed = (now - (run.written_at or run.claimed_at)).total_seconds()
    if action is None and elapsed > config.max_s:
        action = "withdraw"
        update["reason"] = (f"no evidence: no workload reported a complete window within {config.max_s:g} s"
                            if not run.windows else
                            f"not faster beyond the noise within {config.max_s:g} s: {verdict.reason}")
    if action is None:
        return run.model_copy(update=update), None
    return run.model_copy(update={**update, "action": action, "decided_at": now}), verdict


def mark_done(run: CanaryState | None, outcome: str, now: datetime) -> tuple[CanaryState | None, None]:
    if run is None or run.done:
        return run, None
    return run.model_copy(update={"done": True, "outcome": outcome, "decided_at": run.decided_at or now}), None


def superseded(run: CanaryState | None, revision: int, why: str, now: datetime) -> tuple[CanaryState | None, None]:
    """The registry moved on under the canary at `revision` (a person's rollback, a rollback after a
    live regression, a deleted key): nothing is left to decide."""
    if run is None or run.done or run.revision != revision:
        return run, None
    return run.model_copy(update={"done": True, "outcome": f"superseded: {why}", "decided_at": now}), None


def stop_waiting(run: CanaryState | None, campaign_id: str) -> tuple[CanaryState | None, None]:
    if run is None or campaign_id not in run.waiting:
        return run, None
    return run.model_copy(update={"waiting": [c for c in run.waiting if c != campaign_id]}), None


class CanaryStore:
    def __init__(self, kv: KeyValue, attempts: int = 50):
        self.kv = kv
        self.attempts = attempts

    @classmethod
    async def open(cls, broker: NatsBroker) -> "CanaryStore":
        return cls(await broker.key_value(subjects.CANARY_BUCKET, history=subjects.CANARY_HISTORY,
                                           replicas=replicas()))

    async def get(self, hardware: str) -> CanaryState | None:
        return (await read_record(self.kv, hardware, CanaryState))[0]

    async def update(self, hardware: str,
                     change: Callable[[CanaryState | None], tuple[CanaryState | None, T]]) -> tuple[CanaryState | None, T]:
        """Apply a pure transition with compare-and-set; one that leaves no record writes nothing."""
        return await update_record(self.kv, hardware, CanaryState, change, self.attempts)

    async def hardware(self) -> list[str]:
        try:
            return sorted(await self.kv.keys())
        except nats.js.errors.NoKeysError:
            return []

