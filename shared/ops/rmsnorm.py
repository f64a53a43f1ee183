"""RMSNorm over the last dim. Memory-bound: read x and w once, write y once.

A variant's launcher is `launch(x, weight, eps=1e-6) -> y` with y shaped and typed like x.
"""
import math

import torch
import torch.nn.functional as F

from shared.ops.base import Cost
from shared.ops import row_buckets

NAME = "rmsnorm"
DTYPES = ("float32", "float16", "bfloat16")
# Error normalised by the reference's norm, per dtype: fp32 accumulation in both, so the error is
# one rounding of the output (fp16: 2^-11, bf16: 2^-8) with slack for the reduction order.
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
# Row lengths that divide no block size, so every masked tail runs in the correctness check.
ODD_SHAPES = ([3, 1000], [1, 77], [5, 2049])


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()  # fp32 accumulation, as real kernels do; otherwise fp16 tolerances mislead
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def eager(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """torch's own RMSNorm, the fallback on a GPU: fp32 statistics as the reference's (one fused
    kernel where torch has one for the device and dtype, else its composite of a few)."""
    if weight.dtype != x.dtype:  # torch's fused kernel wants them alike; the reference takes any weight
        return reference(x, weight, eps)
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def make_inputs(shape: list[int], dtype: torch.dtype, device: str, seed: int) -> tuple:
    """Fresh tensors every call. Values are offset and scaled so neither zeros nor [0, 1) pass."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3.0 + 0.5).to(dtype=dtype, device=device)
    weight = (1.0 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype=dtype, device=device)
    return (x, weight)


def shape_bucket(shape: list[int]) -> str:
    """Hidden size exactly (kernels specialise on it), rows in decode / small / prefill ranges."""
    return row_buckets.bucket(shape, "h")


def example_shapes(bucket: str) -> list[list[int]]:
    return row_buckets.example(bucket)


def cost(shape: list[int], dtype: torch.dtype) -> Cost:
    hidden, rows = shape[-1], math.prod(shape[:-1])
    size = torch.empty((), dtype=dtype).element_size()
    return Cost(flops=4 * rows * hidden, bytes_moved=(2 * rows * hidden + hidden) * size)


# The tuning space: BLOCK columns per step, ROWS rows per program, and the warps per program.
SPACE = {"BLOCK": [256, 512, 1024, 2048, 4096, 8192], "ROWS": [1, 2, 4, 8], "num_warps": [1, 2, 4, 8, 16]}


prune = row_buckets.block_too_wide  # True for points that cannot help the profile


# The baseline Triton kernel: what a hand-written kernel would start with.
DEFAULT = {"BLOCK": 512, "ROWS": 1, "num_warps": 4}

# $-placeholders are filled from a point of SPACE (shared/variants.py `render`).
TEMPLATE = '''"""RMSNorm variant: BLOCK=$BLOCK, ROWS=$ROWS, num_warps=$num_warps."""
import torch
import triton
import triton.language as tl

BLOCK = $BLOCK
ROWS = $ROWS
NUM_WARPS = $num_warps


@triton.jit
def _rmsnorm_fwd(X, W, Y, stride_x, stride_y, n_rows, n_cols, eps,
                 BLOCK: tl.constexpr, ROWS: tl.constexpr, ONE_PASS: tl.constexpr):
    pid = tl.program_id(0)
    for r in tl.static_range(ROWS):
        row = pid * ROWS + r
        # a row past the end gets zero valid columns, so every access below is masked off
        n_valid = tl.where(row < n_rows, n_cols, 0)
        x_row = X + row.to(tl.int64) * stride_x
        y_row = Y + row.to(tl.int64) * stride_y
        if ONE_PASS:
            # the whole row fits one block: keep it in registers, read x once
            cols = tl.arange(0, BLOCK)
            mask = cols < n_valid
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for off in range(0, n_cols, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                mask = cols < n_valid
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                acc += x * x
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + eps)
            for off in range(0, n_cols, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                mask = cols < n_valid
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(y_row + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


def launch(x, weight, eps=1e-6):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()  # x2: [rows, hidden]
    n_rows, n_cols = x2.shape
    y = torch.empty_like(x2)
    grid = (triton.cdiv(n_rows, ROWS),)
    _rmsnorm_fwd[grid](x2, weight.contiguous(), y, x2.stride(0), y.stride(0), n_rows, n_cols, eps,
                       BLOCK=BLOCK, ROWS=ROWS, ONE_PASS=n_cols <= BLOCK, num_warps=NUM_WARPS)
    return y.reshape(shape)
'''
