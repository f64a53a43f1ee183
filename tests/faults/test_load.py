"""A fleet's kernel.stats under load, through a real nats-server into the detector service: every
window published is stored and processed, none is dead-lettered, and the backlog stays bounded.
A small version of `make bench-load` (100 processes x 10 windows/s x 60 s; README figures)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.bench_load import run  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.nats]


def test_the_detector_keeps_up_with_a_fleet_and_loses_no_window():
    found = run(procs=20, rate=10.0, seconds=10.0, os_procs=2, nats_url=None, hardware="load-sim")
    assert found["published"] == 2000 and found["publish_failed"] == 0
    assert found["stored"] == 2000, "every acked publish is in the stream"
    assert found["processed_all"], f"the detector left {found['lag_windows_end']} windows unprocessed"
    assert found["dead_lettered"] == 0
    # bounded: never more than the fleet sends in 10 s behind, and caught up within 30 s of the end
    assert found["lag_windows_max"] < 2000 and found["drain_s"] < 30, found
