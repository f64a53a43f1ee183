"""Windowed aggregation: one KernelStats per key and window, sampled times, percentiles, hot swaps."""
import threading
from datetime import datetime, timezone

import pytest

from shared.windows import WindowAggregator, percentile

T0 = 1_800_000_000.0


def _by_bucket(stats):
    return {s.key.bucket: s for s in stats}


def test_flush_gives_one_stats_per_key_with_shape_counts():
    w = WindowAggregator("cpu-interpreter", "host:1", start=T0)
    for _ in range(3):
        w.record("rmsnorm", "float16", "h2048-r16", [8, 2048], None)
    w.record("rmsnorm", "float16", "h2048-r16", [4, 2048], None)
    w.record("rmsnorm", "float32", "h4096-r16", [16, 4096], "abc")
    stats = w.flush(T0 + 5)
    assert len(stats) == 2
    s = [s for s in stats if s.key.dtype == "float16"][0]
    assert str(s.key) == "cpu-interpreter.rmsnorm.float16.h2048-r16"
    assert s.calls == 4
    assert [(c.shape, c.calls) for c in s.shapes] == [([8, 2048], 3), ([4, 2048], 1)]
    assert s.source == "host:1" and s.variant_id is None
    assert s.window_start == datetime.fromtimestamp(T0, tz=timezone.utc) and s.window_s == pytest.approx(5)
    other = [s for s in stats if s.key.dtype == "float32"][0]
    assert other.variant_id == "abc" and other.calls == 1


def test_flush_starts_a_new_window():
    w = WindowAggregator("cpu-interpreter", "host:1", start=T0)
    w.record("rmsnorm", "float16", "h2048-r16", [8, 2048], None, 10.0)
    w.flush(T0 + 5)
    assert w.flush(T0 + 10) == []  # nothing called: no stats, not a zero-call one
    w.record("rmsnorm", "float16", "h2048-r16", [8, 2048], None)
    (s,) = w.flush(T0 + 12)
    assert s.calls == 1 and s.sampled_calls == 0 and s.time_us_p50 is None
    assert s.window_start == datetime.fromtimestamp(T0 + 10, tz=timezone.utc) and s.window_s == pytest.approx(2)


def test_only_sampled_calls_carry_time_and_percentiles():
    w = WindowAggregator("cpu-interpreter", "host:1", start=T0)
    for i in range(10):
        w.record("rmsnorm", "float16", "h2048-r16", [8, 2048], None, time_us=float(i + 1) * 10 if i % 2 else None)
    (s,) = w.flush(T0 + 1)
    # sampled: 20, 40, 60, 80, 100
    assert s.calls == 10 and s.sampled_calls == 5
    assert s.sampled_time_us == pytest.approx(300)
    assert s.time_us_p50 == pytest.approx(60)
    assert s.time_us_p90 == pytest.approx(92)
    assert s.time_us_per_call == pytest.approx(60)
    assert s.total_time_us == pytest.approx(600)


def test_percentile_interpolates_like_numpy():
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.9) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)


def test_hot_swap_inside_a_window_keeps_calls_but_only_the_new_variants_times():
    w = WindowAggregator("cpu-interpreter", "host:1", start=T0)
    w.record("rmsnorm", "float16", "h2048-r16", [8, 2048], None, 1000.0)
    w.record("rmsnorm", "float16", "h2048-r16", [8, 2048], None)
    w.record("rmsnorm", "float16", "h2048-r16", [8, 2048], "v1", 100.0)
    (s,) = w.flush(T0 + 1)
    assert s.calls == 3 and s.variant_id == "v1"
    assert s.sampled_calls == 1 and s.sampled_time_us == 100.0


def test_late_device_sample_joins_its_variants_window_and_is_dropped_after_a_swap():
    w = WindowAggregator("cpu-interpreter", "host:1", start=T0)
    w.record("rmsnorm", "float16", "h2048-r16", [8, 2048], None)
    w.add_sample("rmsnorm", "float16", "h2048-r16", None, 50.0)
    w.add_sample("rmsnorm", "float16", "h2048-r16", "stale", 5.0)  # measured on a variant swapped out since
    w.add_sample("rmsnorm", "float16", "h4096-r16", None, 5.0)  # a key with no calls in this window
    (s,) = w.flush(T0 + 1)
    assert s.sampled_calls == 1 and s.sampled_time_us == 50.0


def test_records_from_many_threads_are_all_counted():
    w = WindowAggregator("cpu-interpreter", "host:1", start=T0)

    def work():
        for _ in range(2000):
            w.record("rmsnorm", "float16", "h2048-r16", [8, 2048], None, 1.0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    stolen = []
    for _ in range(20):  # flushes racing the writers must neither lose nor double-count a call
        stolen += w.flush(T0 + 1)
    for t in threads:
        t.join()
    stolen += w.flush(T0 + 2)
    assert sum(s.calls for s in stolen) == 8000
    assert sum(s.sampled_calls for s in stolen) == 8000


def test_calls_counted_apart_join_the_window_they_were_made_in():
    w = WindowAggregator("cpu-interpreter", "host:1", start=T0)
    counted = {"calls": 0}

    def collect(windows):  # as the SDK's dispatch hands over its per-signature counts
        if counted["calls"]:
            windows.add_calls("rmsnorm", "float16", "h2048-r16", (8, 2048), "v1", counted["calls"])
            counted["calls"] = 0

    w.collect_with(collect)
    w.collect_with(collect)  # once is enough
    w.record("rmsnorm", "float16", "h2048-r16", [8, 2048], None, 30.0)
    counted["calls"] = 6
    (s,) = w.flush(T0 + 1)
    # the counted calls name the variant that served the last of them: the earlier one's time goes
    assert s.calls == 7 and s.sampled_calls == 0 and s.variant_id == "v1"
    assert [(c.shape, c.calls) for c in s.shapes] == [([8, 2048], 7)]
    assert w.flush(T0 + 2) == []
