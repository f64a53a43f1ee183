"""The decoder stack: the same weights give the same logits through torch's ops and kernelloop's,
for a prefill and the decode step after it; bad positions are refused."""
import pytest
import torch

from observer.demos.llama import Llama, LlamaConfig, torch_ops
from observer.sdk import ops
from shared import hardware

# one small layer: the interpreter runs kernelloop's side
CONFIG = LlamaConfig(hidden=64, intermediate=96, heads=2, kv_heads=1, head_dim=32, layers=1, vocab=64, max_context=16)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_torch_and_kernelloop_ops_give_the_same_logits_for_prefill_and_decode():
    device = hardware.device()
    eager = Llama(CONFIG, torch_ops(), device=device, dtype=torch.float16, seed=3)
    served = Llama(CONFIG, ops, device=device, dtype=torch.float16, seed=3)
    tokens = torch.randint(0, CONFIG.vocab, (2, 5), generator=torch.Generator().manual_seed(0)).to(device)
    for model in (eager, served):
        model.reset_cache(2)
    served.cache = eager.cache.clone()
    prefill = eager(tokens, 0), served(tokens, 0)
    assert prefill[0].shape == (2, CONFIG.vocab)
    assert _rel(prefill[1], prefill[0]) < 2e-2
    step = eager(tokens[:, :1], 5), served(tokens[:, :1], 5)
    assert _rel(step[1], step[0]) < 2e-2


def test_a_prefill_that_does_not_start_at_zero_or_overruns_the_context_is_refused():
    model = Llama(CONFIG, torch_ops(), device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="position 0"):
        model(torch.zeros(1, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_context"):
        model(torch.zeros(1, 1, dtype=torch.long), CONFIG.max_context)
