"""Trace files as they arrive at the observer: junk of every kind refused with one clear reason, gzip
taken, sizes bounded before and after unpacking, the trace's own hardware and host used, and the
dropped-files folder settling each file into done/ or rejected/ with its reason."""
import gzip
import json
import os
import re
import time

import pytest

from shared.tracefiles import (CPU_HARDWARE, TraceError, content_id, load_trace, pending_files, read_trace,
                               settle, summary_key)

MB = 2**20
TRACE = {"schemaVersion": 1, "host_name": "gpu-7", "traceEvents": [{"ph": "X", "name": "aten::mm", "ts": 1, "dur": 2}]}


def _bytes(trace=TRACE) -> bytes:
    return json.dumps(trace).encode()


def test_trace_loads_plain_and_gzipped():
    assert load_trace(_bytes(), MB) == TRACE
    assert load_trace(gzip.compress(_bytes()), MB) == TRACE


@pytest.mark.parametrize("data, reason", [
    (_bytes()[:-7], "JSON ends early (truncated?)"),
    (_bytes()[:-3], "JSON ends early (truncated?)"),
    (b'{"traceEvents": [{"ts": 4750615087543.', "JSON ends early (truncated?)"),
    (b'{"traceEvents": [1, 2,, 3], "traceName": "a run long enough to put the error mid-file"}',
     "JSON is invalid at line 1 column 23"),
    (bytes(range(256)) * 4, "not text"),
    (b"\x1f\x8b\x08\x00junk", "corrupt gzip"),
    (gzip.compress(_bytes())[:-12], "corrupt gzip"),
    (b"[1, 2]", "no traceEvents list"),
    (b'{"traceEvents": {"a": 1}}', "no traceEvents list"),
    (b"", "JSON ends early"),
])
def test_junk_is_refused_with_a_clear_reason(data, reason):
    with pytest.raises(TraceError, match=re.escape(reason)):
        load_trace(data, MB)


def test_huge_traces_are_refused_before_and_after_unpacking():
    big = _bytes({"traceEvents": [], "pad": "x" * (2 * MB)})
    with pytest.raises(TraceError, match=r"over the 1 MiB limit \(KERNELLOOP_TRACE_MAX_MB\)"):
        load_trace(big, MB)
    bomb = gzip.compress(big)
    assert len(bomb) < MB
    with pytest.raises(TraceError, match="unpacks to over the 1 MiB limit"):
        load_trace(bomb, MB)


def test_hardware_and_source_come_from_the_trace_unless_given():
    gpu = {**TRACE, "deviceProperties": [{"id": 0, "name": "NVIDIA H100 80GB HBM3"}]}
    trace_id, hardware, source, _ = read_trace(_bytes(gpu), "run1.json", MB)
    assert (hardware, source) == ("nvidia-h100-80gb-hbm3", "gpu-7:run1.json")  # as shared.hardware slugs it
    assert trace_id == content_id(_bytes(gpu)) and trace_id == read_trace(_bytes(gpu), "other.json", MB)[0]
    assert read_trace(_bytes(), "r.json", MB)[1] == CPU_HARDWARE
    assert read_trace(_bytes(), "r.json", MB, hardware="h200", source="me")[1:3] == ("h200", "me")
    with pytest.raises(TraceError, match="not a registry token"):
        read_trace(_bytes(), "r.json", MB, hardware="h100.sxm")
    assert summary_key("h100", "gpu-7:run 1.json") == "h100.gpu-7_run_1_json"


def test_folder_takes_settled_trace_files_oldest_first_and_files_them_away(tmp_path):
    (tmp_path / "b.json").write_bytes(_bytes())
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(_bytes()))
    (tmp_path / "notes.txt").write_text("not a trace file")
    os.utime(tmp_path / "a.json.gz", (time.time() - 60, time.time() - 60))
    os.utime(tmp_path / "b.json", (time.time() - 30, time.time() - 30))
    (tmp_path / "writing.json").write_bytes(b'{"traceEv')  # still being written
    assert [p.name for p in pending_files(tmp_path, settle_s=5)] == ["a.json.gz", "b.json"]

    settle(tmp_path / "a.json.gz", None)
    settle(tmp_path / "b.json", "JSON ends early (truncated?)")
    assert (tmp_path / "done" / "a.json.gz").exists()
    assert (tmp_path / "rejected" / "b.json.reason").read_text() == "JSON ends early (truncated?)\n"
    assert [p.name for p in pending_files(tmp_path)] == ["writing.json"]
    assert pending_files(tmp_path / "missing") == []
