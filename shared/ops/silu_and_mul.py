"""SwiGLU's gate: y = silu(x[..., :d]) * x[..., d:] for x: [..., 2d]. Memory-bound: read x once,
write y (half of x's size) once.

A variant's launcher is `launch(x) -> y` with y: [..., d], typed like x.
"""
import math

import torch
import torch.nn.functional as F

from shared.ops.base import Cost
from shared.ops import row_buckets

NAME = "silu_and_mul"
DTYPES = ("float32", "float16", "bfloat16")
# fp32 math in both, so the error is one rounding of the output, with slack for exp's ulps.
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
# Half-widths that divide no block, so every masked tail runs in the correctness check.
ODD_SHAPES = ([3, 2000], [1, 154], [5, 4098])


def reference(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


def eager(x: torch.Tensor) -> torch.Tensor:
    """What a model calls without kernelloop: torch's own ops in the input's dtype."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def make_inputs(shape: list[int], dtype: torch.dtype, device: str, seed: int) -> tuple:
    """Fresh tensors every call; negative and large gates included (silu saturates both ways)."""
    if shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim (gate and up halves), got shape {shape}")
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: large inputs in ms
    x = (torch.randn(shape, generator=g, device=device) * 4.0 + 0.5).to(dtype)
    return (x,)


def shape_bucket(shape: list[int]) -> str:
    """Input width exactly (2 * intermediate size), rows in decode / small / prefill ranges."""
    return row_buckets.bucket(shape, "h")


def example_shapes(bucket: str) -> list[list[int]]:
    return row_buckets.example(bucket)


def cost(shape: list[int], dtype: torch.dtype) -> Cost:
    width, rows = shape[-1], math.prod(shape[:-1])
    size = torch.empty((), dtype=dtype).element_size()
    d = width // 2
    # per output: exp, add, divide, two multiplies
    return Cost(flops=5 * rows * d, bytes_moved=(rows * width + rows * d) * size)


# BLOCK output columns per program, and the warps per program.
SPACE = {"BLOCK": [256, 512, 1024, 2048, 4096, 8192], "num_warps": [1, 2, 4, 8, 16]}


def prune(params: dict, profile) -> bool:
    """Blocks far wider than the row only mask lanes off; few warps on wide blocks spill."""
    d = max(s.shape[-1] for s in profile) // 2
    return params["BLOCK"] > 2 * (1 << (d - 1).bit_length()) or params["BLOCK"] // (32 * params["num_warps"]) > 64


DEFAULT = {"BLOCK": 1024, "num_warps": 4}

TEMPLATE = '''"""silu_and_mul variant: BLOCK=$BLOCK, num_warps=$num_warps."""
import torch
import triton
import triton.language as tl

BLOCK = $BLOCK
NUM_WARPS = $num_warps


@triton.jit
def _silu_and_mul(X, Y, d, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    x_row = X + row * stride_x
    # upcast right after the load: fp32 math, one rounding on the store
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + d + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def launch(x):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()  # x2: [rows, 2d]
    n_rows, width = x2.shape
    d = width // 2
    y = torch.empty((n_rows, d), dtype=x.dtype, device=x.device)
    if n_rows and d:
        grid = (n_rows, triton.cdiv(d, BLOCK))
        _silu_and_mul[grid](x2, y, d, x2.stride(0), y.stride(0), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y.reshape(*shape[:-1], d)
'''
