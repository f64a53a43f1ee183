"""Module patching: a model's supported building blocks (RMSNorm, Gemma's 1 + weight RMSNorm too, the
SwiGLU MLP, Phi-3's fused gate-up MLP, rotary embedding, nn.Softmax) served by kernelloop's ops in
place, and undone by unpatch. Only a block that computes
the same as the op on a probe input is swapped; the others are logged and left as they are.

    kernelloop.patch(model)              # in place; returns the model
    kernelloop.patched(model).swapped    # {"model.layers.0.mlp": "silu_and_mul", ...}
    kernelloop.unpatch(model)            # the original modules and functions again
"""
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from shared.ops import get_op

log = logging.getLogger("kernelloop.observer")

# Probe bar, relative norm error: a few roundings of the dtype. A look-alike that computes another
# function (a GELU gate, interleaved rotary pairs) misses it by orders of magnitude.
_PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
_STATE_ATTR = "_kernelloop_patch"


@dataclass
class PatchReport:
    """What patch() did to a model, by module path."""

    swapped: dict[str, str] = field(default_factory=dict)  # path -> the kernelloop op serving it
    left: dict[str, str] = field(default_factory=dict)  # path -> why it was left as it is


@dataclass
class _State:
    report: PatchReport
    undo: list[Callable[[], None]]
    hooked: set[int]  # ids of attention modules whose rotary goes through the op


@torch.no_grad()
def _agrees(expected: Callable, got: Callable, dtype: torch.dtype) -> bool:
    """Whether two computations of a probe agree within the dtype's probe tolerance; what cannot
    be run (weights on the meta device, say) does not agree."""
    try:
        want, have = expected(), got()
    except Exception as e:
        log.debug("patch: probe failed: %s", e)
        return False
    want = want if isinstance(want, tuple) else (want,)
    have = have if isinstance(have, tuple) else (have,)
    bar = _PROBE_TOLERANCE.get(dtype, 2e-2)
    return len(want) == len(have) and all(
        w.shape == h.shape and bool((w.float() - h.float()).norm() <= bar * w.float().norm())
        for w, h in zip(want, have))


def _probe(shape: tuple[int, ...], like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(like.device, like.dtype)


# ---- RMSNorm ------------------------------------------------------------------------------------

class _PatchedRMSNorm(torch.nn.Module):
    """Stands in for an RMSNorm module, sharing its weight (state dict keys stay the same). offset=1
    serves Gemma's x * rstd * (1 + weight) as the op with 1 + weight for its weight."""

    def __init__(self, weight: torch.nn.Parameter, eps: float | None, rmsnorm: Callable, offset: float = 0.0):
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.offset = offset
        self._rmsnorm = rmsnorm
        self._shifted: tuple | None = None  # (weight as it was, its version, weight + offset): not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps  # nn.RMSNorm's default
        return self._rmsnorm(x, self._shifted_weight() if self.offset else self.weight, eps)

    def _shifted_weight(self) -> torch.Tensor:
        # weight + offset is made once and again only when the weight changes, not per call: per call
        # it would be one more kernel launch per norm, as many launches as the norms themselves in a
        # decode step. Every way to change the weight but one moves the key: .to(), .half(),
        # load_state_dict(assign=True) or `weight.data = ...` give new storage; load_state_dict,
        # copy_ and other in-place ops bump the version counter. Writes through `weight.data` bypass
        # the counter, as they bypass autograd's. Holding the old weight's tensor keeps its storage
        # from being reused, so a new weight never passes for it.
        w = self.weight
        version = -1 if w.is_inference() else w._version  # inference tensors keep no counter
        cached = self._shifted
        if cached is None or cached[0].data_ptr() != w.data_ptr() or cached[1] != version \
                or cached[0].dtype != w.dtype or cached[0].shape != w.shape:
            with torch.no_grad():
                # in the weight's dtype, as the op's variants are checked (weight typed like x);
                # in bf16 that is one rounding of 1 + weight, within the op's bf16 tolerance
                cached = self._shifted = (w.detach(), version, w.detach() + self.offset)
        return cached[2]


def _is_rmsnorm(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.RMSNorm):
        return module.weight is not None and len(module.normalized_shape) == 1
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 1 and (hasattr(module, "eps") or hasattr(module, "variance_epsilon")))


def _patch_rmsnorm(module: torch.nn.Module, ops) -> torch.nn.Module | None:
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    patched = _PatchedRMSNorm(module.weight, eps, ops.rmsnorm)
    if isinstance(module, torch.nn.RMSNorm):
        return patched
    weight = module.weight
    probe = _probe((2, weight.shape[0]), weight)  # probe: [2, hidden]
    probe_eps = eps if eps is not None else torch.finfo(probe.dtype).eps
    # against the reference, not the op: a probe is no call of the workload's
    reference = get_op("rmsnorm").reference
    if _agrees(lambda: module(probe), lambda: reference(probe, weight, probe_eps), weight.dtype):
        return patched
    # Gemma's (and others') x * rstd * (1 + weight): the weights of the two forms differ by one, so
    # at most one of the probes agrees
    if _agrees(lambda: module(probe), lambda: reference(probe, weight + 1, probe_eps), weight.dtype):
        return _PatchedRMSNorm(module.weight, eps, ops.rmsnorm, offset=1.0)
    return None


# ---- SwiGLU MLP ---------------------------------------------------------------------------------

class _PatchedSwiGLU(torch.nn.Module):
    """down_proj(silu_and_mul(x @ [gate; up])): one projection into the op's [..., 2 * intermediate]
    input instead of two, and no cat of their outputs. gate_proj and up_proj keep their names (the
    state dict is unchanged), their weights re-pointed to halves of the fused one, so no weight is
    held twice."""

    def __init__(self, original: torch.nn.Module, silu_and_mul: Callable):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = original.gate_proj, original.up_proj, original.down_proj
        self._silu_and_mul = silu_and_mul
        self._fused: tuple | None = None  # (weight, bias): plain attributes, not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._fused_params()
        return self.down_proj(self._silu_and_mul(F.linear(x, weight, bias)))

    def _fused_params(self) -> tuple:
        weight = self._fused[0] if self._fused is not None else None
        # .to(), .half() or load_state_dict(assign=True) give the halves new storage: fuse again
        if weight is None or self.gate_proj.weight.data_ptr() != weight.data_ptr() \
                or self.up_proj.weight.data_ptr() != weight[self.gate_proj.out_features:].data_ptr():
            self._fuse()
        return self._fused

    @torch.no_grad()
    def _fuse(self) -> None:
        self._fused = (self._share("weight"), self._share("bias") if self.gate_proj.bias is not None else None)

    def _share(self, name: str) -> torch.Tensor:
        gate, up = getattr(self.gate_proj, name), getattr(self.up_proj, name)
        fused = torch.cat((gate.detach(), up.detach()), 0)  # [2 * intermediate, ...]
        n = gate.shape[0]
        setattr(self.gate_proj, name, torch.nn.Parameter(fused[:n], requires_grad=gate.requires_grad))
        setattr(self.up_proj, name, torch.nn.Parameter(fused[n:], requires_grad=up.requires_grad))
        return fused


def _is_swiglu(module: torch.nn.Module) -> bool:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, torch.nn.Linear) for p in parts):
        return False
    gate, up, _ = parts
    return (gate.in_features == up.in_features and gate.out_features == up.out_features
            and (gate.bias is None) == (up.bias is None) and gate.weight.dtype == up.weight.dtype
            and gate.weight.device == up.weight.device)


def _patch_swiglu(module: torch.nn.Module, ops) -> torch.nn.Module | None:
    gate, up = module.gate_proj, module.up_proj
    probe = _probe((3, gate.in_features), gate.weight)  # probe: [3, hidden]
    reference = get_op("silu_and_mul").reference

    def fused():  # a copy: nothing of the module changes until the probe agrees
        weight = torch.cat((gate.weight, up.weight), 0)
        bias = torch.cat((gate.bias, up.bias), 0) if gate.bias is not None else None
        return module.down_proj(reference(F.linear(probe, weight, bias)))

    if not _agrees(lambda: module(probe), fused, gate.weight.dtype):
        return None
    patched = _PatchedSwiGLU(module, ops.silu_and_mul)
    patched._fuse()
    return patched


# ---- fused gate-up MLP (Phi-3) --------------------------------------------------------------------

class _PatchedGateUp(torch.nn.Module):
    """down_proj(silu_and_mul(gate_up_proj(x))): the projection's output [..., 2 * intermediate] is
    the op's input as it is, gate half first, where the module chunks it in two and multiplies
    act(gate) by up. The original's children are kept under their names: paths and state dict stay."""

    def __init__(self, original: torch.nn.Module, silu_and_mul: Callable):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self._silu_and_mul = silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._silu_and_mul(self.gate_up_proj(x)))


def _is_gate_up(module: torch.nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.nn.Linear) and isinstance(down, torch.nn.Linear)
            and gate_up.out_features == 2 * down.in_features)


def _patch_gate_up(module: torch.nn.Module, ops) -> torch.nn.Module | None:
    gate_up = module.gate_up_proj
    probe = _probe((3, gate_up.in_features), gate_up.weight)  # probe: [3, hidden]
    reference = get_op("silu_and_mul").reference
    # a GELU gate or up-then-gate halves compute something else and stay
    if not _agrees(lambda: module(probe), lambda: module.down_proj(reference(gate_up(probe))), gate_up.weight.dtype):
        return None
    return _PatchedGateUp(module, ops.silu_and_mul)


# ---- nn.Softmax ---------------------------------------------------------------------------------

class _PatchedSoftmax(torch.nn.Module):
    """ops.softmax over the last dim; another dim stays torch's."""

    def __init__(self, dim: int, softmax: Callable):
        super().__init__()
        self.dim = dim
        self._softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim in (-1, x.dim() - 1):
            return self._softmax(x)
        return torch.softmax(x, self.dim)


def _patch_softmax(module: torch.nn.Module, ops) -> torch.nn.Module | None:
    # dim=None is torch's legacy implicit dim, which depends on the input's rank: left alone
    return _PatchedSoftmax(module.dim, ops.softmax) if module.dim is not None else None


# ---- rotary embedding ---------------------------------------------------------------------------
# Llama-family attention calls a module-level apply_rotary_pos_emb(q, k, cos, sin) of its modeling
# file. That name is swapped for a dispatcher while any patched model of the family lives; it takes
# the op only inside a patched attention module's forward (a per-thread depth its hooks keep), so
# an unpatched model in the same process still runs the original function.

_ROTARY_NAME = "apply_rotary_pos_emb"
_inside = threading.local()
_swapped_namespaces: dict[int, list] = {}  # id(namespace) -> [namespace, original, patched models]


def _rotary_hf(q, k, cos, sin, unsqueeze_dim=1, *, rotary: Callable):
    """HF's apply_rotary_pos_emb through the rotary op (GPT-NeoX layout), or None where the call is
    not of the form the op serves. q, k: [batch, heads, seq, head_dim] (unsqueeze_dim=1) or
    [batch, seq, heads, head_dim] (2); cos, sin: [batch or 1, seq, head_dim], both halves equal."""
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return None
    batch, head_dim = q.shape[0], q.shape[-1]
    seq = q.shape[2] if unsqueeze_dim == 1 else q.shape[1]
    if head_dim % 2 or cos.shape[-1] != head_dim or cos.shape[1] != seq or cos.shape[0] not in (1, batch) \
            or k.shape[0] != batch or k.shape[-1] != head_dim:
        return None
    half = head_dim // 2
    c = cos[..., :half].expand(batch, seq, half).reshape(batch * seq, half)  # [tokens, half]
    s = sin[..., :half].expand(batch, seq, half).reshape(batch * seq, half)

    def rotate(x):
        tokens_first = x.transpose(1, 2) if unsqueeze_dim == 1 else x  # [batch, seq, heads, head_dim]
        heads = tokens_first.shape[2]
        y = rotary(tokens_first.reshape(batch * seq, heads, head_dim), c, s, False)
        y = y.view(batch, seq, heads, head_dim)
        return y.transpose(1, 2) if unsqueeze_dim == 1 else y

    return rotate(q), rotate(k)


def _rotary_dispatcher(original: Callable, rotary: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if getattr(_inside, "depth", 0) and len(args) + len(kwargs) <= 1 and set(kwargs) <= {"unsqueeze_dim"}:
            out = _rotary_hf(q, k, cos, sin, *args, **kwargs, rotary=rotary)
            if out is not None:
                return out
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.kernelloop_original = original
    return apply_rotary_pos_emb


def _rotary_namespace(module: torch.nn.Module) -> dict | None:
    """The globals whose apply_rotary_pos_emb the module's forward calls, if it calls one."""
    forward = type(module).forward
    while hasattr(forward, "__wrapped__"):  # HF's deprecation and output decorators
        forward = forward.__wrapped__
    code, namespace = getattr(forward, "__code__", None), getattr(forward, "__globals__", None)
    if code is None or _ROTARY_NAME not in code.co_names or not callable(namespace.get(_ROTARY_NAME)):
        return None
    return namespace


def _rotary_probe_inputs(model: torch.nn.Module, head_dim: int, like: torch.Tensor) -> tuple:
    """cos and sin as the model's own rotary embedding makes them for a few positions, else the
    GPT-NeoX layout built here: the probe then checks the whole path, not the function alone."""
    positions = torch.tensor([[0, 5, 17]], device=like.device)
    for m in model.modules():
        if type(m).__name__.endswith("RotaryEmbedding"):
            try:
                cos, sin = m(_probe((1, 3, head_dim), like), positions)
                if cos.shape[-1] == head_dim:
                    return cos, sin
            except Exception as e:
                log.debug("patch: %s did not make cos and sin for a probe: %s", type(m).__name__, e)
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=like.device) / head_dim)
    freqs = positions[..., None].float() * inv_freq  # [1, 3, half]
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(like.dtype), emb.sin().to(like.dtype)


def _patch_rotary(model: torch.nn.Module, module: torch.nn.Module, namespace: dict, ops) -> Callable | None:
    """Hooks the attention module; returns its undo, or None when the probe disagrees."""
    like = next(module.parameters(), None)
    head_dim = getattr(module, "head_dim", None)
    if like is None or not isinstance(head_dim, int):
        return None
    entry = _swapped_namespaces.get(id(namespace))
    original = entry[1] if entry else namespace[_ROTARY_NAME]
    cos, sin = _rotary_probe_inputs(model, head_dim, like)
    q, k = _probe((1, 2, 3, head_dim), like, seed=1), _probe((1, 1, 3, head_dim), like, seed=2)
    reference = get_op("rotary").reference
    if not _agrees(lambda: original(q, k, cos, sin), lambda: _rotary_hf(q, k, cos, sin, rotary=reference), like.dtype):
        return None
    if entry is None:
        entry = _swapped_namespaces[id(namespace)] = [namespace, original, 0]
        namespace[_ROTARY_NAME] = _rotary_dispatcher(original, ops.rotary)
    entry[2] += 1

    def enter(*_):
        _inside.depth = getattr(_inside, "depth", 0) + 1

    def leave(*_):
        _inside.depth -= 1

    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]

    def release():
        entry[2] -= 1
        if entry[2] == 0:  # the last patched module of the family: the original function again
            namespace[_ROTARY_NAME] = original
            _swapped_namespaces.pop(id(namespace), None)

    # a patched model dropped without unpatch releases the function too; runs once either way
    released = weakref.finalize(module, release)

    def undo():
        for handle in handles:
            handle.remove()
        released()

    return undo


# ---- patch, patched, unpatch --------------------------------------------------------------------

_PATCHED = (_PatchedRMSNorm, _PatchedSwiGLU, _PatchedGateUp, _PatchedSoftmax)
# (test, patcher, op): the first test a module passes decides what it may become
_SWAPS = ((_is_rmsnorm, _patch_rmsnorm, "rmsnorm"), (_is_swiglu, _patch_swiglu, "silu_and_mul"),
          (_is_gate_up, _patch_gate_up, "silu_and_mul"),
          (lambda m: type(m) is torch.nn.Softmax, _patch_softmax, "softmax"))


def _swap(parent: torch.nn.Module, child: str, module: torch.nn.Module) -> Callable:
    original = getattr(parent, child)
    setattr(parent, child, module)
    return lambda: setattr(parent, child, original)


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Serve the model's supported blocks by kernelloop's ops, in place, and return the model:
    RMSNorm (torch's and *RMSNorm look-alikes, Gemma's 1 + weight form too) by ops.rmsnorm; a SwiGLU
    MLP (gate_proj, up_proj, down_proj) by one fused projection and ops.silu_and_mul, as is a fused
    one (gate_up_proj, chunked in two, down_proj: Phi-3); rotary embedding of Llama-family
    attention (HF transformers' apply_rotary_pos_emb) by ops.rotary; nn.Softmax by ops.softmax.
    Each swap is checked on a probe input first; a block that disagrees is logged and kept.
    patched(model) reports what was swapped and what was left; unpatch(model) undoes it all.
    Patching twice is harmless. Forward only: the ops are for inference."""
    from observer.sdk import ops  # observer.sdk re-exports this module

    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = _State(PatchReport(), [], set())
        object.__setattr__(model, _STATE_ATTR, state)
    report = state.report
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, _PATCHED) or name in report.swapped:
            continue
        for is_kind, patcher, op in _SWAPS:
            if not is_kind(module):
                continue
            patched = patcher(module, ops)
            if patched is None:
                report.left[name] = f"{type(module).__name__} does not compute {op} on a probe"
                log.warning("patch: %s (%s) does not compute %s; left as it is", name, type(module).__name__, op)
            else:
                parent_name, _, child = name.rpartition(".")
                state.undo.append(_swap(model.get_submodule(parent_name), child, patched))
                report.swapped[name] = op
                report.left.pop(name, None)
            break
        namespace = _rotary_namespace(module)
        if namespace is not None and id(module) not in state.hooked:
            undo = _patch_rotary(model, module, namespace, ops)
            if undo is None:
                report.left[name] = f"{type(module).__name__}'s {_ROTARY_NAME} does not compute rotary on a probe"
                log.warning("patch: %s (%s): rotary left as it is", name, type(module).__name__)
            else:
                state.undo.append(undo)
                state.hooked.add(id(module))
                report.swapped[name] = "rotary"
                report.left.pop(name, None)
    return model


def patched(model: torch.nn.Module) -> PatchReport | None:
    """What patch() swapped in the model (module path -> op) and left alone; None if unpatched."""
    state = getattr(model, _STATE_ATTR, None)
    return state.report if state is not None else None


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """The original modules and functions again, in place; returns the model. A SwiGLU MLP's
    gate_proj and up_proj keep their re-pointed weights (equal values, one fused storage)."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for undo in reversed(state.undo):
        undo()
    object.__delattr__(model, _STATE_ATTR)
    return model
