"""Scripted LLM answers for rmsnorm: one of each kind a real model gives."""
from shared.ops import rmsnorm
from shared.variants import render

FAST_PARAMS = {"BLOCK": 1024, "ROWS": 2, "num_warps": 4}
FAST_SOURCE = render(rmsnorm.TEMPLATE, FAST_PARAMS)

GOOD = f"""I process two rows per program and use one pass when the row fits a block.

```python
{FAST_SOURCE}
```
"""

SYNTAX_ERROR = """Here is a faster kernel:

```python
import triton
def launch(x, weight, eps=1e-6:
    return x
```
"""

PROSE = "You could try a larger block size and more warps per program; that usually helps RMSNorm."

# The kernel is a stub: torch does the work on the host.
TORCH_OPS = '''```python
import torch
import triton
import triton.language as tl


@triton.jit
def _noop(X):
    pass


def launch(x, weight, eps=1e-6):
    _noop[(1,)](x)
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
```'''

# ---- hand-written variants: the check's unit tests and the hostile-variant tests edit these ---------


def edit(source: str, old: str, new: str) -> str:
    """source with old replaced by new; old must be in it, so a variant never drifts from its base."""
    assert old in source, f"source lacks {old!r}"
    return source.replace(old, new)


# One block per row, sized to the row, no loop: correct at any width; the broken variants edit it.
ONE_BLOCK_SOURCE = '''import torch
import triton
import triton.language as tl


@triton.jit
def _rms(X, W, Y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(Y + row * n_cols + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


def launch(x, weight, eps=1e-6):
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # x2: [rows, hidden]
    y = torch.empty_like(x2)
    _rms[(x2.shape[0],)](x2, weight, y, x2.shape[1], eps, BLOCK=triton.next_power_of_2(x2.shape[1]))
    return y.reshape(x.shape)
'''
# The block fixed at 1024: right while a row fits 1024 columns, wrong beyond.
PARTIAL_SOURCE = edit(ONE_BLOCK_SOURCE, "BLOCK=triton.next_power_of_2(x2.shape[1])", "BLOCK=1024")
# Whole blocks of 64 only: a row whose length is not a multiple of 64 loses its tail, in the sum and the output.
BLOCK_MULTIPLES_ONLY = '''import torch
import triton
import triton.language as tl


@triton.jit
def _rms(X, W, Y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, n_cols - BLOCK + 1, BLOCK):
        x = tl.load(X + row * n_cols + off + tl.arange(0, BLOCK)).to(tl.float32)
        acc += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + eps)
    for off in range(0, n_cols - BLOCK + 1, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(X + row * n_cols + cols).to(tl.float32)
        w = tl.load(W + cols).to(tl.float32)
        tl.store(Y + row * n_cols + cols, (x * rstd * w).to(Y.dtype.element_ty))


def launch(x, weight, eps=1e-6):
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # x2: [rows, hidden]
    y = torch.zeros_like(x2)
    _rms[(x2.shape[0],)](x2, weight, y, x2.shape[1], eps, BLOCK=64)
    return y.reshape(x.shape)
'''
# Computes into its input's buffer and returns a copy of it: right values, the input overwritten.
WRITES_INPUT = edit(edit(ONE_BLOCK_SOURCE, "y = torch.empty_like(x2)", "y = x2"), "    return y.reshape(x.shape)\n",
                    "    return x2.clone().reshape(x.shape)\n")
# Squares in float16: right on moderate values, inf once |x| > 256 (activation outliers do that).
SQUARES_IN_FP16 = edit(ONE_BLOCK_SOURCE, "tl.sum(x * x, axis=0)",
                       "tl.sum((x.to(tl.float16) * x.to(tl.float16)).to(tl.float32), axis=0)")
PARTIAL = f"One block per row, no loop:\n```python\n{PARTIAL_SOURCE}```\n"

# Spins forever on the host: only the benchmarker's deadline ends it.
SPINS = '''```python
import torch
import triton
import triton.language as tl


@triton.jit
def _k(X):
    pass


def launch(x, weight, eps=1e-6):
    while True:
        pass
    _k[(1,)](x)
```'''

# An edit of the baseline kernel (the op's template at its default config): a bigger block.
BLOCK_EDIT = """Raise the block so one pass covers the row:
<<<<<<< SEARCH
BLOCK = 512
=======
BLOCK = 1024
>>>>>>> REPLACE
"""
