"""The demo's decoder stack as transformers builds it: a LlamaForCausalLM with the dims of an
observer/demos/llama.py preset and random weights (nothing is downloaded), patched in place by
kernelloop.patch, so its norms, SwiGLU MLPs and rotary embedding go through kernelloop's ops while
its projections and lm_head (nn.Linear) stay torch's. transformers is a dev dependency: imported
here, when the model is built, never by the workload's other paths.

    model = HfLlama(PRESETS["8b"], device="cuda")
    logits = model(tokens, start_pos)    # same call as llama.Llama: [B, S] -> [B, vocab]
"""
import inspect

import torch

from observer.demos.llama import LlamaConfig
from observer.sdk import PatchReport, patch, patched


class HfLlama:
    """Called like llama.Llama. A decode step attends over a KV cache of start_pos random "earlier"
    tokens, rebuilt from the same tensors at every step, so every step of a phase is the same work;
    a prefill starts from an empty cache."""

    def __init__(self, config: LlamaConfig, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
        try:
            from transformers import DynamicCache, LlamaForCausalLM
            from transformers import LlamaConfig as HfConfig
        except ImportError as e:
            raise ModuleNotFoundError(f"--model hf needs transformers (pip install 'transformers>=4.48,<6'): {e}") \
                from None
        c = config
        # rope_theta: transformers 5 moves it into rope_parameters and still takes the old name
        hf_config = HfConfig(hidden_size=c.hidden, intermediate_size=c.intermediate, num_attention_heads=c.heads,
                             num_key_value_heads=c.kv_heads, head_dim=c.head_dim, num_hidden_layers=c.layers,
                             vocab_size=c.vocab, max_position_embeddings=c.max_context, rms_norm_eps=c.eps,
                             rope_theta=c.theta, tie_word_embeddings=False, attn_implementation="sdpa")
        torch.manual_seed(seed)
        with torch.device(device):  # initialised where it runs: an 8b-dims stack in seconds, not minutes
            self.model = LlamaForCausalLM(hf_config).to(dtype).eval()
        patch(self.model)
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self._new_cache = DynamicCache
        # batch -> keys and values of each layer, [B, kv_heads, start_pos, head_dim] each
        self._prefix: dict[int, list[torch.Tensor]] = {}
        params = inspect.signature(self.model.forward).parameters
        # the names moved between transformers 4.48 and 5: ask the installed version
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_arg = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)
        self._cache_position = "cache_position" in params

    @property
    def report(self) -> PatchReport:
        return patched(self.model)

    def describe(self) -> str:
        swapped = self.report.swapped.values()
        counts = {op: sum(1 for s in swapped if s == op) for op in ("rmsnorm", "silu_and_mul", "rotary")}
        return (f"transformers LlamaForCausalLM, kernelloop.patch: {counts['rmsnorm']} RMSNorm -> rmsnorm, "
                f"{counts['silu_and_mul']} SwiGLU MLP -> silu_and_mul, {counts['rotary']} attention -> rotary; "
                "projections and lm_head (nn.Linear) stay torch's matmuls")

    def _cache(self, batch: int, start_pos: int):
        c, cache = self.config, self._new_cache()
        if start_pos:
            prefix = self._prefix.get(batch)
            if prefix is None or prefix[0].shape[2] != start_pos:
                shape = (batch, c.kv_heads, start_pos, c.head_dim)
                prefix = self._prefix[batch] = [torch.randn(shape, device=self.device, dtype=self.dtype)
                                                for _ in range(2 * c.layers)]
            for layer in range(c.layers):
                cache.update(prefix[2 * layer], prefix[2 * layer + 1], layer)
        return cache

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """tokens: [B, S] -> logits of the last position, [B, vocab]. A prefill starts at position 0."""
        batch, seq = tokens.shape
        if seq > 1 and start_pos != 0:
            raise ValueError("a prefill (more than one token) must start at position 0")
        positions = torch.arange(start_pos, start_pos + seq, device=self.device)
        kwargs = {self._cache_arg: self._cache(batch, start_pos), "use_cache": True,
                  "position_ids": positions.expand(batch, seq)}
        if self._keep_arg:
            kwargs[self._keep_arg] = 1  # lm_head on the last position only, as a server samples
        if self._cache_position:
            kwargs["cache_position"] = positions
        return self.model(input_ids=tokens, **kwargs).logits[:, -1]
