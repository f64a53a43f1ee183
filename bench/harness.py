"""The shared harness of the benchmark scripts: the machine's two ceilings (copy bandwidth and
matmul rate, measured in the run that uses them), candidate points of an op's SPACE, parallel
compile-and-check of those points in worker processes, timing, and the result files (JSON,
Markdown, PNG).

Only template points of the catalog's own ops run here; they compile and pass the correctness
check (benchmarker.check, odd shapes included) in worker processes before the parent loads one.
"""
import concurrent.futures
import itertools
import json
import math
import multiprocessing
import random
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarker import timing
from benchmarker.check import check
from shared import variants
from shared.ops import get_op, torch_dtype

CACHE_DIR = Path("/tmp/kernelloop-bench-variants")


# ---- ceilings --------------------------------------------------------------------------------


def copy_gbps(size_bytes: int = 2 * 2**30, reps: int = 20) -> float:
    """Device-to-device copy, bytes read plus bytes written, median over reps."""
    src = torch.randn(size_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    (times,) = timing.time_interleaved([lambda: dst.copy_(src)], (), reps, 3, "cuda")
    return 2 * size_bytes / (timing.median(times) * 1e-6) / 1e9


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    """bf16 n x n x n product through cuBLAS on random data, median over reps."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    (times,) = timing.time_interleaved([lambda: a @ b], (), reps, 3, "cuda")
    return 2 * n**3 / (timing.median(times) * 1e-6) / 1e12


# ---- candidates --------------------------------------------------------------------------------


def candidates(op_name: str, shapes: list[list[int]], n: int, seed: int = 0) -> list[dict]:
    """DEFAULT, the op's SEEDS (optional: points worth trying first), then points of the op's SPACE
    that its prune keeps for these shapes, drawn at random (seeded); about n + len(SEEDS) / 2 in all."""
    op = get_op(op_name)
    profile = [SimpleNamespace(shape=s, weight=1.0) for s in shapes]
    prune = getattr(op, "prune", None)
    names = list(op.SPACE)
    points = [dict(zip(names, values)) for values in itertools.product(*(op.SPACE[k] for k in names))]
    seeds = [p for p in getattr(op, "SEEDS", []) if p != op.DEFAULT and not (prune and prune(p, profile))]
    kept = [p for p in points if p != op.DEFAULT and p not in seeds and not (prune and prune(p, profile))]
    random.Random(seed).shuffle(kept)
    return [dict(op.DEFAULT)] + seeds + kept[:max(0, n - len(seeds) // 2)]


def source_of(op_name: str, params: dict) -> tuple[str, str]:
    source = variants.render(get_op(op_name).TEMPLATE, params)
    return source, variants.variant_id(source, params)


def load(op_name: str, params: dict):
    source, vid = source_of(op_name, params)
    return variants.load(source, params, vid, CACHE_DIR)


# ---- compile and check in workers --------------------------------------------------------------


def _compile_and_check(op_name: str, params: dict, shape: list[int], dtype: str, seed: int,
                       device: str = "cuda") -> tuple[bool, str]:
    # Runs in a worker: fills Triton's on-disk cache for the shape, then checks every element on
    # the op's odd shapes and this shape. A device fault kills only this worker's answer.
    try:
        op = get_op(op_name)
        launch = load(op_name, params)
        ok, message = check(launch, op, torch_dtype(dtype), [shape], device, trials=2, seed=seed)
        if device == "cuda":
            torch.cuda.synchronize()
        return ok, message
    except Exception as e:
        return False, f"{type(e).__name__}: {str(e)[:300]}"


def pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # no max_tasks_per_child: replacing retired workers can deadlock the executor (Python 3.12)
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def results(executor, futures: list, deadline: float) -> list[tuple[bool, str]]:
    """Each future's (ok, message); past the deadline (time.monotonic()) the rest fail as timeouts
    and the workers are killed, so one hung variant cannot hold the whole run."""
    out = []
    for f in futures:
        try:
            out.append(f.result(timeout=max(0.0, deadline - time.monotonic())))
        except concurrent.futures.TimeoutError:
            out.append((False, "timeout: not compiled and checked before the deadline"))
        except Exception as e:  # a worker that died takes the pool with it: the rest fail too
            out.append((False, f"{type(e).__name__}: {str(e)[:200]}"))
    if any(msg.startswith("timeout") for _, msg in out):
        for process in list(getattr(executor, "_processes", {}).values()):
            process.kill()
    executor.shutdown(wait=False, cancel_futures=True)
    return out


def submit_checks(executor, op_name: str, points: list[dict], shape: list[int], dtype: str, seed: int,
                  device: str = "cuda") -> list:
    return [executor.submit(_compile_and_check, op_name, p, shape, dtype, seed, device) for p in points]


# ---- timing --------------------------------------------------------------------------------------


def best_of(fns: list, args: tuple, reps: int = 10) -> tuple[int, list[float]]:
    """Index of the fastest fn by median (a quick screen), and every median."""
    medians = [timing.median(t) for t in timing.time_interleaved(fns, args, reps, 2, "cuda")]
    return min(range(len(fns)), key=medians.__getitem__), medians


def final_times(fns: list, args: tuple, reps: int = 60) -> list[dict]:
    """Median and IQR in us of each fn, interleaved in one run."""
    return [{"us": timing.median(t), "iqr_us": timing.iqr(t)}
            for t in timing.time_interleaved(fns, args, reps, 3, "cuda")]


def geomean(values: list[float]) -> float:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


# ---- result files ------------------------------------------------------------------------------


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_chart(path: Path, labels: list[str], series: dict[str, list[float]], title: str) -> str:
    """Horizontal bars of speedups (log scale, 1x marked). matplotlib when it is there, else a small
    PNG written by hand (bars and the 1x line, no text). Returns which writer made the file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _write_plain_png(path, series)
        return "plain"
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(labels) + 1.5))
    height = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.barh([y + i * height for y in range(len(labels))], values, height=height, label=name)
    ax.set_yticks([y + 0.4 - height / 2 for y in range(len(labels))], labels, fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of the best kernelloop variant (x)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"


def _write_plain_png(path: Path, series: dict[str, list[float]]) -> None:
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]
    values = list(series.values())
    n = max(len(v) for v in values)
    bar, gap, width = 6, 4, 800
    height = n * (bar * len(values) + gap) + 20
    pixels = [[(255, 255, 255)] * width for _ in range(height)]
    scale = (width - 20) / (2 * math.log(16))  # 1/16x .. 16x across the width, 1x in the middle
    mid = 10 + int(math.log(16) * scale)
    for row in range(n):
        for s, vals in enumerate(values):
            v = vals[row] if row < len(vals) else 0
            if not v or not math.isfinite(v) or v <= 0:
                continue
            end = 10 + int((math.log(min(max(v, 1 / 16), 16)) + math.log(16)) * scale)
            y0 = 10 + row * (bar * len(values) + gap) + s * bar
            for y in range(y0, y0 + bar - 1):
                for x in range(min(mid, end), max(mid, end) + 1):
                    pixels[y][x] = colors[s % len(colors)]
    for y in range(height):
        pixels[y][mid] = (0, 0, 0)
    raw = b"".join(b"\x00" + bytes(c for px in line for c in px) for line in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(png + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
