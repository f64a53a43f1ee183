"""y = x @ w.T with w stored as in nn.Linear, w: [N, K], x: [..., K] -> y: [..., N]; the op's shape is
[M, N, K] with M the rows of x. Decode (M up to 64) is bound by reading w once; there split-K keeps
every SM streaming w when N alone gives too few tiles. Prefill is bound by the tensor cores.

A variant's launcher is `launch(x, w) -> y`, y typed like x. Three kernels: BLOCK_M = 1 is a GEMV (no
tensor cores; at M = 1 only reading w counts); TMA = 1 a persistent tensor-descriptor kernel for
large tiles; otherwise a pointer kernel, where with SPLIT_K > 1 each split writes an fp32 partial and
a second kernel sums them in a fixed order (no atomics: results are reproducible).
"""
import math

import torch
import torch.nn.functional as F

from shared.ops.base import Cost

NAME = "matmul"
DTYPES = ("float16", "bfloat16")
# fp32 accumulation in both; K up to ~30k products per output adds to the output's one rounding.
TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2}
# M, N and K that divide no block, M = 1 (decode), and K long enough for several K steps.
# The last one has 16-byte aligned rows, so TMA variants take their descriptor path on it.
ODD_SHAPES = ([3, 37, 53], [1, 19, 100], [17, 33, 300], [37, 40, 136])


def op_shape(x: torch.Tensor, w: torch.Tensor) -> list[int]:
    """[M, N, K] of a call: what buckets, profiles and make_inputs speak of."""
    return [math.prod(x.shape[:-1]), w.shape[0], x.shape[-1]]


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float() @ w.float().T).to(x.dtype)


def eager(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)  # cuBLAS


def make_inputs(shape: list[int], dtype: torch.dtype, device: str, seed: int) -> tuple:
    if len(shape) != 3:
        raise ValueError(f"matmul's shape is [M, N, K], got {shape}")
    m, n, k = shape
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: large inputs in ms
    x = (torch.randn((m, k), generator=g, device=device) * 2.0 + 0.25).to(dtype)
    # scaled as a trained layer is, so outputs stay O(1) for any K (fp16 cannot overflow)
    w = (torch.randn((n, k), generator=g, device=device) / math.sqrt(k) - 0.01).to(dtype)
    return (x, w)


_M_BUCKETS = ((1, "m1"), (16, "m16"), (64, "m64"), (256, "m256"), (2048, "m2k"))


def shape_bucket(shape: list[int]) -> str:
    """N and K exactly (a layer's weight), M in decode / small batch / prefill ranges."""
    m, n, k = shape
    for limit, name in _M_BUCKETS:
        if m <= limit:
            return f"n{n}-k{k}-{name}"
    return f"n{n}-k{k}-mbig"


def example_shapes(bucket: str) -> list[list[int]]:
    n_part, k_part, m_part = bucket.split("-")
    m = {"m1": 1, "m16": 16, "m64": 64, "m256": 256, "m2k": 2048, "mbig": 8192}[m_part]
    return [[m, int(n_part.removeprefix("n")), int(k_part.removeprefix("k"))]]


def cost(shape: list[int], dtype: torch.dtype) -> Cost:
    m, n, k = shape
    size = torch.empty((), dtype=dtype).element_size()
    return Cost(flops=2 * m * n * k, bytes_moved=(m * k + n * k + m * n) * size)


SPACE = {
    # BLOCK_M = 1 is the GEMV kernel (one row of x per program, no tensor cores): it wins at M = 1
    # with narrow column blocks and long K steps; from 16 up, tiles go through tl.dot.
    "BLOCK_M": [1, 16, 32, 64, 128, 256],
    "BLOCK_N": [4, 8, 16, 32, 64, 128, 256],
    "BLOCK_K": [32, 64, 128, 256, 512],
    "SPLIT_K": [1, 2, 4, 8, 16],
    "GROUP_M": [1, 8],
    # 1: a persistent kernel (one program per SM) whose loads and stores are TMA copies through
    # tensor descriptors; the pointer kernel serves calls whose rows are not 16-byte aligned.
    "TMA": [0, 1],
    "num_warps": [4, 8],
    "num_stages": [2, 3, 4, 5],
}

_SMEM_BYTES = 227 * 1024  # a Hopper SM's shared memory per block
_SMS = 132


def prune(params: dict, profile) -> bool:
    """Points that cannot win or cannot fit: GEMV for more than one row, tiles taller than the
    batch, pipelines that do not fit shared memory, splits of K that leave a split empty or that a
    grid already full of tiles does not need, accumulators that would spill."""
    m = max(s.shape[0] for s in profile)
    n = min(s.shape[1] for s in profile)
    k = min(s.shape[2] for s in profile)
    bm, bn, bk, split = params["BLOCK_M"], params["BLOCK_N"], params["BLOCK_K"], params["SPLIT_K"]
    warps, stages, tma = params["num_warps"], params["num_stages"], params.get("TMA", 0)
    if bm == 1:
        # GEMV: each row re-reads w (from L2 at best), so only M = 1 pays; splits, TMA and the
        # grouping order mean nothing to it (one canonical point each).
        per_thread = bn * bk // (32 * warps)
        return m > 1 or split > 1 or tma or params["GROUP_M"] != 8 or not 8 <= per_thread <= 128 or bk > k
    if bn < 32 or bm > max(16, 1 << (m - 1).bit_length()):
        return True
    if tma:
        # wgmma tiles, no split; the output tile is staged in shared memory for its TMA store
        return (bm < 64 or split > 1
                or (bm * bk + bn * bk) * 2 * stages + bm * bn * 2 > _SMEM_BYTES
                or bm * bn // (32 * warps) > 256)
    if (bm * bk + bn * bk) * 2 * stages > _SMEM_BYTES:
        return True
    if split > 1 and (bk * split > k or math.ceil(m / bm) * math.ceil(n / bn) >= 2 * _SMS):
        return True
    return bm * bn // (32 * warps) > 256


DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 8, "TMA": 0, "num_warps": 4,
           "num_stages": 3}


def _point(bm, bn, bk, split, warps, stages, group=8, tma=0):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": group, "TMA": tma,
            "num_warps": warps, "num_stages": stages}


# Points worth trying first (prune drops those that do not fit a profile), from an H100 sweep
# (docs/results): GEMV with 4-16 columns and 512-wide K steps at M = 1; tl.dot tiles with split-K
# for small batches; persistent TMA tiles of 128 x 256 for prefill.
SEEDS = ([_point(1, bn, 512, 1, warps, stages) for bn, warps, stages in
          ((4, 4, 3), (4, 4, 2), (8, 4, 3), (8, 8, 3), (16, 4, 2), (16, 8, 3), (8, 4, 4))]
         + [_point(16, bn, bk, split, 4, stages) for bn, bk, stages in ((32, 256, 3), (64, 128, 4), (64, 256, 3),
                                                                      (128, 128, 3))
            for split in (1, 2, 4, 8)]
         + [_point(32, 64, 128, split, 4, 4) for split in (1, 2, 4)]
         + [_point(64, 64, 128, split, 4, 4) for split in (1, 2)]
         + [_point(128, 256, 64, 1, 8, 3, tma=1), _point(256, 128, 64, 1, 8, 3, tma=1),
            _point(128, 128, 64, 1, 8, 4, tma=1), _point(64, 256, 64, 1, 4, 4, tma=1),
            _point(128, 128, 128, 1, 8, 3, tma=1), _point(128, 128, 64, 1, 4, 4, tma=1)]
         + [_point(128, 256, 64, 1, 8, 3), _point(128, 128, 64, 1, 4, 4), _point(128, 128, 64, 1, 8, 4),
            _point(64, 256, 64, 1, 4, 4), _point(64, 128, 64, 1, 4, 4), _point(128, 64, 64, 1, 4, 4)])

TEMPLATE = '''"""matmul variant: BLOCK_M=$BLOCK_M, BLOCK_N=$BLOCK_N, BLOCK_K=$BLOCK_K, SPLIT_K=$SPLIT_K,
GROUP_M=$GROUP_M, TMA=$TMA, num_warps=$num_warps, num_stages=$num_stages."""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

BLOCK_M = $BLOCK_M
BLOCK_N = $BLOCK_N
BLOCK_K = $BLOCK_K
SPLIT_K = $SPLIT_K
GROUP_M = $GROUP_M
TMA = $TMA
NUM_WARPS = $num_warps
NUM_STAGES = $num_stages


@triton.jit
def _gemv(X, W, Y, M, N, K, stride_xm, stride_wn, stride_ym, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          EVEN_K: tl.constexpr):
    # one row of x per program, rows sharing a column block adjacent (the block stays in L2);
    # products pile up elementwise and are reduced once at the end, not per K step
    pid = tl.program_id(0)
    row = pid % M
    rn = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + row.to(tl.int64) * stride_xm + rk
    w_ptrs = W + (rn % N)[:, None].to(tl.int64) * stride_wn + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            kmask = rk + k < K
            a = tl.load(x_ptrs, mask=kmask, other=0.0)
            b = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
        acc += b.to(tl.float32) * a.to(tl.float32)[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    tl.store(Y + row.to(tl.int64) * stride_ym + rn, y.to(Y.dtype.element_ty), mask=rn < N)


@triton.jit
def _tile(tile, grid_m, grid_n, GROUP_M: tl.constexpr):
    # grouped order: GROUP_M row tiles share each column tile of w while it is in L2
    per_group = GROUP_M * grid_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@triton.jit
def _matmul_tma(x_desc, w_desc, y_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, UPCAST: tl.constexpr):
    # persistent: PROGRAMS programs walk the tiles; descriptors zero-fill reads past the edges
    # and clip the stores, so no masks at all
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile(tile, grid_m, grid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_steps):
            a = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            if UPCAST:  # the interpreter computes on bf16 only after an upcast
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b.T, acc)
        y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(y_desc.dtype))


@triton.jit
def _matmul(X, W, Y, P, M, N, K, stride_xm, stride_wn, stride_ym, k_per_split,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
            GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # out-of-range rows and columns read a valid row instead (their results are never stored),
    # so only K needs masks, and none when it divides evenly
    rm_safe = rm % M
    rn_safe = rn % N
    k0 = pid_k * k_per_split
    rk = k0 + tl.arange(0, BLOCK_K)
    x_ptrs = X + rm_safe[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptrs = W + rn_safe[:, None].to(tl.int64) * stride_wn + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            kmask = (rk + k < K) & (rk + k < k0 + k_per_split)
            a = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
        if UPCAST:  # the interpreter computes on bf16 only after an upcast
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT_K == 1:
        tl.store(Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.store(P + pid_k.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=mask)


@triton.jit
def _sum_splits(P, Y, size, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # fixed order: the same inputs give the same bits
        acc += tl.load(P + s * size + offs, mask=mask, other=0.0)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


def _tma_ready(*tensors) -> bool:
    # a TMA descriptor needs 16-byte aligned rows and base addresses
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)


def _programs(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs still walk several tiles each


def launch(x, w):
    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k).contiguous()  # x2: [M, K]
    w2 = w.contiguous()  # w2: [N, K]
    if w2.shape[1] != k:
        raise ValueError(f"matmul: x {list(shape)} and w {list(w.shape)} disagree on K")
    m, n = x2.shape[0], w2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    upcast = x.device.type == "cpu" and x.dtype == torch.bfloat16
    if not (m and n):
        pass
    elif BLOCK_M == 1:
        _gemv[(m * triton.cdiv(n, BLOCK_N),)](x2, w2, y, m, n, k, x2.stride(0), w2.stride(0), y.stride(0),
                                             BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN_K=k % BLOCK_K == 0,
                                             num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    elif TMA and _tma_ready(x2, w2, y):
        programs = min(_programs(x.device), triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N))
        _matmul_tma[(programs,)](TensorDescriptor(x2, [m, k], [k, 1], [BLOCK_M, BLOCK_K]),
                                 TensorDescriptor(w2, [n, k], [k, 1], [BLOCK_N, BLOCK_K]),
                                 TensorDescriptor(y, [m, n], [n, 1], [BLOCK_M, BLOCK_N]),
                                 m, n, k, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                                 PROGRAMS=programs, UPCAST=upcast, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    else:
        split = SPLIT_K if k >= SPLIT_K * BLOCK_K else 1
        k_per_split = triton.cdiv(triton.cdiv(k, split), BLOCK_K) * BLOCK_K
        even_k = k % BLOCK_K == 0 and k_per_split * split == k
        partials = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N), split)
        _matmul[grid](x2, w2, y, partials, m, n, k, x2.stride(0), w2.stride(0), y.stride(0), k_per_split,
                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT_K=split, GROUP_M=GROUP_M,
                      EVEN_K=even_k, UPCAST=upcast, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        if split > 1:
            _sum_splits[(triton.cdiv(m * n, 1024),)](partials, y, m * n, SPLIT_K=split, BLOCK=1024, num_warps=4)
    return y.reshape(*shape[:-1], n)
'''
