"""The stream simulator: seeded and reproducible, noise as advertised, every scenario's change where
it says, and its command line (windows as JSON lines, or the detector's detections)."""
import json
import math
import statistics

import pytest

from detector.simulator import MIX, NEW, Change, cli, scenario, windows
from shared.schemas import KernelStats


def per_slot(name: str, bucket: str, figure: str, **kw) -> list[float]:
    out = []
    for w in windows(scenario(name, **kw)):
        if w.key.bucket == bucket:
            out.append(w.calls if figure == "calls" else w.sampled_time_us / w.sampled_calls)
    return out


def test_same_seed_same_stream_and_another_seed_another():
    first = [w.calls for w in windows(scenario("stationary", slots=20, seed=4))]
    assert first == [w.calls for w in windows(scenario("stationary", slots=20, seed=4))]
    assert first != [w.calls for w in windows(scenario("stationary", slots=20, seed=5))]


def test_noise_is_the_advertised_log_normal_spread():
    calls = per_slot("stationary", MIX[0].bucket, "calls", slots=2000, noise=0.2)
    logs = [math.log(c) for c in calls]
    assert statistics.pstdev(logs) == pytest.approx(0.2, rel=0.1)
    assert statistics.mean(calls) == pytest.approx(MIX[0].calls, rel=0.02)  # mean-preserving


def test_step_doubles_the_calls_from_its_slot_on():
    calls = per_slot("step-rate", MIX[1].bucket, "calls", slots=400, at=200, noise=0.05)
    assert statistics.mean(calls[200:]) / statistics.mean(calls[:200]) == pytest.approx(2.0, rel=0.03)


def test_new_bucket_has_no_windows_before_it_appears():
    ws = [w for w in windows(scenario("new-bucket", slots=40, at=30)) if w.key.bucket == NEW.bucket]
    assert len(ws) == 10 and all(w.variant_id is None for w in ws)


def test_deploy_changes_the_serving_variant_and_its_time():
    ws = [w for w in windows(scenario("regression", slots=40, at=20, noise=0.0)) if w.key.bucket == MIX[1].bucket]
    assert {w.variant_id for w in ws[:20]} == {"v-small"} and {w.variant_id for w in ws[20:]} == {"v-slow"}
    assert ws[25].sampled_time_us / ws[25].sampled_calls == pytest.approx(2 * MIX[1].time_us)


def test_burst_lasts_one_window():
    assert Change("burst", "b", 5, 6, rate=3.0).factors(5) == (3.0, 1.0)
    assert Change("burst", "b", 5, 6, rate=3.0).factors(6) == (1.0, 1.0)
    assert Change("ramp", "b", 0, 10, rate=4.0).factors(5) == (2.0, 1.0)


def test_sources_each_report_a_window():
    ws = list(windows(scenario("stationary", slots=3, sources=5)))
    assert len(ws) == 3 * len(MIX) * 5 and len({w.source for w in ws}) == 5


def test_cli_prints_valid_kernel_stats_as_json_lines(capsys):
    assert cli(["step-rate", "--slots", "4", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 * len(MIX)
    assert all(KernelStats.model_validate_json(line).key.op == "rmsnorm" for line in lines)


def test_cli_detect_prints_the_detection_of_a_regression(capsys):
    assert cli(["regression", "--slots", "80", "--at", "50", "--detect"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    found = json.loads(line)
    assert found["reason"] == "regression" and found["after_deploy"] is True and found["slot"] >= 50


def test_cli_refuses_an_unknown_scenario_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["tsunami"])
    assert exit_.value.code == 2 and "'tsunami'" in capsys.readouterr().err
