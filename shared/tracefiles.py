"""Profiler trace files: bytes -> a trace dict with one clear error for anything that is not one,
the hardware and source a trace speaks for, and the dropped-files folder.

Traces reach the observer service three ways, all ending in observer/ingest/stats.py:
- a profiler.trace event with the trace inline (`kernelloop observe trace FILE`, when it fits
  the server's max payload, 1 MB by default);
- the object store TRACE_OBJECT_BUCKET, an inbox: any client may put a trace there (the CLI does
  for larger files); the service polls it, ingests each object and deletes it;
- a folder (KERNELLOOP_TRACE_DIR) polled for *.json and *.json.gz: each file is ingested once and
  moved to done/, or to rejected/ beside a <name>.reason file saying why. Write a trace elsewhere
  and move it in: a file changed within the last poll is left for the next one.
What the service made of each trace is kept in TRACE_SUMMARY_BUCKET for `kernelloop status`.
"""
import gzip
import hashlib
import io
import json
import re
import shutil
import time
from pathlib import Path

from shared.hardware import slug

CPU_HARDWARE = "cpu-interpreter"  # the loop's hardware key where no GPU is
SUFFIXES = (".json", ".json.gz")
# Object headers an uploader may set (the CLI does); else the trace's own say is taken.
HARDWARE_HEADER, SOURCE_HEADER = "Kernelloop-Hardware", "Kernelloop-Source"


class TraceError(ValueError):
    """Not a usable trace; the message says why, for a log line, a .reason file or the CLI."""


def load_trace(data: bytes, max_bytes: int) -> dict:
    """A Chrome trace from raw (or gzipped) bytes, at most max_bytes once unpacked."""
    if len(data) > max_bytes:
        raise TraceError(f"trace is {len(data) / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB limit "
                         "(KERNELLOOP_TRACE_MAX_MB); profile fewer steps")
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                data = f.read(max_bytes + 1)  # bounded: a small bomb must not unpack to gigabytes
        except (OSError, EOFError) as e:
            raise TraceError(f"corrupt gzip: {e}") from None
        if len(data) > max_bytes:
            raise TraceError(f"trace unpacks to over the {max_bytes / 2**20:.0f} MiB limit (KERNELLOOP_TRACE_MAX_MB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TraceError(f"not text (byte {e.start} is {data[e.start:e.start + 1]!r}): not a JSON trace") from None
    try:
        trace = json.loads(text)
    except json.JSONDecodeError as e:
        # A cut file fails on its last, partial token ("12." of "12.5", "tr" of "true"); a string left
        # open runs to the end (JSON strings hold no raw newlines).
        truncated = e.pos >= len(text.rstrip()) - 32 or e.msg.startswith("Unterminated string")
        raise TraceError("JSON ends early (truncated?)" if truncated else
                         f"JSON is invalid at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise TraceError("no traceEvents list: expected a Chrome trace from torch.profiler's export_chrome_trace")
    return trace


def trace_hardware(trace: dict) -> str:
    """The registry's hardware key for the device the trace ran on: its first GPU's name as
    shared.hardware slugs it, or the CPU key when the trace has no device properties."""
    props = trace.get("deviceProperties")
    if isinstance(props, list) and props and isinstance(props[0], dict) and props[0].get("name"):
        return slug(str(props[0]["name"])) or CPU_HARDWARE
    return CPU_HARDWARE


def trace_source(trace: dict, name: str) -> str:
    """host:file, so traces from two hosts or runs are told apart."""
    host = trace.get("host_name") if isinstance(trace.get("host_name"), str) else "trace"
    return f"{host}:{name}"[:256]


def content_id(data: bytes) -> str:
    """The same bytes give the same id, so ingesting a trace twice publishes nothing new."""
    return "trace-" + hashlib.sha256(data).hexdigest()[:40]


def summary_key(hardware: str, source: str) -> str:
    """A KV key per (hardware, source): the latest trace from a source replaces its last."""
    return f"{hardware}.{re.sub(r'[^-_=A-Za-z0-9]', '_', source)[:200]}"


# ---- the dropped-files folder --------------------------------------------------------------------


def pending_files(folder: Path, settle_s: float = 0.0) -> list[Path]:
    """Trace files waiting in the folder, oldest first; done/ and rejected/ are not looked into.
    A file changed in the last settle_s may still be being written: it waits for the next poll."""
    if not folder.is_dir():
        return []
    now = time.time()
    found = [(p.stat().st_mtime, p.name, p) for p in folder.iterdir() if p.is_file() and p.name.endswith(SUFFIXES)]
    return [p for mtime, _, p in sorted(found) if now - mtime >= settle_s]


def settle(path: Path, error: str | None) -> Path:
    """Move a handled file to done/, or to rejected/ with <name>.reason; returns where it went."""
    folder = path.parent / ("rejected" if error else "done")
    folder.mkdir(exist_ok=True)
    target = folder / path.name
    shutil.move(str(path), target)
    if error:
        (folder / f"{path.name}.reason").write_text(error + "\n")
    return target


def read_trace(data: bytes, name: str, max_bytes: int, hardware: str | None = None,
               source: str | None = None) -> tuple[str, str, str, dict]:
    """(trace id, hardware, source, trace) of a file's or object's bytes; raises TraceError.
    hardware and source default to what the trace says of itself."""
    trace = load_trace(data, max_bytes)
    hardware = hardware or trace_hardware(trace)
    if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", hardware):
        raise TraceError(f"hardware {hardware!r} is not a registry token (letters, digits, - and _)")
    return content_id(data), hardware, (source or trace_source(trace, name))[:256], trace
