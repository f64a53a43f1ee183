"""The hardware fingerprint: which machine served or measured a kernel, as a registry token."""
import functools
import os
import re
import socket

import torch
import triton

from shared.schemas import Hardware


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()


def device() -> str:
    return "cpu" if interpreted() else "cuda"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:64]


def fingerprint(measure: bool = False) -> Hardware:
    """The machine as a registry token and a description; measure=True adds the GPU's measured
    copy bandwidth and matmul rate (once per process, tens of milliseconds: benchmark workers
    only, never a serving process)."""
    if interpreted():
        name, key = "CPU (Triton interpreter)", "cpu-interpreter"
    else:
        name = torch.cuda.get_device_name()
        key = slug(name)
    found = Hardware(
        key=key,
        name=name,
        interpreter=interpreted(),
        torch=torch.__version__,
        triton=triton.__version__,
        host=socket.gethostname(),
    )
    if not interpreted():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        found.sm_count, found.memory_gib = props.multi_processor_count, round(props.total_memory / 2**30, 1)
        found.device_id = f"GPU-{props.uuid}" if getattr(props, "uuid", None) is not None else ""
        if measure:
            found.copy_gbps, found.matmul_tflops = measured_peaks()
    return found


@functools.cache
def measured_peaks() -> tuple[float, float]:
    """(copy GB/s, bf16 matmul TFLOP/s) of the current GPU, best of a few timed runs: what "good"
    means on this card, for prompts and reports, rather than a data-sheet figure it never reaches."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def best_s(fn, reps: int = 10) -> float:
        fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times)

    copy_s = best_s(lambda: dst.copy_(src))
    matmul_s = best_s(lambda: a @ b)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return round(2 * 256 * 2**20 / copy_s / 1e9, 1), round(2 * 4096**3 / matmul_s / 1e12, 1)
