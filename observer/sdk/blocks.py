"""The stand-ins patch() swaps in for a model's blocks: each runs a deployed variant where one serves
the call's kernel key, and the original block everywhere else (observer/sdk/patching.py decides
which block becomes which, and checks it on a probe first)."""
from typing import Callable

import torch
import torch.nn.functional as F

from observer.sdk.customops import dispatcher, traced
from observer.sdk.dispatch import Served, Site


# ---- the patched block ------------------------------------------------------------------------

class PatchedBlock(torch.nn.Module):
    """A block served by a kernelloop op where a variant is deployed for the call's kernel key, and
    by the original block everywhere else, so that with nothing deployed it computes what the
    original does, bit for bit, for a lookup more per call. The original is held apart (not as a
    child: paths and state dict stay its own) and shares its parameters, buffers and children under
    their names; one replaced here (load_state_dict(assign=True), a conversion that makes new
    parameters) is replaced there too. Under torch.compile or the profiler a call goes through the
    op, as ops.<name> does (one graph node that follows hot swaps; the trace names the op), and
    there nothing deployed means the op's fallback."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "_original", original)
        self._parameters.update(original._parameters)
        self._buffers.update(original._buffers)
        self._non_persistent_buffers_set.update(original._non_persistent_buffers_set)
        self._modules.update(original._modules)

    def _serve(self, x: torch.Tensor, site: Site) -> torch.Tensor:
        served = dispatcher.table.get(site.key)
        if served is not None:
            return self._variant(x, site, served)
        if dispatcher.windows is None or not dispatcher.due(site, None):
            return self._original(x)
        return dispatcher.timed(site, None, x, self._original, (x,), self._parts())

    def _variant(self, x: torch.Tensor, site: Site, served: Served) -> torch.Tensor:
        raise NotImplementedError

    def _parts(self) -> tuple[torch.nn.Module, ...]:
        """Modules the original runs that are not the op: their time is not the op's."""
        return ()

    def _share_back(self) -> None:
        original = self._original
        for mine, theirs in ((self._parameters, original._parameters), (self._buffers, original._buffers),
                             (self._modules, original._modules)):
            for name, value in mine.items():
                if name in theirs and theirs[name] is not value:
                    theirs[name] = value

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._share_back()
        return module

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if isinstance(value, (torch.Tensor, torch.nn.Module)) and "_original" in self.__dict__:
            self._share_back()


# ---- RMSNorm ------------------------------------------------------------------------------------

class PatchedRMSNorm(PatchedBlock):
    """Stands in for an RMSNorm module. offset=1 serves Gemma's x * rstd * (1 + weight) as the op
    with 1 + weight for its weight."""

    def __init__(self, original: torch.nn.Module, eps: float | None, rmsnorm: Callable, offset: float = 0.0):
        super().__init__(original)
        self.eps = eps
        self.offset = offset
        self._rmsnorm = rmsnorm
        self._shifted: tuple | None = None  # (weight as it was, its version, weight + offset): not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if traced():
            return self._rmsnorm(*self._op_args(x))
        site = dispatcher.sites.get(signature := ("rmsnorm", x.dtype, x.shape))
        if site is None:
            site = dispatcher.remember(signature, dispatcher.resolve("rmsnorm", x.dtype, x.shape))
        return self._serve(x, site)

    def _variant(self, x: torch.Tensor, site: Site, served: Served) -> torch.Tensor:
        return dispatcher.serve(site, served, self._op_args(x))

    def _op_args(self, x: torch.Tensor) -> tuple:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps  # nn.RMSNorm's default
        return x, self._shifted_weight() if self.offset else self.weight, eps

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


# ---- SwiGLU MLP ---------------------------------------------------------------------------------

class PatchedMLP(PatchedBlock):
    """An MLP whose gate is silu_and_mul on a projection [..., width] of x (gate half first) where a
    variant serves; subclasses make the projection."""

    def __init__(self, original: torch.nn.Module, silu_and_mul: Callable, width: int):
        super().__init__(original)
        self._silu_and_mul = silu_and_mul
        self._width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if traced():
            return self._fused_forward(x)
        site = dispatcher.sites.get(signature := ("silu_and_mul", x.dtype, x.shape, self._width))
        if site is None:
            shape = (*x.shape[:-1], self._width)  # the op's input
            site = dispatcher.remember(signature, dispatcher.resolve("silu_and_mul", x.dtype, shape))
        return self._serve(x, site)

    def _variant(self, x: torch.Tensor, site: Site, served: Served) -> torch.Tensor:
        return self._fused_forward(x)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PatchedSwiGLU(PatchedMLP):
    """down_proj(silu_and_mul(x @ [gate; up])) where a variant serves: one projection into the op's
    [..., 2 * intermediate] input instead of two, and no cat of their outputs. gate_proj and up_proj
    keep their names (the state dict is unchanged), their weights re-pointed to halves of the fused
    one, so no weight is held twice and the original, which serves otherwise, computes with them."""

    def __init__(self, original: torch.nn.Module, silu_and_mul: Callable):
        super().__init__(original, silu_and_mul, 2 * original.gate_proj.out_features)
        self._fused: tuple | None = None  # (weight, bias): plain attributes, not state
        self.register_load_state_dict_post_hook(_fuse_again)

    def _parts(self) -> tuple[torch.nn.Module, ...]:
        return self.gate_proj, self.up_proj, self.down_proj

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._fused_params()
        return self.down_proj(self._silu_and_mul(F.linear(x, weight, bias)))

    def _apply(self, fn, recurse=True):
        # a conversion gives the halves new storage: fused again at once, or the old fused storage
        # would be held beside them until a variant next serves
        module = super()._apply(fn, recurse)
        self._fused_params()
        return module

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


def _fuse_again(module: PatchedSwiGLU, incompatible_keys) -> None:
    module._fused_params()  # load_state_dict(assign=True) gives the halves new storage


# ---- fused gate-up MLP (Phi-3) --------------------------------------------------------------------

class PatchedGateUp(PatchedMLP):
    """down_proj(silu_and_mul(gate_up_proj(x))) where a variant serves: the projection's output
    [..., 2 * intermediate] is the op's input as it is, gate half first, where the module chunks it
    in two and multiplies act(gate) by up."""

    def __init__(self, original: torch.nn.Module, silu_and_mul: Callable):
        super().__init__(original, silu_and_mul, original.gate_up_proj.out_features)

    def _parts(self) -> tuple[torch.nn.Module, ...]:
        return self.gate_up_proj, self.down_proj

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._silu_and_mul(self.gate_up_proj(x)))


# ---- nn.Softmax ---------------------------------------------------------------------------------

class PatchedSoftmax(PatchedBlock):
    """ops.softmax over the last dim; another dim stays the original's."""

    def __init__(self, original: torch.nn.Softmax, softmax: Callable):
        super().__init__(original)
        self.dim = original.dim
        self._softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim not in (-1, x.dim() - 1):
            return self._original(x)
        if traced():
            return self._softmax(x)
        site = dispatcher.sites.get(signature := ("softmax", x.dtype, x.shape))
        if site is None:
            site = dispatcher.remember(signature, dispatcher.resolve("softmax", x.dtype, x.shape))
        return self._serve(x, site)

    def _variant(self, x: torch.Tensor, site: Site, served: Served) -> torch.Tensor:
        return dispatcher.serve(site, served, (x,))
