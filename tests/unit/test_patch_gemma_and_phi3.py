"""patch(model) on random-weight transformers Gemma and Phi-3 from tiny configs (no download): Gemma's
x * rstd * (1 + weight) norms served by ops.rmsnorm with 1 + weight, kept in step with the weight;
Phi-3's fused gate_up_proj MLP served by ops.silu_and_mul; the same logits as unpatched, look-alikes
left, unpatch restoring modules and functions."""
import gc

import pytest
import torch

from observer.sdk.patching import patch, patched, unpatch
from support.profiled_model import TOKENS, tiny_transformers
from test_patch import TOLERANCE, _counts, _dtypes, _ops_called, _rel, windows  # noqa: F401 (windows: a fixture)

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
from transformers.models.gemma import modeling_gemma  # noqa: E402
from transformers.models.phi3 import modeling_phi3  # noqa: E402

IDS = torch.randint(0, 128, TOKENS, generator=torch.Generator().manual_seed(1))  # [batch, seq]
LAYERS = 2  # support.profiled_model.TINY


@pytest.fixture(autouse=True)
def _no_patched_model_left():
    yield
    gc.collect()
    for modeling in (modeling_gemma, modeling_phi3):
        assert modeling.apply_rotary_pos_emb.__module__ == modeling.__name__


def _gemma(dtype=torch.float32, **config):
    model = tiny_transformers("Gemma", dtype, **config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # HF initialises them to 0, where 1 + weight is 1: make the weight count
        for m in model.modules():
            if isinstance(m, modeling_gemma.GemmaRMSNorm):
                m.weight.copy_(0.5 * torch.randn(m.weight.shape, generator=g))
    return model


# ---- Gemma: RMSNorm with 1 + weight ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", _dtypes())
@torch.no_grad()
def test_patched_gemma_gives_the_same_logits_and_serves_its_norms_by_rmsnorm(dtype, windows):
    model = _gemma(dtype)
    expected = model(IDS).logits
    windows.flush(0.0)
    patch(model)
    report = patched(model)
    # 2 norms a layer and the final one; Gemma's MLP gates with GELU (tanh): no catalog op, left
    assert _counts(report.swapped) == {"rmsnorm": 2 * LAYERS + 1, "rotary": LAYERS}
    assert set(report.left) == {f"model.layers.{i}.mlp" for i in range(LAYERS)}
    assert type(model.model.norm).__name__ == "PatchedRMSNorm" and model.model.norm.offset == 1.0
    assert _rel(model(IDS).logits, expected) <= TOLERANCE[dtype]
    assert _ops_called(windows) == {"rmsnorm": 2 * LAYERS + 1, "rotary": 2 * LAYERS}
    unpatch(model)


@torch.no_grad()
def test_unpatch_restores_gemmas_norms_function_and_logits():
    model = _gemma()
    modules, keys = dict(model.named_modules()), set(model.state_dict())
    original_fn = modeling_gemma.apply_rotary_pos_emb
    expected = model(IDS).logits
    patch(model)
    assert set(model.state_dict()) == keys, "the patched norm shares the weight under its name"
    unpatch(model)
    after = dict(model.named_modules())
    assert after.keys() == modules.keys() and all(after[name] is m for name, m in modules.items())
    assert isinstance(model.model.norm, modeling_gemma.GemmaRMSNorm)
    assert modeling_gemma.apply_rotary_pos_emb is original_fn and patched(model) is None
    assert torch.equal(model(IDS).logits, expected)


@torch.no_grad()
def test_gemma_norm_follows_its_weight_after_patching():
    """1 + weight is made once; a weight loaded, changed in place or moved to another dtype after
    patching is what the patched norm uses, not the one it saw at patch time."""
    model = _gemma()
    norm = model.model.norm
    x = torch.randn(3, 64)
    patch(model)
    served = model.model.norm
    assert torch.allclose(served(x), norm(x), atol=1e-5)
    state = {k: v + 0.25 if k.endswith("norm.weight") else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # copies into the parameter in place
    assert torch.allclose(served(x), norm(x), atol=1e-5)
    norm.weight.mul_(-1)  # the weight the patched norm shares, changed in place
    assert torch.allclose(served(x), norm(x), atol=1e-5)
    model.to(torch.float64)  # new storage
    assert torch.allclose(served(x.double()), norm(x.double()), atol=1e-10)
    unpatch(model)


class OffsetRMSNorm(torch.nn.Module):
    """Written like Gemma's, with another offset: computes neither form, so it stays."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = torch.nn.Parameter(0.5 * torch.randn(hidden))
        self.eps = 1e-6

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (2.0 + self.weight.float())).type_as(x)


def test_a_norm_with_another_offset_is_left():
    model = torch.nn.Sequential(OffsetRMSNorm(64))
    patch(model)
    assert patched(model).swapped == {} and set(patched(model).left) == {"0"}
    unpatch(model)


# ---- Phi-3: fused gate_up_proj ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", _dtypes())
@torch.no_grad()
def test_patched_phi3_gives_the_same_logits_and_serves_gate_up_by_silu_and_mul(dtype, windows):
    model = tiny_transformers("Phi3", dtype)
    keys = set(model.state_dict())
    expected = model(IDS).logits
    windows.flush(0.0)
    patch(model)
    report = patched(model)
    assert _counts(report.swapped) == {"rmsnorm": 2 * LAYERS + 1, "silu_and_mul": LAYERS, "rotary": LAYERS}
    assert report.left == {}
    mlp = model.model.layers[0].mlp
    assert type(mlp).__name__ == "PatchedGateUp" and set(model.state_dict()) == keys
    assert _rel(model(IDS).logits, expected) <= TOLERANCE[dtype]
    assert _ops_called(windows) == {"rmsnorm": 2 * LAYERS + 1, "silu_and_mul": LAYERS, "rotary": 2 * LAYERS}
    unpatch(model)
    assert isinstance(model.model.layers[0].mlp, modeling_phi3.Phi3MLP)
    assert torch.equal(model(IDS).logits, expected)


class UpFirstMLP(torch.nn.Module):
    """Written like Phi-3's MLP but the up half first: the op's gate half would be the wrong one."""

    def __init__(self, hidden: int = 32, intermediate: int = 48):
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = torch.nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        up, gate = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * torch.nn.functional.silu(gate))


@torch.no_grad()
def test_fused_gate_up_look_alikes_are_left():
    gelu = tiny_transformers("Phi3", torch.float32, hidden_act="gelu")
    model = torch.nn.ModuleDict({"gelu": gelu, "up_first": UpFirstMLP()})
    patch(model)
    left = patched(model).left
    assert {f"gelu.model.layers.{i}.mlp" for i in range(LAYERS)} | {"up_first"} == set(left)
    assert "silu_and_mul" not in patched(model).swapped.values()
    assert isinstance(model["up_first"], UpFirstMLP)
    unpatch(model)
