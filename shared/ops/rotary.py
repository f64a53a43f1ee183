"""Rotary position embedding on one of q or k, x: [tokens, heads, head_dim], with the cos and sin of
each token's position, cos/sin: [tokens, head_dim // 2]. Two layouts of the rotated pairs:
GPT-NeoX (`interleaved=False`: dims i and i + head_dim/2) and GPT-J (`interleaved=True`: dims 2i
and 2i+1). Memory-bound: read x, cos and sin once, write y once.

A variant's launcher is `launch(x, cos, sin, interleaved=False) -> y`, y shaped and typed like x.
make_inputs alternates the layout with the seed's parity, so several trials check both.
"""
import math

import torch

from shared.ops.base import Cost

NAME = "rotary"
DTYPES = ("float32", "float16", "bfloat16")
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
# head_dim/2 not a power of 2 (masked lanes), one head, heads that divide no head block.
ODD_SHAPES = ([3, 5, 10], [1, 1, 2], [7, 3, 66])
THETA = 10000.0


def _pairs(x: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    half = x.shape[-1] // 2
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    return x[..., :half], x[..., half:]


def _join(a: torch.Tensor, b: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack((a, b), dim=-1).flatten(-2)
    return torch.cat((a, b), dim=-1)


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    x1, x2 = _pairs(x.float(), interleaved)
    c, s = cos.float()[:, None, :], sin.float()[:, None, :]  # [tokens, 1, half]: one angle per head
    return _join(x1 * c - x2 * s, x2 * c + x1 * s, interleaved).to(x.dtype)


def eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """A model's rotary without kernelloop (as in HF transformers), in the input's dtype."""
    x1, x2 = _pairs(x, interleaved)
    c, s = cos[:, None, :], sin[:, None, :]
    return _join(x1 * c - x2 * s, x2 * c + x1 * s, interleaved)


def make_inputs(shape: list[int], dtype: torch.dtype, device: str, seed: int) -> tuple:
    if len(shape) != 3 or shape[-1] % 2:
        raise ValueError(f"rotary takes [tokens, heads, head_dim] with an even head_dim, got shape {shape}")
    tokens, _, head_dim = shape
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: large inputs in ms
    x = (torch.randn(shape, generator=g, device=device) * 3.0 + 0.5).to(dtype)
    positions = torch.randint(0, 8192, (tokens,), generator=g, device=device).double()
    inv_freq = THETA ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = positions[:, None] * inv_freq[None, :]  # [tokens, half]
    cos = angles.cos().to(dtype)
    sin = angles.sin().to(dtype)
    return (x, cos, sin, bool(seed % 2))


_ROW_BUCKETS = ((16, "t16"), (256, "t256"), (4096, "t4k"))


def shape_bucket(shape: list[int]) -> str:
    """head_dim and heads exactly, tokens in decode / small / prefill ranges."""
    tokens, heads, head_dim = math.prod(shape[:-2]), shape[-2], shape[-1]
    for limit, name in _ROW_BUCKETS:
        if tokens <= limit:
            return f"d{head_dim}-h{heads}-{name}"
    return f"d{head_dim}-h{heads}-tbig"


def example_shapes(bucket: str) -> list[list[int]]:
    dim_part, heads_part, tokens_part = bucket.split("-")
    tokens = {"t16": 16, "t256": 256, "t4k": 4096, "tbig": 16384}[tokens_part]
    return [[tokens, int(heads_part.removeprefix("h")), int(dim_part.removeprefix("d"))]]


def cost(shape: list[int], dtype: torch.dtype) -> Cost:
    tokens, heads, head_dim = math.prod(shape[:-2]), shape[-2], shape[-1]
    size = torch.empty((), dtype=dtype).element_size()
    return Cost(flops=3 * tokens * heads * head_dim,
                bytes_moved=(2 * tokens * heads * head_dim + tokens * head_dim) * size)


# BLOCK_H heads per program (they share one token's cos and sin), and the warps per program.
SPACE = {"BLOCK_H": [1, 2, 4, 8, 16, 32], "num_warps": [1, 2, 4, 8]}


def prune(params: dict, profile) -> bool:
    heads = max(s.shape[-2] for s in profile)
    return params["BLOCK_H"] > 2 * (1 << (heads - 1).bit_length())


DEFAULT = {"BLOCK_H": 4, "num_warps": 4}

TEMPLATE = '''"""rotary variant: BLOCK_H=$BLOCK_H, num_warps=$num_warps."""
import torch
import triton
import triton.language as tl

BLOCK_H = $BLOCK_H
NUM_WARPS = $num_warps


@triton.jit
def _rotary(X, C, S, Y, n_heads, half, stride_t, stride_h, stride_c,
            BLOCK_H: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, HALF)
    jmask = j < half
    c = tl.load(C + token * stride_c + j, mask=jmask, other=0.0).to(tl.float32)
    s = tl.load(S + token * stride_c + j, mask=jmask, other=0.0).to(tl.float32)
    if INTERLEAVED:
        first, second = 2 * j, 2 * j + 1
    else:
        first, second = j, j + half
    mask = (heads < n_heads)[:, None] & jmask[None, :]
    rows = token * stride_t + heads[:, None].to(tl.int64) * stride_h  # [BLOCK_H, 1]
    x1 = tl.load(X + rows + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + rows + second[None, :], mask=mask, other=0.0).to(tl.float32)
    c, s = c[None, :], s[None, :]
    tl.store(Y + rows + first[None, :], (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + rows + second[None, :], (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def launch(x, cos, sin, interleaved=False):
    shape = x.shape
    head_dim = shape[-1]
    x3 = x.reshape(-1, shape[-2], head_dim).contiguous()  # x3: [tokens, heads, head_dim]
    n_tokens, n_heads, _ = x3.shape
    c, s = cos.reshape(n_tokens, -1).contiguous(), sin.reshape(n_tokens, -1).contiguous()
    if head_dim % 2 or c.shape[1] != head_dim // 2:
        raise ValueError(f"rotary: cos/sin must be [tokens, head_dim // 2], got {list(cos.shape)} for x {list(shape)}")
    y = torch.empty_like(x3)
    if n_tokens and n_heads:
        half = head_dim // 2
        grid = (n_tokens, triton.cdiv(n_heads, BLOCK_H))
        _rotary[grid](x3, c, s, y, n_heads, half, x3.stride(0), x3.stride(1), c.stride(0),
                      BLOCK_H=BLOCK_H, HALF=triton.next_power_of_2(half), INTERLEAVED=bool(interleaved),
                      num_warps=NUM_WARPS)
    return y.reshape(shape)
'''
