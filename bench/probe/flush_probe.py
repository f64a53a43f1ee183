"""The same calls timed after an L2 flush that writes (zero_) and after one that reads (sum): a
written flush leaves dirty lines whose write-back the timed call pays."""
import json
import sys

import torch
import torch.nn.functional as F


def timed(fn, flush, reps=50):
    times = []
    for _ in range(reps):
        flush()
        torch.cuda._sleep(1_000_000)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        times.append((s, e))
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) * 1e3 for s, e in times)[reps // 2]


def main():
    buf = torch.zeros(64 * 2**20, device="cuda")  # 256 MB
    x1 = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    xn = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    g = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    src = torch.randn(8 * 2**20, device="cuda")  # 32 MB
    dst = torch.empty_like(src)
    calls = {"linear 1x4096x4096 (32 MB)": lambda: F.linear(x1, w),
             "rms_norm 2048x4096 eager (32 MB)": lambda: F.rms_norm(xn, (4096,), g, 1e-5),
             "copy 32 MB": lambda: dst.copy_(src)}
    out = {}
    for name, fn in calls.items():
        fn()
        out[name] = {"written flush us": timed(fn, buf.zero_), "read flush us": timed(fn, buf.sum)}
        print(name, out[name], flush=True)
    json.dump(out, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
