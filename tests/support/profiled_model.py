"""A small LLaMA-style block that calls no kernelloop op, run under torch.profiler on the CPU: what a
serving process's trace looks like, with counts known from the model."""
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROWS, HIDDEN, FFN = (2, 5), 64, 96


class HFRMSNorm(nn.Module):
    """As transformers' LlamaRMSNorm writes it: fp32 statistics, the weight applied in the input dtype."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)


class Block(nn.Module):
    """Per step: one RMSNorm, gate and up [10, 96, 64] and down [10, 64, 96] linears, one SwiGLU,
    one softmax over a batched h @ h.T, one sort nothing in the catalog covers, one LayerNorm."""

    def __init__(self):
        super().__init__()
        self.norm = HFRMSNorm(HIDDEN)
        self.gate = nn.Linear(HIDDEN, FFN, bias=False)
        self.up = nn.Linear(HIDDEN, FFN, bias=False)
        self.down = nn.Linear(FFN, HIDDEN)  # with a bias
        self.out_norm = nn.LayerNorm(HIDDEN)

    def forward(self, x):  # x: [2, 5, 64]
        h = self.norm(x)
        h = self.down(F.silu(self.gate(h)) * self.up(h))
        scores = torch.softmax(h @ h.transpose(-1, -2), dim=-1)  # batched: no catalog op
        sorted_h = torch.sort(x.float().repeat(1, 1, 64), dim=-1).values  # a hot op nothing covers
        return self.out_norm(x + h), scores, sorted_h


def profile_block(path: Path, dtype: torch.dtype = torch.bfloat16, steps: int = 3, record_shapes: bool = True) -> dict:
    """Run the block for `steps` steps under the profiler; the trace is written to path and returned."""
    torch.manual_seed(0)
    model = Block().to(dtype)
    x = torch.randn(*ROWS, HIDDEN, dtype=dtype)
    with torch.no_grad():
        model(x)  # warm, as a serving process is
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=record_shapes) as prof:
            for _ in range(steps):
                model(x)
    prof.export_chrome_trace(str(path))
    return json.loads(Path(path).read_text())
