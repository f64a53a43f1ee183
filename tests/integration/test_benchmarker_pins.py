"""One benchmarker per visible GPU (times KERNELLOOP_BENCH_WORKERS), each pinned to its card through
CUDA_VISIBLE_DEVICES, as `kernelloop up` starts them; unpinned where there is no GPU."""
import time
from pathlib import Path

import pytest

from shared import supervisor
from shared.supervisor import benchmarker_pins, visible_gpus

pytestmark = pytest.mark.nats


def test_pins_per_gpu_and_worker():
    assert benchmarker_pins(["0", "1"], 2) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "0"},
                                               {"CUDA_VISIBLE_DEVICES": "1"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert benchmarker_pins([], 3) == [{}, {}, {}]


def test_visible_gpus_follow_cuda_visible_devices_and_the_interpreter():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, GPU-abc"}) == ["2", "GPU-abc"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1", "TRITON_INTERPRET": "1"}) == []


def _environ(pid: int) -> dict[str, str]:
    deadline = time.monotonic() + 30
    while b"benchmarker" not in Path(f"/proc/{pid}/cmdline").read_bytes():  # not yet exec'd: the parent's env
        assert time.monotonic() < deadline
        time.sleep(0.05)
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_up_starts_each_gpus_benchmarkers_pinned_to_it_and_a_restart_keeps_the_pin(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "KERNELLOOP_BENCH_WORKERS": "2", "TRITON_INTERPRET": "0"}
    loop = supervisor.start(tmp_path, env=env, services=("benchmarker",))
    try:
        pinned = {name: _environ(p.pid).get("CUDA_VISIBLE_DEVICES") for name, p in loop.processes.items()}
        assert pinned == {"benchmarker": "0", "benchmarker#2": "0", "benchmarker#3": "1", "benchmarker#4": "1"}
        loop.kill("benchmarker#3")
        loop.restart("benchmarker#3")
        assert _environ(loop.processes["benchmarker#3"].pid)["CUDA_VISIBLE_DEVICES"] == "1"
    finally:
        loop.stop()
