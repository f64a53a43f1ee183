"""Module patching: a model's supported building blocks (RMSNorm, Gemma's 1 + weight RMSNorm too, the
SwiGLU MLP, Phi-3's fused gate-up MLP, rotary embedding, nn.Softmax) served by kernelloop's ops in
place, and undone by unpatch (the rotary part in observer/sdk/rotary_patch.py). Only a block that
computes the same as the op on a probe input is swapped; the others are logged and left as they are.
A swapped block runs a deployed variant where one serves the call's kernel key and its own original
code everywhere else, so with nothing deployed a patched model computes what it did before.

    kernelloop.patch(model)              # in place; returns the model
    kernelloop.patched(model).swapped    # {"model.layers.0.mlp": "silu_and_mul", ...}
    kernelloop.unpatch(model)            # the original modules and functions again
"""
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from observer.sdk.blocks import PatchedGateUp, PatchedRMSNorm, PatchedSoftmax, PatchedSwiGLU
from observer.sdk.customops import ops
from observer.sdk.probing import agrees, probe_input
from observer.sdk.rotary_patch import ROTARY_NAME, patch_rotary, rotary_namespace
from shared.ops import get_op

log = logging.getLogger("kernelloop.observer")

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


# ---- RMSNorm ------------------------------------------------------------------------------------

def _is_rmsnorm(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.RMSNorm):
        return module.weight is not None and len(module.normalized_shape) == 1
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 1 and (hasattr(module, "eps") or hasattr(module, "variance_epsilon")))


def _patch_rmsnorm(module: torch.nn.Module, ops) -> torch.nn.Module | None:
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    patched = PatchedRMSNorm(module, eps, ops.rmsnorm)
    if isinstance(module, torch.nn.RMSNorm):
        return patched
    weight = module.weight
    probe = probe_input((2, weight.shape[0]), weight)  # probe: [2, hidden]
    probe_eps = eps if eps is not None else torch.finfo(probe.dtype).eps
    # against the reference, not the op: a probe is no call of the workload's
    reference = get_op("rmsnorm").reference
    if agrees(lambda: module(probe), lambda: reference(probe, weight, probe_eps), weight.dtype):
        return patched
    # Gemma's (and others') x * rstd * (1 + weight): the weights of the two forms differ by one, so
    # at most one of the probes agrees
    if agrees(lambda: module(probe), lambda: reference(probe, weight + 1, probe_eps), weight.dtype):
        return PatchedRMSNorm(module, eps, ops.rmsnorm, offset=1.0)
    return None


# ---- SwiGLU MLP ---------------------------------------------------------------------------------

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
    probe = probe_input((3, gate.in_features), gate.weight)  # probe: [3, hidden]
    reference = get_op("silu_and_mul").reference

    def fused():  # a copy: nothing of the module changes until the probe agrees
        weight = torch.cat((gate.weight, up.weight), 0)
        bias = torch.cat((gate.bias, up.bias), 0) if gate.bias is not None else None
        return module.down_proj(reference(F.linear(probe, weight, bias)))

    if not agrees(lambda: module(probe), fused, gate.weight.dtype):
        return None
    patched = PatchedSwiGLU(module, ops.silu_and_mul)
    patched._fuse()
    return patched


# ---- fused gate-up MLP (Phi-3) --------------------------------------------------------------------

def _is_gate_up(module: torch.nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.nn.Linear) and isinstance(down, torch.nn.Linear)
            and gate_up.out_features == 2 * down.in_features)


def _patch_gate_up(module: torch.nn.Module, ops) -> torch.nn.Module | None:
    gate_up = module.gate_up_proj
    probe = probe_input((3, gate_up.in_features), gate_up.weight)  # probe: [3, hidden]
    reference = get_op("silu_and_mul").reference
    # a GELU gate or up-then-gate halves compute something else and stay
    if not agrees(lambda: module(probe), lambda: module.down_proj(reference(gate_up(probe))), gate_up.weight.dtype):
        return None
    return PatchedGateUp(module, ops.silu_and_mul)


# ---- nn.Softmax ---------------------------------------------------------------------------------

def _patch_softmax(module: torch.nn.Module, ops) -> torch.nn.Module | None:
    # dim=None is torch's legacy implicit dim, which depends on the input's rank: left alone
    return PatchedSoftmax(module, ops.softmax) if module.dim is not None else None


# ---- patch, patched, unpatch --------------------------------------------------------------------

_PATCHED = (PatchedRMSNorm, PatchedSwiGLU, PatchedGateUp, PatchedSoftmax)
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
    A swapped block takes its op only where a variant is deployed for the call's kernel key, and
    runs its original code elsewhere, still counted for the loop to see (observer/sdk/blocks.py).
    Each swap is checked on a probe input first; a block that disagrees is logged and kept.
    patched(model) reports what was swapped and what was left; unpatch(model) undoes it all.
    Patching twice is harmless. Forward only: the ops are for inference."""
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
        namespace = rotary_namespace(module)
        if namespace is not None and id(module) not in state.hooked:
            undo = patch_rotary(model, module, namespace, ops)
            if undo is None:
                report.left[name] = f"{type(module).__name__}'s {ROTARY_NAME} does not compute rotary on a probe"
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
