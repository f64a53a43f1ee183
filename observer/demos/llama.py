"""A Llama-style decoder stack with random weights whose every norm, projection, rotary embedding and
SwiGLU goes through an `ops` namespace: torch's own ops (`torch_ops()`), or kernelloop's custom ops
(`observer.sdk.ops`, dispatched per shape bucket to the deployed variants). Attention itself is
torch's scaled_dot_product_attention over a KV cache in every case.

    model = Llama(PRESETS["8b"], ops=sdk.ops, device="cuda")
    logits = model(tokens, start_pos=0)        # prefill: tokens [B, S] -> logits of the last position
    logits = model(next_tokens, start_pos=S)   # decode: tokens [B, 1]

`traffic()` yields the demo's shifting workload: decode at batch 1, then at batch 32, then prefills
of 2k tokens.
"""
import math
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Iterator

import torch
import torch.nn.functional as F

from shared.ops import CATALOG


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    layers: int = 4
    vocab: int = 128256
    max_context: int = 4096
    eps: float = 1e-5
    theta: float = 500000.0


# Llama-3's dims with fewer layers (every layer is the same work), and a tiny one for the CPU.
PRESETS = {
    "8b": LlamaConfig(),
    "70b": LlamaConfig(hidden=8192, intermediate=28672, heads=64, layers=2),
    "tiny": LlamaConfig(hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64, layers=2, vocab=512,
                        max_context=256),
}


def torch_ops() -> SimpleNamespace:
    """The catalog's ops as torch runs them without kernelloop (each op's `eager`, else its reference)."""
    return SimpleNamespace(**{name: getattr(op, "eager", op.reference) for name, op in CATALOG.items()})


class Llama(torch.nn.Module):
    def __init__(self, config: LlamaConfig, ops, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0):
        super().__init__()
        self.config, self.ops = config, ops
        c = config
        g = torch.Generator(device=device).manual_seed(seed)

        def weight(*shape):  # scaled as trained layers are, so activations stay O(1) through the stack
            return (torch.randn(shape, generator=g, device=device) / math.sqrt(shape[-1])).to(dtype)

        def norm():
            return (1.0 + 0.1 * torch.randn(c.hidden, generator=g, device=device)).to(dtype)

        qkv = (c.heads + 2 * c.kv_heads) * c.head_dim
        self.embed = torch.randn(c.vocab, c.hidden, generator=g, device=device).to(dtype)
        self.blocks = [SimpleNamespace(attn_norm=norm(), wqkv=weight(qkv, c.hidden),
                                       wo=weight(c.hidden, c.heads * c.head_dim), mlp_norm=norm(),
                                       w_gate_up=weight(2 * c.intermediate, c.hidden),
                                       w_down=weight(c.hidden, c.intermediate)) for _ in range(c.layers)]
        self.final_norm = norm()
        self.lm_head = weight(c.vocab, c.hidden)
        inv_freq = c.theta ** (-torch.arange(0, c.head_dim, 2, device=device, dtype=torch.float64) / c.head_dim)
        angles = torch.arange(c.max_context, device=device, dtype=torch.float64)[:, None] * inv_freq
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)  # [max_context, head_dim / 2]
        self.cache: torch.Tensor | None = None  # [layers, 2, batch, kv_heads, max_context, head_dim]

    def reset_cache(self, batch: int) -> None:
        c = self.config
        self.cache = torch.randn(c.layers, 2, batch, c.kv_heads, c.max_context, c.head_dim,
                                 device=self.embed.device).to(self.embed.dtype)  # random: "earlier" tokens

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """tokens: [B, S] -> logits of the last position, [B, vocab]. A prefill starts at position 0."""
        c, ops = self.config, self.ops
        batch, seq = tokens.shape
        if seq > 1 and start_pos != 0:
            raise ValueError("a prefill (more than one token) must start at position 0")
        if start_pos + seq > c.max_context:
            raise ValueError(f"positions up to {start_pos + seq} exceed max_context {c.max_context}")
        if self.cache is None or self.cache.shape[2] != batch:
            self.reset_cache(batch)
        cos = self.cos[start_pos:start_pos + seq].repeat(batch, 1)  # [B * S, head_dim / 2]
        sin = self.sin[start_pos:start_pos + seq].repeat(batch, 1)
        residual = self.embed[tokens].reshape(batch * seq, c.hidden)  # [B * S, hidden]
        h = ops.rmsnorm(residual, self.blocks[0].attn_norm, c.eps)
        for i, block in enumerate(self.blocks):
            attn = self._attention(i, block, h, cos, sin, batch, seq, start_pos)
            h, residual = ops.rmsnorm_residual(attn, residual, block.mlp_norm, c.eps)
            mlp = ops.matmul(ops.silu_and_mul(ops.matmul(h, block.w_gate_up)), block.w_down)
            next_norm = self.blocks[i + 1].attn_norm if i + 1 < len(self.blocks) else self.final_norm
            h, residual = ops.rmsnorm_residual(mlp, residual, next_norm, c.eps)
        last = h.reshape(batch, seq, c.hidden)[:, -1]  # [B, hidden]
        return ops.matmul(last.contiguous(), self.lm_head)

    def _attention(self, i, block, h, cos, sin, batch, seq, start_pos):
        c, ops = self.config, self.ops
        qkv = ops.matmul(h, block.wqkv)  # [B * S, (heads + 2 kv_heads) * head_dim]
        q, k, v = qkv.split([c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim], dim=-1)
        q = ops.rotary(q.reshape(batch * seq, c.heads, c.head_dim), cos, sin, False)
        k = ops.rotary(k.reshape(batch * seq, c.kv_heads, c.head_dim), cos, sin, False)
        end = start_pos + seq
        keys, values = self.cache[i, 0], self.cache[i, 1]  # [B, kv_heads, max_context, head_dim]
        keys[:, :, start_pos:end] = k.reshape(batch, seq, c.kv_heads, c.head_dim).transpose(1, 2)
        values[:, :, start_pos:end] = v.reshape(batch, seq, c.kv_heads, c.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.reshape(batch, seq, c.heads, c.head_dim).transpose(1, 2),
                                             keys[:, :, :end], values[:, :, :end], is_causal=seq > 1,
                                             enable_gqa=True)
        out = out.transpose(1, 2).reshape(batch * seq, c.heads * c.head_dim)
        return ops.matmul(out, block.wo)


@dataclass(frozen=True)
class Phase:
    name: str
    batch: int
    seq: int  # 1 for decode
    start_pos: int


TRAFFIC = (Phase("decode b1", 1, 1, 1024), Phase("decode b32", 32, 1, 1024), Phase("prefill 2k", 1, 2048, 0))


def fit(phase: Phase, config: LlamaConfig) -> Phase:
    """The phase within the model's context: a decode moves its position back, a prefill longer
    than the context is cut to it (the tiny preset's 256 positions)."""
    seq = min(phase.seq, config.max_context)
    return replace(phase, seq=seq, start_pos=max(0, min(phase.start_pos, config.max_context - seq)))


def traffic(model: Llama, phases=TRAFFIC, steps_per_phase: int = 100, seed: int = 0) -> Iterator[tuple[Phase, torch.Tensor]]:
    """The demo's workload: each phase's steps in turn, yielding (phase, logits) after each step."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for phase in phases:
        config = model.config
        phase = fit(phase, config)
        for _ in range(steps_per_phase):
            tokens = torch.randint(0, config.vocab, (phase.batch, phase.seq), generator=g).to(model.embed.device)
            with torch.no_grad():
                yield phase, model(tokens, phase.start_pos)
