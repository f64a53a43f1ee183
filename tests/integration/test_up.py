"""`kernelloop up` as a user runs it: ready on its own embedded NATS, and SIGTERM stops everything."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.nats

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose; its parent reaps it
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_up_starts_embedded_nats_and_five_services_and_sigterm_stops_them_all(tmp_path):
    # two benchmark workers: the stage that scales within one device (they time one at a time)
    env = {**os.environ, "KERNELLOOP_STATE_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "1",
           "KERNELLOOP_BENCH_WORKERS": "2"}
    env.pop("NATS_URL", None)
    up = subprocess.Popen([sys.executable, "-m", "kernelloop", "up"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "ready" not in line:
            assert time.monotonic() < deadline and up.poll() is None, f"not ready: {line}"
            line = up.stdout.readline()
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        assert len(children) == 7, "nats-server, five services and a second benchmarker"
        assert (tmp_path / "nats" / "jetstream").is_dir(), "JetStream data lives under the state folder"

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        time.sleep(0.5)
        assert not [pid for pid in children if _alive(pid)], "a child outlived kernelloop up"
    finally:
        if up.poll() is None:
            up.kill()
