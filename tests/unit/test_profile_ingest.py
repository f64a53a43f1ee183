"""Profiler traces -> KernelStats: a real torch.profiler trace of the ops, nested calls counted once,
device time preferred where the trace has it, other ops ignored."""
import json
import time

import pytest
import torch

from observer.ingest import catalog_op, stats_from_profiler_trace
from observer.sdk import ops


def _profile(tmp_path, work) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        work()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> dict:
    x = torch.randn(4, 256, dtype=torch.float16)
    w = torch.ones(256, dtype=torch.float16)
    xb = torch.randn(3, 64, 128, dtype=torch.bfloat16)
    ops.rmsnorm(x, w)  # load the fallback before profiling, as a warm process would have

    def work():
        for _ in range(3):
            ops.rmsnorm(x, w)
        torch.nn.functional.rms_norm(xb, (128,), torch.ones(128, dtype=torch.bfloat16))
        x @ x.T  # not a catalog op

    return _profile(tmp_path_factory.mktemp("prof"), work)


def test_catalog_op_maps_profiler_names():
    assert catalog_op("kernelloop::rmsnorm") == "rmsnorm"
    assert catalog_op("aten::rms_norm") == "rmsnorm"
    assert catalog_op("LlamaRMSNorm") == "rmsnorm"
    assert catalog_op("kernelloop::nope") is None
    assert catalog_op("aten::layer_norm") == "layernorm"
    assert catalog_op("aten::matmul") is None  # its key needs [M, N, K], not the first input's dims
    assert catalog_op("aten::gelu") is None


def test_real_trace_gives_stats_per_key_with_shapes_and_times(trace):
    stats = {str(s.key): s for s in stats_from_profiler_trace(trace, "cpu-interpreter", "host:7")}
    assert set(stats) == {"cpu-interpreter.rmsnorm.float16.h256-r16", "cpu-interpreter.rmsnorm.bfloat16.h128-r256"}
    ours = stats["cpu-interpreter.rmsnorm.float16.h256-r16"]
    assert ours.calls == 3 and [(c.shape, c.calls) for c in ours.shapes] == [([4, 256], 3)]
    # every call in a trace is timed
    assert ours.sampled_calls == 3 and ours.sampled_time_us > 0 and ours.time_us_p50 > 0
    assert ours.source == "host:7" and ours.variant_id is None
    # aten::rms_norm runs aten::_fused_rms_norm inside: one call, not two
    aten = stats["cpu-interpreter.rmsnorm.bfloat16.h128-r256"]
    assert aten.calls == 1 and aten.shapes[0].shape == [3, 64, 128]


def test_window_is_the_traces_span_in_wall_clock(trace):
    (s, *_) = stats_from_profiler_trace(trace, "cpu-interpreter", "host:7")
    assert 0 < s.window_s < 60
    # recorded moments ago: the trace's base time plus its relative timestamps is now
    assert abs(s.window_start.timestamp() - time.time()) < 600


def test_trace_without_catalog_ops_gives_nothing(tmp_path):
    x = torch.randn(8, 8)
    assert stats_from_profiler_trace(_profile(tmp_path, lambda: x @ x), "cpu-interpreter", "h:1") == []


def test_trace_without_events_is_refused():
    with pytest.raises(ValueError, match="traceEvents"):
        stats_from_profiler_trace({"schemaVersion": 1}, "cpu-interpreter", "h:1")


def test_device_kernels_launched_inside_a_call_give_its_time():
    # The fields Kineto writes on a CUDA trace: the kernel carries the External id of the op
    # that launched it; the op's own duration is only the host's launch time.
    op = {"ph": "X", "cat": "cpu_op", "name": "kernelloop::rmsnorm", "pid": 1, "tid": 1, "ts": 100.0, "dur": 30.0,
          "args": {"External id": 5, "Input Dims": [[16, 4096], [4096], []],
                   "Input type": ["c10::Half", "c10::Half", "Scalar"]}}
    inner = {"ph": "X", "cat": "cpu_op", "name": "aten::empty_like", "pid": 1, "tid": 1, "ts": 101.0, "dur": 2.0,
             "args": {"External id": 6, "Input Dims": [[16, 4096]], "Input type": ["c10::Half"]}}
    kernel = {"ph": "X", "cat": "kernel", "name": "_rmsnorm_fwd", "pid": 0, "tid": 7, "ts": 140.0, "dur": 7.5,
              "args": {"External id": 5, "correlation": 9}}
    (s,) = stats_from_profiler_trace({"traceEvents": [op, inner, kernel]}, "nvidia-h100", "h:1")
    assert str(s.key) == "nvidia-h100.rmsnorm.float16.h4096-r16"
    assert s.calls == 1 and s.sampled_time_us == pytest.approx(7.5)
