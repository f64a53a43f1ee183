"""Exploration on a GPU: GEMV kernels for decode and persistent TMA kernels for prefill against cuBLAS
(triton.testing.do_bench, whose L2 flush writes). Output: docs/results/matmul-probe-*.json; what
won became shared/ops/matmul.py's SEEDS. Run: python3 bench/probe/matmul_probe.py OUT.json"""
import itertools
import json
import sys
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _gemv(X, W, Y, M, N, K, sxm, swn, sym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ACC3D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + (rm % M)[:, None].to(tl.int64) * sxm + rk[None, :]
    w_ptrs = W + (rn % N)[:, None].to(tl.int64) * swn + rk[None, :]
    if ACC3D:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            kmask = rk + k < K
            a = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
        prod = a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :]
        if ACC3D:
            acc3 += prod
        else:
            acc += tl.sum(prod, axis=2)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if ACC3D:
        acc = tl.sum(acc3, axis=2)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(Y + rm[:, None].to(tl.int64) * sym + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def gemv(x, w, bm, bn, bk, warps, stages, acc3d):
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _gemv[grid](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                EVEN_K=k % bk == 0, ACC3D=acc3d, num_warps=warps, num_stages=stages)
    return y


@triton.jit
def _tile(tile_id, grid_m, grid_n, GROUP_M: tl.constexpr):
    per_group = GROUP_M * grid_n
    first_m = (tile_id // per_group) * GROUP_M
    rows = min(grid_m - first_m, GROUP_M)
    return first_m + (tile_id % per_group) % rows, (tile_id % per_group) // rows


@triton.jit
def _mm_tma(a_desc, b_desc, c_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr, NUM_SMS: tl.constexpr):
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    if PERSISTENT:
        for tile_id in tl.range(tl.program_id(0), grid_m * grid_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile(tile_id, grid_m, grid_n, GROUP_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
                b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
                acc = tl.dot(a, b.T, acc)
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))
    else:
        pid_m, pid_n = _tile(tl.program_id(0), grid_m, grid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))


SMS = torch.cuda.get_device_properties(0).multi_processor_count


def mm_tma(x, w, bm, bn, bk, warps, stages, persistent, group=8):
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    a = TensorDescriptor(x, [m, k], [k, 1], [bm, bk])
    b = TensorDescriptor(w, [n, k], [k, 1], [bn, bk])
    c = TensorDescriptor(y, [m, n], [n, 1], [bm, bn])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    grid = (min(SMS, tiles),) if persistent else (tiles,)
    _mm_tma[grid](a, b, c, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, PERSISTENT=persistent,
                  NUM_SMS=SMS, num_warps=warps, num_stages=stages)
    return y


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def main():
    out = []
    dt = torch.bfloat16
    decode = [[1, 4096, 4096], [1, 6144, 4096], [1, 28672, 4096], [1, 4096, 14336], [4, 4096, 4096],
              [16, 4096, 14336], [16, 28672, 4096], [1, 128256, 4096]]
    prefill = [[2048, 4096, 4096], [2048, 6144, 4096], [2048, 4096, 14336], [4096, 8192, 8192]]
    t0 = time.time()
    for m, n, k in decode:
        x = torch.randn(m, k, device="cuda", dtype=dt)
        w = torch.randn(n, k, device="cuda", dtype=dt) / k ** 0.5
        ref = torch.nn.functional.linear(x, w)
        cub = bench(lambda: torch.nn.functional.linear(x, w))
        res = []
        configs = []
        for bm in [b for b in (1, 2, 4, 8, 16) if b <= max(1, m) and (m <= 4 or b >= 4)]:
            for bn, bk, warps, stages in itertools.product([4, 8, 16, 32, 64], [128, 256, 512], [4, 8], [2, 3, 4]):
                for acc3d in ([False, True] if bm == 1 else [False]):
                    per_thread = bm * bn * bk / (32 * warps)
                    if per_thread > (128 if acc3d or bm > 1 else 256) or per_thread < 8:
                        continue
                    configs.append((bm, bn, bk, warps, stages, acc3d))
        import random
        random.Random(0).shuffle(configs)
        t_shape = time.time()
        for bm, bn, bk, warps, stages, acc3d in configs:
            if time.time() - t_shape > 30:
                break
            try:
                y = gemv(x, w, bm, bn, bk, warps, stages, acc3d)
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                if not err < 1e-2:
                    res.append((None, (bm, bn, bk, warps, stages, acc3d), f"err {err}"))
                    continue
                res.append((bench(lambda: gemv(x, w, bm, bn, bk, warps, stages, acc3d)), (bm, bn, bk, warps, stages, acc3d), ""))
            except Exception as e:
                res.append((None, (bm, bn, bk, warps, stages, acc3d), str(e)[:100]))
        ok = sorted(r for r in res if r[0] is not None)
        floor = (m * k + n * k + m * n) * 2 / 3.0e12 * 1e6
        print(f"decode {m}x{n}x{k}: cublas {cub:.1f} us  floor {floor:.1f}  tried {len(res)}/{len(configs)} ok {len(ok)}", flush=True)
        for r in ok[:6]:
            print(f"   {r[0]:.1f} us  {cub / r[0]:.2f}x  {r[1]}", flush=True)
        bad = [r for r in res if r[0] is None][:3]
        for r in bad:
            print("   fail", r[1], r[2], flush=True)
        out.append({"shape": [m, n, k], "cublas": cub, "best": [(r[0], r[1]) for r in ok[:10]]})
    for m, n, k in prefill:
        x = torch.randn(m, k, device="cuda", dtype=dt)
        w = torch.randn(n, k, device="cuda", dtype=dt) / k ** 0.5
        ref = torch.nn.functional.linear(x, w)
        cub = bench(lambda: torch.nn.functional.linear(x, w))
        res = []
        for (bm, bn, bk, warps, stages), persistent in itertools.product(
                [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4),
                 (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 128, 8, 2), (64, 256, 64, 4, 4)], [False, True]):
            try:
                y = mm_tma(x, w, bm, bn, bk, warps, stages, persistent)
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                if not err < 1e-2:
                    res.append((None, (bm, bn, bk, warps, stages, persistent), f"err {err}"))
                    continue
                res.append((bench(lambda: mm_tma(x, w, bm, bn, bk, warps, stages, persistent)),
                            (bm, bn, bk, warps, stages, persistent), ""))
            except Exception as e:
                res.append((None, (bm, bn, bk, warps, stages, persistent), str(e)[:200]))
        ok = sorted(r for r in res if r[0] is not None)
        print(f"prefill {m}x{n}x{k}: cublas {cub:.1f} us  ok {len(ok)}/{len(res)}", flush=True)
        for r in ok[:5]:
            print(f"   {r[0]:.1f} us  {cub / r[0]:.2f}x  {r[1]}", flush=True)
        for r in [r for r in res if r[0] is None][:3]:
            print("   fail", r[1], r[2], flush=True)
        out.append({"shape": [m, n, k], "cublas": cub, "best": [(r[0], r[1]) for r in ok[:10]]})
    json.dump(out, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
