"""Residual add fused with RMSNorm: h = x + residual, y = rmsnorm(h) * weight; returns (y, h), the
normalised activation and the new residual stream. Memory-bound: read x, residual and weight once,
write y and h once (eager reads h back, so fusing saves a third of the traffic).

A variant's launcher is `launch(x, residual, weight, eps=1e-6) -> (y, h)`, both shaped and typed
like x.
"""
import math

import torch

from shared.ops.base import Cost
from shared.ops import rmsnorm, row_buckets

NAME = "rmsnorm_residual"
DTYPES = ("float32", "float16", "bfloat16")
# fp32 accumulation in both, so the error is one rounding of each output, with slack for the
# reduction order.
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
ODD_SHAPES = ([3, 1000], [1, 77], [5, 2049])


def reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
              eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    h = x.float() + residual.float()  # the sum normalised in fp32, as fused kernels do
    y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype), h.to(x.dtype)


def eager(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
          eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """A model's two steps without kernelloop: the add in the input's dtype, then RMSNorm on it."""
    h = x + residual
    return rmsnorm.eager(h, weight, eps), h


def make_inputs(shape: list[int], dtype: torch.dtype, device: str, seed: int) -> tuple:
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: large inputs in ms
    x = (torch.randn(shape, generator=g, device=device) * 3.0 + 0.5).to(dtype)
    residual = (torch.randn(shape, generator=g, device=device) * 2.0 - 0.25).to(dtype)
    weight = (1.0 + 0.5 * torch.randn(shape[-1], generator=g, device=device)).to(dtype)
    return (x, residual, weight)


def shape_bucket(shape: list[int]) -> str:
    return row_buckets.bucket(shape, "h")


def example_shapes(bucket: str) -> list[list[int]]:
    return row_buckets.example(bucket)


def cost(shape: list[int], dtype: torch.dtype) -> Cost:
    hidden, rows = shape[-1], math.prod(shape[:-1])
    size = torch.empty((), dtype=dtype).element_size()
    return Cost(flops=5 * rows * hidden, bytes_moved=(4 * rows * hidden + hidden) * size)


SPACE = {"BLOCK": [256, 512, 1024, 2048, 4096, 8192], "ROWS": [1, 2, 4], "num_warps": [1, 2, 4, 8, 16]}


prune = row_buckets.block_too_wide


DEFAULT = {"BLOCK": 1024, "ROWS": 1, "num_warps": 4}

TEMPLATE = '''"""rmsnorm_residual variant: BLOCK=$BLOCK, ROWS=$ROWS, num_warps=$num_warps."""
import torch
import triton
import triton.language as tl

BLOCK = $BLOCK
ROWS = $ROWS
NUM_WARPS = $num_warps


@triton.jit
def _add_rmsnorm(X, R, W, Y, H, stride, n_rows, n_cols, eps,
                 BLOCK: tl.constexpr, ROWS: tl.constexpr, ONE_PASS: tl.constexpr):
    pid = tl.program_id(0)
    for r in tl.static_range(ROWS):
        row = pid * ROWS + r
        n_valid = tl.where(row < n_rows, n_cols, 0)  # a row past the end masks every access
        base = row.to(tl.int64) * stride
        if ONE_PASS:
            cols = tl.arange(0, BLOCK)
            mask = cols < n_valid
            h = (tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
                 + tl.load(R + base + cols, mask=mask, other=0.0).to(tl.float32))
            tl.store(H + base + cols, h.to(H.dtype.element_ty), mask=mask)
            rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + base + cols, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for off in range(0, n_cols, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                mask = cols < n_valid
                h = (tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
                     + tl.load(R + base + cols, mask=mask, other=0.0).to(tl.float32))
                tl.store(H + base + cols, h.to(H.dtype.element_ty), mask=mask)
                acc += h * h
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + eps)
            for off in range(0, n_cols, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                mask = cols < n_valid
                # the sum again from x and residual, in fp32 as the first pass had it
                h = (tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
                     + tl.load(R + base + cols, mask=mask, other=0.0).to(tl.float32))
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(Y + base + cols, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)


def launch(x, residual, weight, eps=1e-6):
    shape = x.shape
    if residual.shape != shape:
        raise ValueError(f"residual shape {list(residual.shape)} != x shape {list(shape)}")
    x2 = x.reshape(-1, shape[-1]).contiguous()  # x2: [rows, hidden]
    r2 = residual.reshape(-1, shape[-1]).contiguous()
    n_rows, n_cols = x2.shape
    y = torch.empty_like(x2)
    h = torch.empty_like(x2)
    if n_rows and n_cols:
        grid = (triton.cdiv(n_rows, ROWS),)
        _add_rmsnorm[grid](x2, r2, weight.contiguous(), y, h, n_cols, n_rows, n_cols, eps,
                           BLOCK=BLOCK, ROWS=ROWS, ONE_PASS=n_cols <= BLOCK, num_warps=NUM_WARPS)
    return y.reshape(shape), h.reshape(shape)
'''
