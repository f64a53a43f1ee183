"""Change detection over the kernel.stats stream: which (op, dtype, bucket) keys became worth a
campaign, or regressed. Pure and stateful; time comes from the windows themselves, never the clock.

Aggregation: windows are summed per (hardware, op) over all sources within a time slot of
`slot_s` seconds (the window start decides the slot), and a slot is judged when the first window of
a later slot arrives for that (hardware, op). A time share is a ratio between buckets, so both sides
must cover the same span of time and the whole fleet. The price is one slot of latency. A window
for a slot already judged (it arrived late) counts in the key's totals and profile, but not in any
share or test: folding it into the open slot would double one source there, which reads as a shift.

What is judged, per key and slot:
- new_shape: a key served by the op's fallback, never announced, holds at least min_time_share of
  its op's time for confirm_windows slots in a row (a fresh detector announces the hot buckets of
  the running workload once: none has had a campaign it knows of);
- idle_to_hot: a known key that was idle (below idle_share) for idle_windows slots holds
  min_time_share again for confirm_windows slots;
- frequency_shift: a CUSUM, or a three-window test that no single burst window can pass
  (detector/cusum.py), on log calls per reporting source finds a rise of at least min_ratio in a
  key holding min_time_share; per source, so adding processes is no shift;
- regression: the same test on log time per call finds a rise; after a deploy the new variant is
  held against the old one's level, and a rise there is a regression after deploy, which the
  deployer answers with a rollback. A deploy is also judged once on its own: the mean of its
  first post_deploy_windows windows against the old level, at post_deploy_z standard errors and
  post_deploy_min_ratio. A deploy promised a speedup, so a smaller slowdown than the CUSUM's
  min_ratio already breaks the promise (a kernel whose launch path costs more than it saves in a
  host-bound server, say); one test per deploy keeps its false alarms rare.
A bucket's time share moves when its calls or its time per call move (both tested) or when other
buckets' do; the latter is their change, not this key's, so share itself is not tested.
Every campaign-starting event is followed by a cool-down per key; falls are never reported (less
work is no reason for a campaign) but move the tests' levels.
"""
import hashlib
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from detector.cusum import Alarm, Cusum, CusumConfig
from shared.schemas import KernelKey, KernelStats, Reason, UsageChanged, UsageSnapshot, WeightedShape

RECENT = 16  # windows of evidence kept per key


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
    sources: set = field(default_factory=set)


@dataclass
class _KeyState:
    key: KernelKey
    rate: Cusum
    time: Cusum
    windows: int = 0  # judged slots the key had calls in
    calls: int = 0
    total_time_us: float = 0.0
    sampled_calls: int = 0
    sampled_time_us: float = 0.0
    shapes: Counter = field(default_factory=Counter)  # shape tuple -> calls
    share: float = 0.0  # in the last judged slot
    share_level: float | None = None  # EWMA of the share, for the events' `before`
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT))  # (share, _Window)
    hot: int = 0  # judged slots in a row at or above half of min_time_share
    idle: int = 0  # judged slots in a row below idle_share
    dormant: bool = False  # idle long enough that coming back is idle_to_hot
    announced: bool = False
    deployed: bool = False  # a deployed variant served it at some point
    variant_ids: frozenset | None = None
    deploy_from: str | None = None  # while a deploy is being checked: the variant it replaced
    deploy_check: bool = False
    post: list = field(default_factory=list)  # log time per call of the windows since the deploy
    post_ref: tuple | None = None  # (log level, sigma) of the replaced variant, until the deploy is judged
    promised: dict = field(default_factory=dict)  # variant_id -> speedup the benchmark measured
    last_event_at: datetime | None = None
    pending: tuple | None = None  # (reason, alarm) found during the cool-down, reported after it

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
    """Feed it KernelStats in arrival order; it returns the UsageChanged events they warrant."""

    def __init__(self, min_time_share: float = 0.03, confirm_windows: int = 2, cooldown_s: float = 600.0,
                 slot_s: float = 5.0, idle_share: float = 0.01, idle_windows: int = 6,
                 deploy_check_windows: int = 12, cusum: CusumConfig | None = None, max_profile_shapes: int = 8,
                 post_deploy_windows: int = 8, post_deploy_z: float = 3.0, post_deploy_min_ratio: float = 1.1):
        if not 0 < min_time_share <= 1 or confirm_windows < 1 or slot_s <= 0 or not 0 <= idle_share < min_time_share:
            raise ValueError("need 0 < min_time_share <= 1, confirm_windows >= 1, slot_s > 0 and "
                             "0 <= idle_share < min_time_share")
        self.min_time_share = min_time_share
        self.confirm_windows = confirm_windows
        self.cooldown = timedelta(seconds=cooldown_s)
        self.slot_s = slot_s
        self.idle_share = idle_share
        self.idle_windows = idle_windows
        self.deploy_check_windows = deploy_check_windows
        self.post_deploy_windows = post_deploy_windows
        self.post_deploy_z = post_deploy_z
        self.post_deploy_min_ratio = post_deploy_min_ratio
        self.cusum = cusum or CusumConfig()
        self.max_profile_shapes = max_profile_shapes
        self.late_windows = 0
        self.suppressed = 0  # changes found during a key's cool-down, not reported
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

    def keys(self) -> list[KernelKey]:
        return [s.key for s in self._keys.values()]

    def promise(self, key: KernelKey, variant_id: str, speedup: float | None) -> None:
        """What the benchmark measured for a deployed variant (None: unknown), for the evidence of a
        regression."""
        self._state(key).promised[variant_id] = speedup

    def knows_variant(self, key: KernelKey, variant_id: str) -> bool:
        state = self._keys.get(str(key))
        return state is not None and variant_id in state.promised

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
        slot.sources.add(stats.source)
        return events

    def _state(self, key: KernelKey) -> _KeyState:
        name = str(key)
        if name not in self._keys:
            self._keys[name] = _KeyState(key, Cusum(self.cusum), Cusum(self.cusum))
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
        sources = max(1, len(slot.sources))
        events = []
        for name in self._groups[group]:
            window = slot.windows.get(name, _Window())
            event = self._judge_key(self._keys[name], min(1.0, times.get(name, 0.0) / total), window, sources, slot)
            if event is not None:
                events.append(event)
        return events

    def _judge_key(self, state: _KeyState, share: float, window: _Window, sources: int,
                   slot: _Slot) -> UsageChanged | None:
        state.share = share
        state.recent.append((share, window))
        self._track_variant(state, window)
        woke = self._track_idle(state, share)
        rate_alarm = time_alarm = None
        if window.calls:
            rate_alarm = state.rate.update(window.calls / sources)
            if window.sampled_calls:
                time_alarm = state.time.update(window.sampled_time_us / window.sampled_calls)
                time_alarm = time_alarm or self._judge_deploy(state, window.sampled_time_us / window.sampled_calls)
        # a streak of windows each holding at least half the threshold, whose mean holds all of
        # it: one noisy window of a 5 % bucket must not reset it, one lone spike must not confirm it
        state.hot = state.hot + 1 if share >= self.min_time_share / 2 else 0

        reason, alarm = self._reason(state, woke, rate_alarm, time_alarm)
        for fell, kind in ((rate_alarm, "frequency_shift"), (time_alarm, "regression")):
            if fell is not None and fell.direction < 0 and state.pending and state.pending[0] == kind:
                state.pending = None  # the held-back rise went away again
        cooling = state.last_event_at is not None and slot.end - state.last_event_at < self.cooldown
        if reason is None and state.pending and not cooling:
            (reason, alarm), state.pending = state.pending, None
        after_deploy = reason == "regression" and state.deploy_check
        if state.deploy_check and not state.time.frozen:
            state.deploy_check = False  # judged: from now on the new variant's level is its own
        if reason is None:
            if state.share_level is None:
                state.share_level = share
            state.share_level += 0.1 * (share - state.share_level)
            return None
        if cooling and not after_deploy:
            # the key had an event lately and its campaign is the answer; a rise in calls or time
            # that still stands when the cool-down ends is reported then
            self.suppressed += 1
            if alarm is not None:
                state.pending = (reason, alarm)
            return None
        event = self._event(state, reason, alarm, after_deploy, slot)
        if reason in ("new_shape", "idle_to_hot"):
            state.announced, state.dormant, state.hot = True, False, 0
        if not after_deploy:  # a rollback is no campaign: it does not start the cool-down
            state.last_event_at = slot.end
        state.share_level = event.after.time_share
        return event

    def _track_variant(self, state: _KeyState, window: _Window) -> None:
        if not window.calls:
            return
        variant_ids = frozenset(window.variant_ids)
        if state.variant_ids is not None and variant_ids != state.variant_ids:
            # a deploy (or rollback) changed the kernel: its time per call is judged against the
            # old kernel's level for a while, so a slower kernel shows as a regression after deploy
            if state.time.n >= 2:
                state.post, state.post_ref = [], (state.time.level, state.time.sigma())
                state.time.hold(self.deploy_check_windows)
                state.deploy_check = len(variant_ids) == 1
                if len(state.variant_ids) == 1:  # a mixed slot (a rollout in progress) keeps the last one
                    state.deploy_from = next(iter(state.variant_ids))
            else:
                state.time.restart()
                state.post_ref = None
        state.variant_ids = variant_ids
        state.deployed |= any(v is not None for v in variant_ids)

    def _judge_deploy(self, state: _KeyState, per_call_us: float) -> Alarm | None:
        """The one test of a deploy: its first windows' mean log time per call against the replaced
        variant's level; an Alarm when it is slower beyond noise and by post_deploy_min_ratio."""
        if state.post_ref is None or not state.deploy_check:
            return None
        state.post.append(math.log(max(per_call_us, 1e-12)))
        if len(state.post) < self.post_deploy_windows:
            return None
        (level, sigma), n = state.post_ref, len(state.post)
        state.post_ref = None
        mean = sum(state.post) / n
        z = (mean - level) / (sigma / math.sqrt(n))
        if z < self.post_deploy_z or mean - level < math.log(self.post_deploy_min_ratio):
            return None
        return Alarm(1, math.exp(mean - level), n, math.exp(level), math.exp(mean), z=z)

    def _track_idle(self, state: _KeyState, share: float) -> bool:
        """True when a dormant key comes back; its tests restart from the new traffic."""
        if share < self.idle_share:
            state.idle += 1
            if state.idle >= self.idle_windows and not state.dormant and (state.announced or state.deployed):
                state.dormant = True
            return False
        state.idle = 0
        if state.dormant and state.hot == 0:
            state.rate.restart()
            state.time.restart()
        return state.dormant

    def _reason(self, state: _KeyState, woke: bool, rate: Alarm | None,
                time: Alarm | None) -> tuple[Reason | None, Alarm | None]:
        hot = state.share >= self.min_time_share
        streak = list(state.recent)[-self.confirm_windows:]
        confirmed = (state.hot >= self.confirm_windows
                     and sum(s for s, _ in streak) / len(streak) >= self.min_time_share)
        if confirmed and not state.announced and not state.deployed:
            return "new_shape", None
        if confirmed and woke:
            return "idle_to_hot", None
        if time is not None and time.direction > 0 and (hot or state.deploy_check):
            return "regression", time
        if rate is not None and rate.direction > 0 and hot:
            return "frequency_shift", rate
        return None, None

    def _event(self, state: _KeyState, reason: Reason, alarm: Alarm | None, after_deploy: bool,
               slot: _Slot) -> UsageChanged:
        key = state.key
        n = self.confirm_windows if alarm is None else max(1, min(alarm.windows or 1, len(state.recent)))
        run = list(state.recent)[-n:]
        shares = [s for s, _ in run]
        calls = sum(w.calls for _, w in run)
        sampled_calls = sum(w.sampled_calls for _, w in run)
        sampled_time_us = sum(w.sampled_time_us for _, w in run)
        before_sampled = state.sampled_calls - sampled_calls
        before_share = state.share_level if state.share_level is not None and reason != "new_shape" else 0.0
        before = UsageSnapshot(
            windows=max(0, state.windows - sum(w.calls > 0 for _, w in run)),
            calls=state.calls - calls,
            time_share=min(1.0, before_share),
            time_us_per_call=(state.sampled_time_us - sampled_time_us) / before_sampled if before_sampled else None,
        )
        after = UsageSnapshot(windows=n, calls=calls, time_share=min(1.0, sum(shares) / n),
                              time_us_per_call=sampled_time_us / sampled_calls if sampled_calls else None)
        variant = next(iter(state.variant_ids)) if state.variant_ids and len(state.variant_ids) == 1 else None
        detail = self._detail(state, reason, alarm, after_deploy, before, after, n)
        # Deterministic: a detector that re-reads the same windows publishes the same event id,
        # and JetStream drops the copy.
        digest = hashlib.sha256(f"{key}|{reason}|{slot.index}".encode()).hexdigest()[:32]
        return UsageChanged(event_id=f"usage-{digest}", key=key, reason=reason, detail=detail, before=before,
                            after=after, profile=self.profile(key) or [], variant_id=variant,
                            after_deploy=after_deploy)

    def _detail(self, state: _KeyState, reason: Reason, alarm: Alarm | None, after_deploy: bool,
                before: UsageSnapshot, after: UsageSnapshot, n: int) -> str:
        key = state.key
        where = f"{key.op} on {key.hardware}"
        bucket = f"bucket {key.bucket} ({key.dtype})"
        if reason == "new_shape":
            return (f"{bucket} took {after.time_share:.1%} of {where}'s time over {n} consecutive windows "
                    f"(threshold {self.min_time_share:.0%}); it is served by the op's fallback and had no "
                    f"campaign yet")
        if reason == "idle_to_hot":
            return (f"{bucket} was idle (under {self.idle_share:.0%} of {where}'s time for at least "
                    f"{self.idle_windows} windows) and now takes {after.time_share:.1%} over {n} windows")
        noise = (state.time if reason == "regression" else state.rate).sigma()
        if alarm.z is not None:
            test = (f"the deploy's own test: the mean of its first {alarm.windows} windows {alarm.z:.1f} standard "
                    f"errors over the replaced variant's level, threshold {self.post_deploy_z:g} and "
                    f"{self.post_deploy_min_ratio:g}x")
        elif alarm.trimmed:
            test = f"three-window test: its two lower windows {self.cusum.trim_h:g} sigma over the level together"
        else:
            test = f"CUSUM on log values: k={self.cusum.k:g} sigma, h={self.cusum.h:g} sigma"
        how = (f"drifted {alarm.ratio:.2f}x since its last change" if alarm.drift else
               f"rose {alarm.ratio:.2f}x over {n} window(s) ({test}, noise {noise:.0%})")
        if reason == "frequency_shift":
            return (f"{bucket}: calls per source and window {how}, from {alarm.before:.1f} to {alarm.after:.1f}; "
                    f"it takes {after.time_share:.1%} of {where}'s time (was {before.time_share:.1%})")
        text = f"{bucket}: time per call {how}, from {alarm.before:.2f} us to {alarm.after:.2f} us"
        if after_deploy:
            variant = next(iter(state.variant_ids), None)
            text += (f", after the deploy of {variant} over {state.deploy_from or 'the fallback'}; "
                     f"live it is slower than what it replaced")
            speedup = state.promised.get(variant)
            if speedup:
                text += f" (the benchmark promised {alarm.before / speedup:.2f} us, {speedup:.2f}x)"
        return text
