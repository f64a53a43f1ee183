"""The message contract: keys round-trip, units derive, junk is refused."""
import pytest
from pydantic import ValidationError

from shared.schemas import BY_SUBJECT, KernelKey, KernelStats, WeightedShape

KEY = KernelKey(hardware="nvidia-h100-80gb-hbm3", op="rmsnorm", dtype="bfloat16", bucket="h4096-r16")


def test_kernel_key_round_trips_through_its_registry_string():
    assert KernelKey.parse(str(KEY)) == KEY


def test_kernel_key_with_too_few_parts_names_the_form():
    with pytest.raises(ValueError, match="<hardware>.<op>.<dtype>.<bucket>"):
        KernelKey.parse("rmsnorm.h4096")


def test_stats_time_per_call_comes_from_sampled_calls_only():
    stats = KernelStats(key=KEY, source="host:1", window_start="2026-01-01T00:00:00Z", window_s=5,
                        calls=100, sampled_calls=4, sampled_time_us=40.0)
    assert stats.time_us_per_call == 10.0 and stats.total_time_us == 1000.0


@pytest.mark.parametrize("bad", [{"sampled_time_us": float("nan")}, {"calls": -1}, {"window_s": 0},
                                 {"sampled_time_us": float("inf")}])
def test_stats_refuse_nan_negative_and_infinite_numbers(bad):
    fields = dict(key=KEY, source="h:1", window_start="2026-01-01T00:00:00Z", window_s=5, calls=1,
                  sampled_calls=1, sampled_time_us=1.0)
    with pytest.raises(ValidationError):
        KernelStats(**{**fields, **bad})


def test_shapes_must_have_positive_dimensions():
    with pytest.raises(ValidationError, match="positive"):
        WeightedShape(shape=[4, 0], weight=1)


def test_every_event_gets_a_fresh_id_and_version():
    a, b = (BY_SUBJECT["usage.changed"](key=KEY, reason="manual") for _ in range(2))
    assert a.event_id != b.event_id and a.schema_version == 1
