"""A small LLaMA-style block that calls no kernelloop op, and tiny transformers models (Llama, Gemma,
Phi-3) from a config, run under torch.profiler on the CPU: what a serving process's trace looks like,
with counts known from the model."""
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


# ---- tiny transformers models, random weights from a config (no download) -------------------------

TOKENS = (2, 5)  # [batch, seq] of the token ids each step runs
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)


def tiny_transformers(name: str, dtype: torch.dtype = torch.bfloat16, **overrides):
    """transformers' <name>ForCausalLM ("Llama", "Gemma", "Phi3") from the TINY config, seeded."""
    import transformers

    config = getattr(transformers, f"{name}Config")(**{**TINY, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(config).to(dtype).eval()


def profile_transformers(path: Path, model, steps: int = 2) -> dict:
    """`steps` forwards of the model over TOKENS under the profiler, after one warm one."""
    tokens = torch.randint(0, model.config.vocab_size, TOKENS, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(tokens)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                model(tokens)
    prof.export_chrome_trace(str(path))
    return json.loads(Path(path).read_text())
