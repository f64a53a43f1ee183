"""LayerNorm over the last dim with weight and bias. Memory-bound: read x, weight and bias once,
write y once (rows wider than the block read x three times: mean, centred variance, write).

A variant's launcher is `launch(x, weight, bias, eps=1e-5) -> y` with y shaped and typed like x.
"""
import math

import torch
import torch.nn.functional as F

from shared.ops.base import Cost
from shared.ops import row_buckets

NAME = "layernorm"
DTYPES = ("float32", "float16", "bfloat16")
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
ODD_SHAPES = ([3, 1000], [1, 77], [5, 2049])


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def make_inputs(shape: list[int], dtype: torch.dtype, device: str, seed: int) -> tuple:
    """A mean far from zero relative to the spread: E[x^2] - mean^2 loses the variance there."""
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: large inputs in ms
    x = (torch.randn(shape, generator=g, device=device) * 2.0 - 30.0).to(dtype)
    weight = (1.0 + 0.5 * torch.randn(shape[-1], generator=g, device=device)).to(dtype)
    bias = (0.5 * torch.randn(shape[-1], generator=g, device=device) + 0.1).to(dtype)
    return (x, weight, bias)


def shape_bucket(shape: list[int]) -> str:
    return row_buckets.bucket(shape, "h")


def example_shapes(bucket: str) -> list[list[int]]:
    return row_buckets.example(bucket)


def cost(shape: list[int], dtype: torch.dtype) -> Cost:
    hidden, rows = shape[-1], math.prod(shape[:-1])
    size = torch.empty((), dtype=dtype).element_size()
    return Cost(flops=8 * rows * hidden, bytes_moved=(2 * rows * hidden + 2 * hidden) * size)


SPACE = {"BLOCK": [256, 512, 1024, 2048, 4096, 8192], "ROWS": [1, 2, 4], "num_warps": [1, 2, 4, 8, 16]}


prune = row_buckets.block_too_wide


DEFAULT = {"BLOCK": 1024, "ROWS": 1, "num_warps": 4}

TEMPLATE = '''"""layernorm variant: BLOCK=$BLOCK, ROWS=$ROWS, num_warps=$num_warps."""
import torch
import triton
import triton.language as tl

BLOCK = $BLOCK
ROWS = $ROWS
NUM_WARPS = $num_warps


@triton.jit
def _layernorm(X, W, B, Y, stride, n_rows, n_cols, eps,
               BLOCK: tl.constexpr, ROWS: tl.constexpr, ONE_PASS: tl.constexpr):
    pid = tl.program_id(0)
    for r in tl.static_range(ROWS):
        row = pid * ROWS + r
        n_valid = tl.where(row < n_rows, n_cols, 0)  # a row past the end masks every access
        base = row.to(tl.int64) * stride
        if ONE_PASS:
            cols = tl.arange(0, BLOCK)
            mask = cols < n_valid
            x = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / n_cols
            centred = tl.where(mask, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + base + cols, (centred * rstd * w + b).to(Y.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for off in range(0, n_cols, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                acc += tl.load(X + base + cols, mask=cols < n_valid, other=0.0).to(tl.float32)
            mean = tl.sum(acc, axis=0) / n_cols
            # the variance of centred values: E[x^2] - mean^2 cancels badly when |mean| >> std
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for off in range(0, n_cols, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                mask = cols < n_valid
                x = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
                centred = tl.where(mask, x - mean, 0.0)
                acc += centred * centred
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + eps)
            for off in range(0, n_cols, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                mask = cols < n_valid
                x = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(Y + base + cols, ((x - mean) * rstd * w + b).to(Y.dtype.element_ty), mask=mask)


def launch(x, weight, bias, eps=1e-5):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()  # x2: [rows, hidden]
    n_rows, n_cols = x2.shape
    y = torch.empty_like(x2)
    if n_rows and n_cols:
        grid = (triton.cdiv(n_rows, ROWS),)
        _layernorm[grid](x2, weight.contiguous(), bias.contiguous(), y, n_cols, n_rows, n_cols, eps,
                         BLOCK=BLOCK, ROWS=ROWS, ONE_PASS=n_cols <= BLOCK, num_warps=NUM_WARPS)
    return y.reshape(shape)
'''
