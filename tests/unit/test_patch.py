"""patch(model) on a random-weight transformers Llama and on a plain torch.nn model: the same outputs
as unpatched per dtype, every supported block served by its op, look-alikes that compute something
else left alone, unpatch restoring the original modules and function, patching twice harmless."""
import pytest
import torch

from observer.sdk import customops
from observer.sdk.patching import patch, patched, unpatch
from shared.windows import WindowAggregator

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
from transformers.models.llama import modeling_llama  # noqa: E402

# Relative norm error of a whole model's outputs: the op's own tolerance, grown by the layers after it.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _cpu_runs(dtype: torch.dtype) -> bool:
    try:
        x = torch.ones(2, 4, dtype=dtype)
        torch.nn.functional.linear(x, x).softmax(-1)
        return True
    except RuntimeError:
        return False


def _dtypes():
    return [torch.float32] + [pytest.param(d, marks=pytest.mark.skipif(not _cpu_runs(d), reason=f"no {d} on this CPU"))
                              for d in HALF_DTYPES]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(autouse=True)
def _no_patched_model_left():
    """Every test unpatches what it patched: the module-level function is torch's again after."""
    yield
    import gc

    gc.collect()  # a test that failed midway drops its patched model; collection releases it
    assert modeling_llama.apply_rotary_pos_emb.__module__ == modeling_llama.__name__


@pytest.fixture
def windows():
    """Calls the ops serve, as the runtime's windows would see them."""
    customops.dispatcher.windows = WindowAggregator("cpu-interpreter", "h:1", start=0.0)
    yield customops.dispatcher.windows
    customops.dispatcher.windows = None


def _ops_called(windows) -> dict[str, int]:
    calls: dict[str, int] = {}
    for s in windows.flush(1.0):
        calls[s.key.op] = calls.get(s.key.op, 0) + s.calls
    return calls


# ---- a tiny transformers Llama, random weights, built here -----------------------------------------

def _llama(dtype=torch.float32):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


TOKENS = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
LLAMA_SWAPS = {"rmsnorm": 5, "silu_and_mul": 2, "rotary": 2}  # 2 norms a layer + the final one


def _counts(swapped: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in swapped.values():
        counts[op] = counts.get(op, 0) + 1
    return counts


@pytest.mark.parametrize("dtype", _dtypes())
@torch.no_grad()
def test_patched_llama_gives_the_same_logits_and_serves_every_block_by_its_op(dtype, windows):
    model = _llama(dtype)
    expected = model(TOKENS).logits
    windows.flush(0.0)
    patch(model)
    got = model(TOKENS).logits
    assert _counts(patched(model).swapped) == LLAMA_SWAPS and patched(model).left == {}
    assert _rel(got, expected) <= TOLERANCE[dtype]
    # per layer: two norms, one MLP and q and k rotated; plus the final norm
    assert _ops_called(windows) == {"rmsnorm": 5, "silu_and_mul": 2, "rotary": 4}
    unpatch(model)


@torch.no_grad()
def test_unpatch_restores_the_original_modules_function_and_logits():
    model = _llama()
    original_fn = modeling_llama.apply_rotary_pos_emb
    assert original_fn.__module__ == modeling_llama.__name__
    modules = dict(model.named_modules())
    expected = model(TOKENS).logits
    patch(model)
    assert modeling_llama.apply_rotary_pos_emb is not original_fn
    assert type(model.model.layers[0].mlp).__name__ == "PatchedSwiGLU"
    unpatch(model)
    assert modeling_llama.apply_rotary_pos_emb is original_fn
    after = dict(model.named_modules())
    assert after.keys() == modules.keys() and all(after[name] is m for name, m in modules.items())
    attention = model.model.layers[0].self_attn
    assert not attention._forward_pre_hooks and not attention._forward_hooks
    assert patched(model) is None
    assert torch.equal(model(TOKENS).logits, expected)


@torch.no_grad()
def test_patching_twice_is_harmless_and_one_unpatch_undoes_it(windows):
    model = _llama()
    original = modeling_llama.apply_rotary_pos_emb  # a function, or a callable module in newer transformers
    expected = model(TOKENS).logits
    patch(model)
    first = dict(patched(model).swapped)
    patch(model)
    assert patched(model).swapped == first
    assert len(model.model.layers[0].self_attn._forward_pre_hooks) == 1
    windows.flush(0.0)
    assert _rel(model(TOKENS).logits, expected) <= TOLERANCE[torch.float32]
    assert _ops_called(windows)["rotary"] == 4, "each q and k rotated once, not twice"
    unpatch(model)
    assert not model.model.layers[0].self_attn._forward_pre_hooks
    assert modeling_llama.apply_rotary_pos_emb is original
    assert not hasattr(modeling_llama.apply_rotary_pos_emb, "kernelloop_original")


@torch.no_grad()
def test_an_unpatched_llama_beside_a_patched_one_runs_torch_only(windows):
    patched_model, plain = _llama(), _llama()
    expected = plain(TOKENS).logits
    patch(patched_model)
    try:
        windows.flush(0.0)
        assert torch.equal(plain(TOKENS).logits, expected)
        assert _ops_called(windows) == {}
    finally:
        unpatch(patched_model)


def test_a_patched_llama_dropped_without_unpatch_gives_the_function_back():
    import gc

    model = _llama()
    patch(model)
    assert modeling_llama.apply_rotary_pos_emb.__module__ == "observer.sdk.rotary_patch"
    del model
    gc.collect()
    assert modeling_llama.apply_rotary_pos_emb.__module__ == modeling_llama.__name__


@torch.no_grad()
def test_swiglu_weights_are_shared_with_the_fused_projection_and_state_dict_keys_stay():
    model = _llama()
    keys = set(model.state_dict())
    patch(model)
    mlp = model.model.layers[0].mlp
    fused, _ = mlp._fused
    assert mlp.gate_proj.weight.data_ptr() == fused.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == fused[mlp.gate_proj.out_features:].data_ptr()
    assert set(model.state_dict()) == keys
    unpatch(model)


# ---- a plain torch.nn model -------------------------------------------------------------------------

class SwiGLU(torch.nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = torch.nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = torch.nn.Linear(intermediate, hidden, bias=bias)
        self.act = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GeGLU(SwiGLU):
    def forward(self, x):  # the same parts, another gate: must stay
        return self.down_proj(torch.nn.functional.gelu(self.gate_proj(x)) * self.up_proj(x))


class Block(torch.nn.Module):
    def __init__(self, hidden: int, bias: bool):
        super().__init__()
        self.norm = torch.nn.RMSNorm(hidden, eps=1e-5)
        self.mlp = SwiGLU(hidden, 48, bias=bias)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Plain(torch.nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.blocks = torch.nn.Sequential(Block(hidden, bias=False), Block(hidden, bias=True))
        self.other = GeGLU(hidden, 48)
        self.head = torch.nn.Linear(hidden, 40)
        self.probs = torch.nn.Softmax(dim=-1)
        self.across = torch.nn.Softmax(dim=0)  # not the last dim: served by torch still

    def forward(self, x):
        h = self.head(self.other(self.blocks(x)))
        return self.probs(h), self.across(h)


@pytest.mark.parametrize("dtype", _dtypes())
@torch.no_grad()
def test_patched_plain_model_gives_the_same_outputs_and_leaves_look_alikes(dtype, windows):
    torch.manual_seed(0)
    model = Plain().to(dtype).eval()
    x = torch.randn(3, 4, 32, dtype=dtype)
    expected = model(x)
    patch(model)
    report = patched(model)
    assert report.swapped == {"blocks.0.norm": "rmsnorm", "blocks.0.mlp": "silu_and_mul", "blocks.1.norm": "rmsnorm",
                              "blocks.1.mlp": "silu_and_mul", "probs": "softmax", "across": "softmax"}
    assert set(report.left) == {"other"} and isinstance(model.other, GeGLU)
    windows.flush(0.0)
    got = model(x)
    for g, e in zip(got, expected):
        assert _rel(g, e) <= TOLERANCE[dtype]
    assert _ops_called(windows) == {"rmsnorm": 2, "silu_and_mul": 2, "softmax": 1}
    unpatch(model)
    assert type(model.blocks[1].mlp) is SwiGLU and type(model.probs) is torch.nn.Softmax
    assert all(torch.equal(a, b) for a, b in zip(model(x), expected))


@torch.no_grad()
def test_swiglu_after_a_dtype_change_fuses_again():
    torch.manual_seed(0)
    model = Plain().eval()
    patch(model)
    model.to(torch.float64)  # new storage for every weight: the fused projection must follow
    x = torch.randn(2, 32, dtype=torch.float64)
    mlp = model.blocks[0].mlp
    y = mlp(x)
    assert y.dtype == torch.float64 and mlp._fused[0].dtype == torch.float64
    assert mlp.gate_proj.weight.data_ptr() == mlp._fused[0].data_ptr()


@torch.no_grad()
def test_a_patched_llama_serves_the_variant_deployed_for_its_rmsnorm_bucket(tmp_path):
    """What the registry deploys reaches a patched transformers model: the dispatch table is the
    runtime's (observer/sdk/hotswap.py fills it from the registry); here it is filled directly."""
    from observer.sdk.dispatch import Served, verify_and_load
    from shared.ops import rmsnorm
    from shared.schemas import RegistryEntry
    from shared.variants import render, variant_id

    params = {**rmsnorm.DEFAULT, "BLOCK": 64}
    source = render(rmsnorm.TEMPLATE, params)
    entry = RegistryEntry(variant_id=variant_id(source, params), source=source, params=params, speedup=1.3,
                          campaign_id="c1", approved_by="gate")
    launch = verify_and_load(entry, tmp_path)
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return launch(*args)

    dispatcher = customops.dispatcher
    dispatcher.hardware = "cpu-interpreter"
    # TOKENS is [2, 5]: ten rows of hidden 64 reach each norm
    key = dispatcher.key("rmsnorm", "float32", rmsnorm.shape_bucket([10, 64]))
    model = _llama()
    expected = model(TOKENS).logits
    patch(model)
    dispatcher.install(key, Served(entry.variant_id, counted, entry))
    try:
        got = model(TOKENS).logits
    finally:
        dispatcher.table.clear()
        unpatch(model)
    assert len(calls) == 5, "two norms a layer and the final one, all served by the deployed variant"
    assert _rel(got, expected) <= TOLERANCE[torch.float32]
