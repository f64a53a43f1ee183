"""Scripted LLM answers for the KernelBench-format op tests/data/kernelbench/row_scale.py."""

KERNEL_SOURCE = '''import torch
import triton
import triton.language as tl


@triton.jit
def _row_scale(X, Y, n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    peak = tl.max(tl.abs(x), axis=1)
    y = x / (peak[:, None] + 1e-6)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def launch(x):
    x2 = x.contiguous()
    y = torch.empty_like(x2)
    n_rows, n_cols = x2.shape
    rows = min(triton.next_power_of_2(n_rows), 1024)  # few programs: each costs the most
    _row_scale[(triton.cdiv(n_rows, rows),)](x2, y, n_rows, n_cols, ROWS=rows, BLOCK=triton.next_power_of_2(n_cols))
    return y
'''

GOOD = f"All rows of a block at once, the max per row in registers:\n```python\n{KERNEL_SOURCE}```\n"
