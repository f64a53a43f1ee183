"""Change detection over synthetic kernel.stats streams: hysteresis, threshold, cool-down, deploys,
aggregation over sources, and silence on stationary noisy traffic."""
import random
from datetime import datetime, timedelta, timezone

import pytest

from detector.change import ChangeDetector
from shared.schemas import KernelKey, KernelStats, ShapeCount

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
SLOT_S = 5.0


def key(bucket: str) -> KernelKey:
    return KernelKey(hardware="cpu-interpreter", op="rmsnorm", dtype="float16", bucket=bucket)


def window(bucket: str, slot: int, calls: int, us_per_call: float, shapes=None, source="host:1",
           variant_id=None, offset_s: float = 0.0) -> KernelStats:
    shapes = shapes or {(8, 4096): calls}
    sampled = max(1, calls // 8)
    return KernelStats(key=key(bucket), source=source, window_start=T0 + timedelta(seconds=slot * SLOT_S + offset_s),
                       window_s=SLOT_S, calls=calls, shapes=[ShapeCount(shape=list(s), calls=n) for s, n in shapes.items()],
                       sampled_calls=sampled, sampled_time_us=sampled * us_per_call, variant_id=variant_id)


def detector(**kw) -> ChangeDetector:
    kw = {"min_time_share": 0.10, "confirm_windows": 2, "cooldown_s": 600.0, "slot_s": SLOT_S} | kw
    return ChangeDetector(**kw)


def run(d: ChangeDetector, slots: range, traffic) -> dict[int, list]:
    """Feed every window `traffic(slot)` yields; returns the events by the slot whose arrival raised them."""
    raised = {}
    for slot in slots:
        for w in traffic(slot):
            events = d.observe(w)
            if events:
                raised.setdefault(slot, []).extend(events)
    return raised


def steady(slot: int) -> list[KernelStats]:
    # a tuned bucket already served by a deployed variant: nothing to announce about it
    return [window("h4096-r16", slot, 1000, 10.0, variant_id="v-decode")]


def test_detector_flags_new_bucket_within_confirm_windows():
    d = detector()

    def traffic(slot):
        out = steady(slot)
        if slot >= 10:  # prefill starts: 100 calls x 50 us against 1000 x 10 us -> a third of the time
            out.append(window("h4096-r4k", slot, 100, 50.0, shapes={(2048, 4096): 75, (4096, 4096): 25}))
        return out

    raised = run(d, range(30), traffic)
    # slots 10 and 11 confirm it; slot 11 is judged when slot 12's first window arrives
    assert list(raised) == [12]
    (event,) = raised[12]
    assert event.reason == "new_shape" and event.key == key("h4096-r4k")
    assert event.after.windows == 2 and event.after.time_share == pytest.approx(5000 / 15000)
    assert event.after.time_us_per_call == pytest.approx(50.0)
    assert event.before.windows == 0 and event.before.calls == 0
    assert {tuple(w.shape): w.weight for w in event.profile} == {(2048, 4096): 0.75, (4096, 4096): 0.25}
    assert "33.3%" in event.detail


def test_longer_hysteresis_waits_for_more_windows():
    d = detector(confirm_windows=4)
    raised = run(d, range(30), lambda s: steady(s) + ([window("h4096-r4k", s, 100, 50.0)] if s >= 10 else []))
    assert list(raised) == [14]


def test_one_hot_window_is_not_a_change():
    d = detector(confirm_windows=2)
    raised = run(d, range(30), lambda s: steady(s) + ([window("h4096-r4k", s, 100, 50.0)] if s == 10 else []))
    assert raised == {}


def test_bucket_below_share_threshold_is_not_flagged():
    d = detector(min_time_share=0.10)
    # 50 calls x 15 us against 1000 x 10 us: 7 % of the op's time, forever
    raised = run(d, range(100), lambda s: steady(s) + [window("h4096-r256", s, 50, 15.0)])
    assert raised == {}
    assert d.snapshot(key("h4096-r256")).time_share == pytest.approx(750 / 10750)


def test_shares_are_summed_over_sources_within_a_slot():
    d = detector()

    def traffic(slot):
        # process 1 serves only decode, process 2 only prefill, windows not aligned to each other
        out = [window("h4096-r16", slot, 1000, 10.0, source="host:1", variant_id="v-decode")]
        if slot >= 5:
            out.append(window("h4096-r4k", slot, 200, 50.0, source="host:2", offset_s=2.5))
        return out

    raised = run(d, range(20), traffic)
    (event,) = raised[7]
    assert event.after.time_share == pytest.approx(0.5)


def test_no_second_event_within_cooldown():
    d = detector(cooldown_s=100.0)  # 20 slots

    def traffic(slot):
        calls = 35 if slot < 20 else 300  # 15 % of the time, then 60 % from slot 20
        return steady(slot) + ([window("h4096-r4k", slot, calls, 50.0)] if slot >= 10 else [])

    raised = run(d, range(60), traffic)
    first, second = (e for slot in sorted(raised) for e in raised[slot])
    assert first.reason == "new_shape" and sorted(raised)[0] == 12
    # the 4x rise starts at slot 20, inside the cool-down that ends at slot 32 (slot 11's end + 100 s)
    assert second.reason == "time_share_shift" and sorted(raised)[1] == 32
    assert second.before.time_share == pytest.approx(first.after.time_share)
    assert second.after.time_share == pytest.approx(15000 / 25000)


def test_deployed_key_does_not_retrigger_new_shape():
    d = detector()

    def traffic(slot):
        # a cold bucket (4 % of the time) gets a hand-started campaign that deploys v-prefill at
        # slot 20, just as its traffic grows: the campaign already happened, so it is not new
        variant, calls = (None, 30) if slot < 20 else ("v-prefill", 400)
        return steady(slot) + [window("h4096-r4k", slot, calls, 15.0, variant_id=variant)]

    assert run(d, range(60), traffic) == {}


def test_key_first_seen_on_a_deployed_variant_is_not_new():
    d = detector()
    raised = run(d, range(40), lambda s: steady(s) + [window("h4096-r4k", s, 100, 50.0, variant_id="v-prefill")])
    assert raised == {}


def test_deployed_bucket_whose_share_triples_is_a_time_share_shift():
    d = detector()

    def traffic(slot):
        calls = 30 if slot < 20 else 400  # 4 % of the time, then 36 %
        return steady(slot) + [window("h4096-r4k", slot, calls, 15.0, variant_id="v-prefill")]

    raised = run(d, range(40), traffic)
    (event,) = raised[22]
    assert event.reason == "time_share_shift"
    assert event.before.time_share == pytest.approx(450 / 10450, rel=1e-3)
    assert "rose from 4.3% to 37.5%" in event.detail


def test_late_window_counts_in_totals_but_not_in_shares():
    d = detector()
    run(d, range(5), steady)
    before = d.snapshot(key("h4096-r16")).calls
    assert d.observe(window("h4096-r4k", 1, 500, 50.0)) == []
    assert d.late_windows == 1
    assert d.snapshot(key("h4096-r4k")).calls == 500
    assert d.snapshot(key("h4096-r16")).calls == before


def noisy(rng: random.Random, buckets: dict[str, tuple[int, float]], variant_id=None):
    def traffic(slot):
        out = []
        for source in ("host:1", "host:2"):
            for bucket, (calls, us) in buckets.items():
                n = max(1, round(calls * rng.uniform(0.7, 1.3)))
                out.append(window(bucket, slot, n, us * rng.uniform(0.7, 1.3), source=source, variant_id=variant_id))
        return out
    return traffic


# decode ~50 %, small batches ~30 %, prefill ~18 %, an odd hidden size ~2 %
MIX = {"h4096-r16": (1000, 10.0), "h4096-r256": (300, 20.0), "h4096-r4k": (36, 100.0), "h1000-r16": (40, 10.0)}


def test_stationary_noisy_traffic_raises_nothing_but_first_sight():
    d = detector(cooldown_s=60.0)
    raised = run(d, range(200), noisy(random.Random(1), MIX))
    # a fresh detector announces each hot bucket once, as soon as it is confirmed; then silence
    assert list(raised) == [2]
    assert sorted(e.key.bucket for e in raised[2]) == ["h4096-r16", "h4096-r256", "h4096-r4k"]


def test_stationary_noisy_traffic_on_deployed_kernels_raises_nothing():
    d = detector(cooldown_s=60.0)
    assert run(d, range(200), noisy(random.Random(2), MIX, variant_id="v-tuned")) == {}


def test_windows_without_a_time_zone_are_read_as_utc():
    d = detector()

    def traffic(slot):
        out = steady(slot)
        if slot >= 10:
            naive = window("h4096-r4k", slot, 100, 50.0)
            out.append(naive.model_copy(update={"window_start": naive.window_start.replace(tzinfo=None)}))
        return out

    assert list(run(d, range(20), traffic)) == [12]
