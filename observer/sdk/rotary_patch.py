"""Rotary embedding patching for observer.sdk.patching: Llama-family attention's apply_rotary_pos_emb
served by the rotary op where a variant is deployed for q's or k's kernel key, and by the original
function otherwise, inside patched attention modules only."""
import logging
import threading
import weakref
from typing import Callable

import torch

from observer.sdk.customops import dispatcher, traced
from observer.sdk.dispatch import Site
from observer.sdk.probing import agrees, probe_input
from shared.ops import get_op

log = logging.getLogger("kernelloop.observer")

# Llama-family attention calls a module-level apply_rotary_pos_emb(q, k, cos, sin) of its modeling
# file. That name is swapped for a dispatcher while any patched model of the family lives; it
# dispatches only inside a patched attention module's forward (a per-thread depth its hooks keep),
# so an unpatched model in the same process runs the original function, uncounted.

ROTARY_NAME = "apply_rotary_pos_emb"
_inside = threading.local()
_swapped_namespaces: dict[int, list] = {}  # id(namespace) -> [namespace, original, patched models]


def _form(q, k, cos, sin, unsqueeze_dim) -> tuple[int, int, int] | None:
    """(batch, seq, head_dim) of a call of the form the op serves, else None. q, k: [batch, heads,
    seq, head_dim] (unsqueeze_dim=1) or [batch, seq, heads, head_dim] (2); cos, sin: [batch or 1,
    seq, head_dim], both halves equal."""
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return None
    batch, head_dim = q.shape[0], q.shape[-1]
    seq = q.shape[2] if unsqueeze_dim == 1 else q.shape[1]
    if head_dim % 2 or cos.shape[-1] != head_dim or cos.shape[1] != seq or cos.shape[0] not in (1, batch) \
            or k.shape[0] != batch or k.shape[-1] != head_dim or k.shape[3 - unsqueeze_dim] != seq:
        return None
    return batch, seq, head_dim


def _rotary_hf(q, k, cos, sin, unsqueeze_dim=1, *, rotary: Callable):
    """HF's apply_rotary_pos_emb through the rotary op (GPT-NeoX layout), or None where the call is
    not of the form the op serves."""
    form = _form(q, k, cos, sin, unsqueeze_dim)
    if form is None:
        return None
    batch, seq, head_dim = form
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


def _sites(q, k, cos, sin, unsqueeze_dim) -> tuple[Site, Site] | tuple[()]:
    """The Sites of q's and k's rotations, resolved once per signature; () where the call is not of
    the form the op serves. The op's shape is [tokens, heads, head_dim]; heads are on dim unsqueeze_dim."""
    signature = ("rotary", q.dtype, k.dtype, q.shape, k.shape, cos.shape, sin.shape, unsqueeze_dim)
    sites = dispatcher.sites.get(signature)
    if sites is None:
        form = _form(q, k, cos, sin, unsqueeze_dim)
        sites = () if form is None else tuple(
            dispatcher.resolve("rotary", x.dtype, (form[0] * form[1], x.shape[unsqueeze_dim], form[2])) for x in (q, k))
        dispatcher.remember(signature, sites)
    return sites


def _serve(original: Callable, rotary: Callable, sites: tuple[Site, Site], q, k, cos, sin, args, kwargs,
           unsqueeze_dim: int):
    """The rotary op where a variant serves q's or k's key; the original function otherwise, counted
    as the op's two calls while observed."""
    (site_q, site_k), table = sites, dispatcher.table
    if table.get(site_q.key) is not None or table.get(site_k.key) is not None:
        return _rotary_hf(q, k, cos, sin, unsqueeze_dim, rotary=rotary)
    if dispatcher.windows is None:
        return original(q, k, cos, sin, *args, **kwargs)
    due_q, due_k = dispatcher.due(site_q, None), dispatcher.due(site_k, None)
    if not (due_q or due_k):
        return original(q, k, cos, sin, *args, **kwargs)
    # A timed call rotates q and k apart, each by the original with the other emptied along its heads,
    # so that each has a time of its own; the function is elementwise per tensor (patch_rotary
    # checks), so the outputs are those of one call, bit for bit.
    no_q, no_k = q.narrow(unsqueeze_dim, 0, 0), k.narrow(unsqueeze_dim, 0, 0)

    def one(site, due, x, which, *pair):
        def run():
            return original(*pair, cos, sin, *args, **kwargs)[which]

        return dispatcher.timed(site, None, x, run, ()) if due else run()

    return one(site_q, due_q, q, 0, q, no_k), one(site_k, due_k, k, 1, no_q, k)


def _splits(original: Callable, q, k, cos, sin) -> bool:
    """Whether the original rotates q and k each on its own, bit for bit (on the probe)."""
    try:
        whole = original(q, k, cos, sin)
        apart = original(q, k.narrow(1, 0, 0), cos, sin)[0], original(q.narrow(1, 0, 0), k, cos, sin)[1]
        return all(torch.equal(a, b) for a, b in zip(whole, apart))
    except Exception as e:
        log.debug("patch: rotary split probe failed: %s", e)
        return False


def _rotary_dispatcher(original: Callable, rotary: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if getattr(_inside, "depth", 0) and len(args) + len(kwargs) <= 1 and set(kwargs) <= {"unsqueeze_dim"}:
            unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
            if traced():  # torch.compile or the profiler: the op, as ops.rotary serves it there
                out = _rotary_hf(q, k, cos, sin, unsqueeze_dim, rotary=rotary)
                if out is not None:
                    return out
            elif sites := _sites(q, k, cos, sin, unsqueeze_dim):
                return _serve(original, rotary, sites, q, k, cos, sin, args, kwargs, unsqueeze_dim)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.kernelloop_original = original
    return apply_rotary_pos_emb


def rotary_namespace(module: torch.nn.Module) -> dict | None:
    """The globals whose apply_rotary_pos_emb the module's forward calls, if it calls one."""
    forward = type(module).forward
    while hasattr(forward, "__wrapped__"):  # HF's deprecation and output decorators
        forward = forward.__wrapped__
    code, namespace = getattr(forward, "__code__", None), getattr(forward, "__globals__", None)
    if code is None or ROTARY_NAME not in code.co_names or not callable(namespace.get(ROTARY_NAME)):
        return None
    return namespace


def _rotary_probe_inputs(model: torch.nn.Module, head_dim: int, like: torch.Tensor) -> tuple:
    """cos and sin as the model's own rotary embedding makes them for a few positions, else the
    GPT-NeoX layout built here: the probe then checks the whole path, not the function alone."""
    positions = torch.tensor([[0, 5, 17]], device=like.device)
    for m in model.modules():
        if type(m).__name__.endswith("RotaryEmbedding"):
            try:
                cos, sin = m(probe_input((1, 3, head_dim), like), positions)
                if cos.shape[-1] == head_dim:
                    return cos, sin
            except Exception as e:
                log.debug("patch: %s did not make cos and sin for a probe: %s", type(m).__name__, e)
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=like.device) / head_dim)
    freqs = positions[..., None].float() * inv_freq  # [1, 3, half]
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(like.dtype), emb.sin().to(like.dtype)


def patch_rotary(model: torch.nn.Module, module: torch.nn.Module, namespace: dict, ops) -> Callable | None:
    """Hooks the attention module; returns its undo, or None when the probe disagrees."""
    like = next(module.parameters(), None)
    head_dim = getattr(module, "head_dim", None)
    if like is None or not isinstance(head_dim, int):
        return None
    entry = _swapped_namespaces.get(id(namespace))
    original = entry[1] if entry else namespace[ROTARY_NAME]
    cos, sin = _rotary_probe_inputs(model, head_dim, like)
    q, k = probe_input((1, 2, 3, head_dim), like, seed=1), probe_input((1, 1, 3, head_dim), like, seed=2)
    reference = get_op("rotary").reference
    if not agrees(lambda: original(q, k, cos, sin), lambda: _rotary_hf(q, k, cos, sin, rotary=reference), like.dtype) \
            or not _splits(original, q, k, cos, sin):
        return None
    if entry is None:
        entry = _swapped_namespaces[id(namespace)] = [namespace, original, 0]
        namespace[ROTARY_NAME] = _rotary_dispatcher(original, ops.rotary)
    entry[2] += 1

    def enter(*_):
        _inside.depth = getattr(_inside, "depth", 0) + 1

    def leave(*_):
        _inside.depth -= 1

    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]

    def release():
        entry[2] -= 1
        if entry[2] == 0:  # the last patched module of the family: the original function again
            namespace[ROTARY_NAME] = original
            _swapped_namespaces.pop(id(namespace), None)

    # a patched model dropped without unpatch releases the function too; runs once either way
    released = weakref.finalize(module, release)

    def undo():
        for handle in handles:
            handle.remove()
        released()

    return undo
