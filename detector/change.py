"""Change detection over the kernel.stats stream: which (op, dtype, bucket) keys became worth a
campaign. Pure and stateful; time comes from the windows themselves, never from the clock.

Aggregation: windows are summed per (hardware, op) over all sources within a time slot of
`slot_s` seconds (the window start decides the slot), and a slot is judged when the first
window of a later slot arrives for that (hardware, op). A time share is a ratio between buckets,
so both sides must cover the same span of time and the whole fleet; judging per arrival would
compare one process's window with another's and turn scheduling jitter into share swings.
The price is one slot of latency. A window for a slot already judged (it arrived late) still
counts in the key's totals and profile, but not in any share: folding it into the open slot would
double one source there, which reads as a shift.
"""
import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from shared.schemas import KernelKey, KernelStats, Reason, UsageChanged, UsageSnapshot, WeightedShape


@dataclass
class _Window:
    """One key's calls within one slot, summed over sources."""

    calls: int = 0
    sampled_calls: int = 0
    sampled_time_us: float = 0.0
    variant_ids: set = field(default_factory=set)

    def add(self, stats: KernelStats) -> None:
        self.calls += stats.calls
        self.sampled_calls += stats.sampled_calls
        self.sampled_time_us += stats.sampled_time_us
        self.variant_ids.add(stats.variant_id)


@dataclass
class _Slot:
    index: int
    end: datetime
    windows: dict[str, _Window] = field(default_factory=dict)


@dataclass
class _KeyState:
    key: KernelKey
    windows: int = 0  # judged slots the key had calls in
    calls: int = 0
    total_time_us: float = 0.0
    sampled_calls: int = 0
    sampled_time_us: float = 0.0
    shapes: Counter = field(default_factory=Counter)  # shape tuple -> calls
    share: float = 0.0  # in the last judged slot
    baseline: float | None = None  # running mean share, frozen while a change is being confirmed
    baseline_slots: int = 0
    streak_reason: Reason | None = None
    streak: list[tuple[float, _Window]] = field(default_factory=list)
    streak_last: int = -1  # the group's judged-slot number the streak last grew in
    announced: bool = False  # a new_shape event went out for it
    deployed: bool = False  # a deployed variant served it at some point
    variant_ids: frozenset | None = None
    last_event_at: datetime | None = None

    def time_us_per_call(self) -> float | None:
        return self.sampled_time_us / self.sampled_calls if self.sampled_calls else None

    def count(self, w: _Window) -> float:
        """Add a window to the totals; returns its estimated time in µs."""
        self.calls += w.calls
        self.sampled_calls += w.sampled_calls
        self.sampled_time_us += w.sampled_time_us
        # unsampled windows are priced at the key's running time per call
        per_call = w.sampled_time_us / w.sampled_calls if w.sampled_calls else self.time_us_per_call()
        time_us = (per_call or 0.0) * w.calls
        self.total_time_us += time_us
        return time_us


class ChangeDetector:
    """Feed it KernelStats in arrival order; it returns the UsageChanged events they warrant.

    new_shape: a key served by the op's fallback, never announced, holds at least min_time_share of
    its op's time for confirm_windows judged slots in a row. A fresh detector therefore announces
    the hot buckets of the running workload once: none of them has had a campaign it knows of.
    time_share_shift: an announced or deployed key's share reaches shift_factor times its running
    baseline (and min_time_share) for confirm_windows slots in a row."""

    def __init__(self, min_time_share: float = 0.10, confirm_windows: int = 2, cooldown_s: float = 600.0,
                 slot_s: float = 5.0, shift_factor: float = 3.0, baseline_windows: int = 5,
                 baseline_alpha: float = 0.1, max_profile_shapes: int = 8):
        if not 0 < min_time_share <= 1 or confirm_windows < 1 or slot_s <= 0 or shift_factor <= 1:
            raise ValueError("need 0 < min_time_share <= 1, confirm_windows >= 1, slot_s > 0, shift_factor > 1")
        self.min_time_share = min_time_share
        self.confirm_windows = confirm_windows
        self.cooldown = timedelta(seconds=cooldown_s)
        self.slot_s = slot_s
        self.shift_factor = shift_factor
        self.baseline_windows = baseline_windows
        self.baseline_alpha = baseline_alpha
        self.max_profile_shapes = max_profile_shapes
        self.late_windows = 0
        self._keys: dict[str, _KeyState] = {}
        self._groups: dict[tuple[str, str], list[str]] = {}  # (hardware, op) -> key strings
        self._open: dict[tuple[str, str], _Slot] = {}
        self._judged: Counter = Counter()  # (hardware, op) -> slots judged so far

    # ---- what the hypothesis stage asks ---------------------------------------------------------

    def profile(self, key: KernelKey) -> list[WeightedShape] | None:
        """The key's shapes seen so far, weighted by their share of its calls (most called first)."""
        state = self._keys.get(str(key))
        if state is None or not state.shapes:
            return None
        top = [(s, n) for s, n in state.shapes.most_common(self.max_profile_shapes) if n > 0]
        total = sum(n for _, n in top)
        return [WeightedShape(shape=list(s), weight=n / total) for s, n in top] if total else None

    def time_us_per_call(self, key: KernelKey) -> float | None:
        state = self._keys.get(str(key))
        return state.time_us_per_call() if state else None

    def snapshot(self, key: KernelKey) -> UsageSnapshot | None:
        state = self._keys.get(str(key))
        if state is None:
            return None
        return UsageSnapshot(windows=state.windows, calls=state.calls, time_share=min(1.0, state.share),
                             time_us_per_call=state.time_us_per_call())

    # ---- the stream -----------------------------------------------------------------------------

    def observe(self, stats: KernelStats) -> list[UsageChanged]:
        state = self._state(stats.key)
        for s in stats.shapes:
            state.shapes[tuple(s.shape)] += s.calls
        group = (stats.key.hardware, stats.key.op)
        # a window without a zone is taken as UTC, so mixed sources still compare
        start = stats.window_start if stats.window_start.tzinfo else stats.window_start.replace(tzinfo=timezone.utc)
        index = math.floor(start.timestamp() / self.slot_s)
        slot = self._open.get(group)
        events: list[UsageChanged] = []
        if slot is not None and index < slot.index:
            self.late_windows += 1
            late = _Window()
            late.add(stats)
            state.count(late)
            return events
        if slot is not None and index > slot.index:
            events = self._judge(group, slot)
            slot = None
        if slot is None:
            slot = self._open[group] = _Slot(index, start)
        slot.end = max(slot.end, start + timedelta(seconds=stats.window_s))
        slot.windows.setdefault(str(stats.key), _Window()).add(stats)
        return events

    def _state(self, key: KernelKey) -> _KeyState:
        name = str(key)
        if name not in self._keys:
            self._keys[name] = _KeyState(key)
            self._groups.setdefault((key.hardware, key.op), []).append(name)
        return self._keys[name]

    def _judge(self, group: tuple[str, str], slot: _Slot) -> list[UsageChanged]:
        times = {name: self._keys[name].count(w) for name, w in slot.windows.items()}
        for name, w in slot.windows.items():
            self._keys[name].windows += w.calls > 0
        total = sum(times.values())
        if total <= 0:
            return []  # no timed calls anywhere in the op: no shares to judge
        self._judged[group] += 1
        events = []
        for name in self._groups[group]:
            window = slot.windows.get(name, _Window())
            event = self._judge_key(self._keys[name], min(1.0, times.get(name, 0.0) / total), window,
                                    self._judged[group], slot)
            if event is not None:
                events.append(event)
        return events

    def _judge_key(self, state: _KeyState, share: float, window: _Window, number: int,
                   slot: _Slot) -> UsageChanged | None:
        state.share = share
        if window.calls:
            variant_ids = frozenset(window.variant_ids)
            if state.variant_ids is not None and variant_ids != state.variant_ids:
                # a deploy changed the kernel: its times start a new regime, and its own campaign
                # is what put it there, so nothing seen so far argues for another one
                state.baseline, state.baseline_slots, state.streak = None, 0, []
            state.variant_ids = variant_ids
            state.deployed |= any(v is not None for v in variant_ids)

        reason = self._candidate(state, share)
        if reason is None:
            state.streak, state.streak_reason = [], None
            self._update_baseline(state, share)
            return None
        if reason != state.streak_reason or state.streak_last != number - 1:
            state.streak = []
        state.streak_reason, state.streak_last = reason, number
        state.streak.append((share, window))
        if len(state.streak) < self.confirm_windows:
            return None
        if state.last_event_at is not None and slot.end - state.last_event_at < self.cooldown:
            return None  # still cooling down; the streak keeps growing and may fire once it passes
        event = self._event(state, reason, slot)
        state.last_event_at = slot.end
        state.announced = True
        state.baseline = event.after.time_share  # the new level is the normal from now on
        state.baseline_slots = max(state.baseline_slots, self.baseline_windows)
        state.streak, state.streak_reason = [], None
        return event

    def _candidate(self, state: _KeyState, share: float) -> Reason | None:
        if share < self.min_time_share:
            return None
        if not state.announced and not state.deployed:
            return "new_shape"
        if state.baseline_slots >= self.baseline_windows and share >= self.shift_factor * (state.baseline or 0.0):
            return "time_share_shift"
        return None

    def _update_baseline(self, state: _KeyState, share: float) -> None:
        if state.baseline is None:
            state.baseline = share
        else:
            state.baseline += self.baseline_alpha * (share - state.baseline)
        state.baseline_slots += 1

    def _event(self, state: _KeyState, reason: Reason, slot: _Slot) -> UsageChanged:
        key, n = state.key, len(state.streak)
        shares = [s for s, _ in state.streak]
        calls = sum(w.calls for _, w in state.streak)
        sampled_calls = sum(w.sampled_calls for _, w in state.streak)
        sampled_time_us = sum(w.sampled_time_us for _, w in state.streak)
        before_sampled = state.sampled_calls - sampled_calls
        before = UsageSnapshot(
            windows=max(0, state.windows - sum(w.calls > 0 for _, w in state.streak)),
            calls=state.calls - calls,
            time_share=min(1.0, state.baseline or 0.0),
            time_us_per_call=(state.sampled_time_us - sampled_time_us) / before_sampled if before_sampled else None,
        )
        after = UsageSnapshot(windows=n, calls=calls, time_share=min(1.0, sum(shares) / n),
                              time_us_per_call=sampled_time_us / sampled_calls if sampled_calls else None)
        where = f"{key.op} on {key.hardware}"
        if reason == "new_shape":
            detail = (f"bucket {key.bucket} ({key.dtype}) took {after.time_share:.1%} of {where}'s time over "
                      f"{n} consecutive windows (threshold {self.min_time_share:.0%}); it is served by the "
                      f"op's fallback and had no campaign yet")
        else:
            detail = (f"bucket {key.bucket} ({key.dtype}) rose from {before.time_share:.1%} to "
                      f"{after.time_share:.1%} of {where}'s time over {n} consecutive windows "
                      f"(trigger: {self.shift_factor:g}x its running baseline)")
        # Deterministic: a detector that re-reads the same windows publishes the same event id,
        # and JetStream drops the copy.
        digest = hashlib.sha256(f"{key}|{reason}|{slot.index}".encode()).hexdigest()[:32]
        return UsageChanged(event_id=f"usage-{digest}", key=key, reason=reason, detail=detail,
                            before=before, after=after, profile=self.profile(key) or [])
