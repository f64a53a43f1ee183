"""Softmax over the last dim, rows up to 128k wide. Memory-bound: a row that fits one block is read
once; a longer one is read twice (an online max-and-sum pass, then the write pass).

A variant's launcher is `launch(x) -> y` with y shaped and typed like x.
"""
import math

import torch

from shared.ops.base import Cost
from shared.ops import row_buckets

NAME = "softmax"
DTYPES = ("float32", "float16", "bfloat16")
# fp32 math in both; exp's ulps and the sum's order add to the output's one rounding.
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
# Row lengths that divide no block; the last one is longer than the widest block, so the
# online (two-pass) path runs in every check.
ODD_SHAPES = ([3, 1000], [1, 77], [2, 70001])


def reference(x: torch.Tensor) -> torch.Tensor:
    # fp64: torch's own fp32 softmax on the CPU is off by ~1e-5 on 70k-wide rows, above fp32's bar
    return torch.softmax(x.double(), dim=-1).to(x.dtype)


def eager(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def make_inputs(shape: list[int], dtype: torch.dtype, device: str, seed: int) -> tuple:
    """Fresh tensors every call, centred near 100: a kernel that skips the max subtraction
    overflows exp and fails the finite check."""
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: large inputs in ms
    x = (torch.randn(shape, generator=g, device=device) * 4.0 + 100.0).to(dtype)
    return (x,)


def shape_bucket(shape: list[int]) -> str:
    """Row length exactly (a vocabulary, a context length), rows in decode / small / prefill ranges."""
    return row_buckets.bucket(shape, "n")


def example_shapes(bucket: str) -> list[list[int]]:
    return row_buckets.example(bucket, "n")


def cost(shape: list[int], dtype: torch.dtype) -> Cost:
    cols, rows = shape[-1], math.prod(shape[:-1])
    size = torch.empty((), dtype=dtype).element_size()
    return Cost(flops=5 * rows * cols, bytes_moved=2 * rows * cols * size)


# BLOCK columns per step (a row up to BLOCK stays in registers), SPLIT programs per row (few long
# rows, as a decode step's vocabulary, would leave most SMs idle with one program each), warps.
SPACE = {"BLOCK": [512, 1024, 2048, 4096, 8192, 16384, 32768], "SPLIT": [1, 2, 4, 8, 16, 32, 64],
         "num_warps": [1, 2, 4, 8, 16, 32]}

_SMS = 132


def prune(params: dict, profile) -> bool:
    """At most one BLOCK above the (split) row's next power of 2; 1 to 64 fp32 values per thread;
    no split where the rows alone fill the SMs, or that leaves a split less than a block."""
    cols = max(s.shape[-1] for s in profile)
    rows = min(math.prod(s.shape[:-1]) for s in profile)
    per_split = -(-cols // params["SPLIT"])
    per_thread = params["BLOCK"] // (32 * params["num_warps"])
    if params["BLOCK"] > 2 * (1 << (per_split - 1).bit_length()) or per_thread > 64 or per_thread < 1:
        return True
    return params["SPLIT"] > 1 and (rows >= _SMS or per_split < params["BLOCK"] or rows * params["SPLIT"] > 4 * _SMS)


DEFAULT = {"BLOCK": 1024, "SPLIT": 1, "num_warps": 4}

TEMPLATE = '''"""softmax variant: BLOCK=$BLOCK, SPLIT=$SPLIT, num_warps=$num_warps."""
import torch
import triton
import triton.language as tl

BLOCK = $BLOCK
SPLIT = $SPLIT
NUM_WARPS = $num_warps


@triton.jit
def _online_max_sum(x_row, start, end, BLOCK: tl.constexpr):
    # one running max and sum per lane: no reduction inside the loop. The max starts finite so
    # that masked lanes (-inf) give exp(-inf) = 0, never exp(nan).
    m = tl.full([BLOCK], -1.0e38, tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < end, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    row_max = tl.max(m, axis=0)
    return row_max, tl.sum(s * tl.exp(m - row_max), axis=0)


@triton.jit
def _write(x_row, y_row, start, end, row_max, inv_sum, BLOCK: tl.constexpr):
    for off in range(start, end, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < end
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (tl.exp(x - row_max) * inv_sum).to(y_row.dtype.element_ty), mask=mask)


@triton.jit
def _softmax(X, Y, stride_x, stride_y, n_cols, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        e = tl.exp(x - tl.max(x, axis=0))
        tl.store(y_row + cols, (e / tl.sum(e, axis=0)).to(Y.dtype.element_ty), mask=mask)
    else:
        row_max, row_sum = _online_max_sum(x_row, 0, n_cols, BLOCK)
        _write(x_row, y_row, 0, n_cols, row_max, 1.0 / row_sum, BLOCK)


@triton.jit
def _split_stats(X, STATS, stride_x, n_cols, chunk, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    start = part * chunk
    part_max, part_sum = _online_max_sum(X + row * stride_x, start, tl.minimum(start + chunk, n_cols), BLOCK)
    tl.store(STATS + (row * SPLIT + part) * 2, part_max)
    tl.store(STATS + (row * SPLIT + part) * 2 + 1, part_sum)


@triton.jit
def _split_write(X, Y, STATS, stride_x, stride_y, n_cols, chunk, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.arange(0, SPLIT)
    maxes = tl.load(STATS + (row * SPLIT + parts) * 2)
    sums = tl.load(STATS + (row * SPLIT + parts) * 2 + 1)
    row_max = tl.max(maxes, axis=0)
    inv_sum = 1.0 / tl.sum(sums * tl.exp(maxes - row_max), axis=0)
    start = part * chunk
    _write(X + row * stride_x, Y + row * stride_y, start, tl.minimum(start + chunk, n_cols), row_max, inv_sum, BLOCK)


def launch(x):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()  # x2: [rows, cols]
    n_rows, n_cols = x2.shape
    y = torch.empty_like(x2)
    if n_rows and n_cols:
        if SPLIT == 1:
            _softmax[(n_rows,)](x2, y, x2.stride(0), y.stride(0), n_cols, BLOCK=BLOCK,
                                ONE_PASS=n_cols <= BLOCK, num_warps=NUM_WARPS)
        else:
            # each row in SPLIT chunks: (max, sum) per chunk, then every chunk rescales by the row's
            chunk = triton.cdiv(triton.cdiv(n_cols, SPLIT), BLOCK) * BLOCK
            stats = torch.empty((n_rows, SPLIT, 2), dtype=torch.float32, device=x.device)
            grid = (n_rows, SPLIT)
            _split_stats[grid](x2, stats, x2.stride(0), n_cols, chunk, BLOCK=BLOCK, SPLIT=SPLIT, num_warps=NUM_WARPS)
            _split_write[grid](x2, y, stats, x2.stride(0), y.stride(0), n_cols, chunk, BLOCK=BLOCK, SPLIT=SPLIT,
                               num_warps=NUM_WARPS)
    return y.reshape(shape)
'''
