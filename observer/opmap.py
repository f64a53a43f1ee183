"""Which profiler trace events are which catalog op, and with which shape:

| trace event                                             | catalog op     | shape                         |
|---------------------------------------------------------|----------------|-------------------------------|
| aten::linear (x [..., K], w [N, K])                     | matmul         | [M, N, K], M = rows of x      |
| aten::addmm (bias, x [M, K], w.T [K, N]), aten::mm      | matmul         | [M, N, K]                     |
| aten::matmul with a 2-D second input [K, N]             | matmul         | [M, N, K]                     |
| aten::rms_norm, aten::_fused_rms_norm                   | rmsnorm        | x                             |
| pow(x, 2), mean(-1), add(eps), rsqrt, mul, mul(weight)  | rmsnorm        | x (HF LlamaRMSNorm, unfused)  |
| aten::silu(g [..., d]) then aten::mul(g', u) on [..., d]| silu_and_mul   | [rows, 2d] (SwiGLU, unfused)  |
| aten::softmax, aten::_softmax, aten::_safe_softmax      | softmax        | x, over the last dim only     |
| aten::layer_norm, aten::native_layer_norm               | layernorm      | x, over the last dim only     |
| kernelloop::<op>                                        | <op>           | x (matmul: as aten::linear)   |
| other namespaces naming an op (_C::silu_and_mul, ...)   | that op        | x                             |

Batched matmuls (aten::bmm, a 3-D second input) and backward ops map to nothing. A call of a catalog
op in a dtype the op has no kernels for is reported with the unmapped ops, saying so.
"""
import math
import re

from shared.ops import CATALOG

# The profiler's names for tensor element types.
DTYPES = {"float": "float32", "c10::Half": "float16", "c10::BFloat16": "bfloat16"}


class Skip(Exception):
    """A call of a catalog op that cannot become a key; the message says why."""


# ---- shapes of one call -------------------------------------------------------------------------


def type_of(args: dict, i: int) -> str | None:
    """Input i's dtype as the profiler names it ("c10::Half"), when the trace says."""
    types = args.get("Input type")
    return types[i] if isinstance(types, list) and i < len(types) and isinstance(types[i], str) else None


def _tensor(args: dict, i: int) -> tuple[list[int], str | None]:
    """Input i's dims and dtype name (None: a dtype the catalog has no name for)."""
    dims = args.get("Input Dims")
    if not isinstance(dims, list) or i >= len(dims) or not isinstance(dims[i], list) or not dims[i]:
        raise Skip("no input shapes (record the trace with record_shapes=True)")
    d = dims[i]
    if not all(type(n) is int and n > 0 for n in d):
        raise Skip(f"input {i} has dims {d}")
    return d, DTYPES.get(type_of(args, i))


def _concrete(args: dict, i: int) -> str | None:
    values = args.get("Concrete Inputs")
    return values[i] if isinstance(values, list) and i < len(values) and values[i] != "" else None


def _rows(args: dict) -> tuple[list[int], str | None]:
    return _tensor(args, 0)


def _linear(args: dict) -> tuple[list[int], str | None]:
    (x, dtype), (w, _) = _tensor(args, 0), _tensor(args, 1)  # x: [..., K], w: [N, K]
    if len(w) != 2 or w[1] != x[-1]:
        raise Skip(f"weight {w} does not match input {x}")
    return [math.prod(x[:-1]), w[0], x[-1]], dtype


def _mm(args: dict, first: int = 0) -> tuple[list[int], str | None]:
    (a, dtype), (b, _) = _tensor(args, first), _tensor(args, first + 1)  # a: [M, K], b: [K, N]
    if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
        raise Skip(f"inputs {a} and {b} are not [M, K] @ [K, N]")
    return [a[0], b[1], a[1]], dtype


def _matmul(args: dict) -> tuple[list[int], str | None] | None:
    (a, dtype), (b, _) = _tensor(args, 0), _tensor(args, 1)
    if len(b) != 2 or len(a) < 2 or a[-1] != b[0]:
        return None  # batched or vector products: no catalog op
    return [math.prod(a[:-1]), b[1], b[0]], dtype


def _softmax(args: dict) -> tuple[list[int], str | None] | None:
    x, dtype = _tensor(args, 0)
    dim = _concrete(args, 1)
    return (x, dtype) if dim in (None, "-1", str(len(x) - 1)) else None  # over another dim: not ours


def _layer_norm(args: dict) -> tuple[list[int], str | None] | None:
    x, dtype = _tensor(args, 0)
    normalized = _concrete(args, 1)  # e.g. "[4096]": only over the last dim is it the catalog's op
    return (x, dtype) if normalized in (None, f"[{x[-1]}]") else None


def _widest(args: dict) -> tuple[list[int], str | None]:
    """Out-argument kernels (vLLM's _C::silu_and_mul(out, x)): the input is the wider tensor."""
    found = []
    for i in range(len(args.get("Input Dims") or [])):
        try:
            found.append(_tensor(args, i))
        except Skip:
            continue
    if not found:
        raise Skip("no input shapes (record the trace with record_shapes=True)")
    return max(found, key=lambda t: t[0][-1])


_ATEN = {
    "aten::linear": ("matmul", _linear), "aten::addmm": ("matmul", lambda a: _mm(a, 1)),
    "aten::mm": ("matmul", _mm), "aten::matmul": ("matmul", _matmul),
    "aten::rms_norm": ("rmsnorm", _rows), "aten::_fused_rms_norm": ("rmsnorm", _rows),
    "aten::softmax": ("softmax", _softmax), "aten::_softmax": ("softmax", _softmax),
    "aten::_safe_softmax": ("softmax", _softmax),
    "aten::layer_norm": ("layernorm", _layer_norm), "aten::native_layer_norm": ("layernorm", _layer_norm),
}
# Longest names first, so rmsnorm_residual is not taken for rmsnorm; vLLM calls it fused_add_rms_norm.
_BY_NAME = sorted(((re.sub(r"[^a-z0-9]", "", n), n) for n in CATALOG), key=lambda t: -len(t[0]))
_ALIASES = {"fusedaddrmsnorm": "rmsnorm_residual"}


def catalog_op(name: str) -> str | None:
    """The catalog op an event name stands for, if any (see the module's table)."""
    if name in _ATEN:
        return _ATEN[name][0]
    if name.startswith("aten::") or "backward" in name.lower():
        return None
    if name.startswith("kernelloop::"):
        op = name.removeprefix("kernelloop::")
        return op if op in CATALOG else None
    flat = re.sub(r"[^a-z0-9]", "", name.lower())
    alias = next((op for part, op in _ALIASES.items() if part in flat), None)
    return alias or next((op for part, op in _BY_NAME if part in flat), None)


def call_of(name: str, args: dict) -> tuple[str, list[int], str] | None:
    """(op, shape, dtype) of a call of a catalog op; None when it is no catalog op; Skip when it
    is one but cannot become a key."""
    op = catalog_op(name)
    if op is None:
        return None
    if name in _ATEN:
        shape_of = _ATEN[name][1]
    elif op == "matmul":
        shape_of = _linear
    else:
        shape_of = _widest if op == "silu_and_mul" else _rows
    found = shape_of(args)
    if found is None:
        return None
    shape, dtype = found
    return op, shape, checked_dtype(op, dtype, args)


def checked_dtype(op: str, dtype: str | None, args: dict) -> str:
    allowed = getattr(CATALOG[op], "DTYPES", tuple(DTYPES.values()))
    if dtype not in allowed:
        seen = dtype or type_of(args, 0) or "unknown"
        raise Skip(f"{op} has no {seen} kernels in the catalog (it has {', '.join(allowed)})")
    return dtype


# ---- unfused patterns over a sequence of sibling calls ------------------------------------------

_CASTS = {"aten::to", "aten::_to_copy", "aten::type_as"}


def dims_of(op) -> list:
    dims = op.args.get("Input Dims")
    return [d for d in dims if isinstance(d, list) and d] if isinstance(dims, list) else []


def _rmsnorm_at(seq: list, i: int) -> tuple[list[int], str | None, list] | None:
    """HF LlamaRMSNorm, unfused: [to] pow(x, 2) mean(-1) [add(eps)] rsqrt mul [to] [mul(weight)]."""
    first = i
    if seq[i].name in _CASTS and i + 1 < len(seq):
        i += 1
    if seq[i].name != "aten::pow" or _concrete(seq[i].args, 1) not in (None, "2"):
        return None
    x = (dims_of(seq[i]) or [None])[0]
    if not x:
        return None
    r = x[:-1] + [1]  # the per-row statistic
    steps = [("aten::mean", lambda d: d[:1] == [x], True), ("aten::add", lambda d: d[:1] == [r], False),
             ("aten::rsqrt", lambda d: d[:1] == [r], True),
             ("aten::mul", lambda d: {tuple(v) for v in d[:2]} == {tuple(x), tuple(r)}, True),
             ("aten::mul", lambda d: {tuple(v) for v in d[:2]} == {tuple(x), (x[-1],)}, False)]
    j = i + 1
    for name, fits, required in steps:
        while j < len(seq) and seq[j].name in _CASTS:
            j += 1
        if j < len(seq) and seq[j].name == name and fits(dims_of(seq[j])):
            j += 1
        elif required:
            return None
    members = seq[first:j]
    return x, DTYPES.get(type_of(members[0].args, 0)), members


def _swiglu_at(seq: list, i: int, lookahead: int = 6) -> tuple[list[int], str | None, list] | None:
    """silu(gate) followed, within a few calls (the up projection between), by mul(silu, up)."""
    if seq[i].name not in ("aten::silu", "aten::silu_"):
        return None
    g = (dims_of(seq[i]) or [None])[0]
    if not g:
        return None
    for j in range(i + 1, min(i + 1 + lookahead, len(seq))):
        if seq[j].name in ("aten::mul", "aten::mul_") and not seq[j].mapped and dims_of(seq[j])[:2] == [g, g]:
            return [math.prod(g[:-1]), 2 * g[-1]], DTYPES.get(type_of(seq[i].args, 0)), [seq[i], seq[j]]
    return None


PATTERNS = (("rmsnorm", _rmsnorm_at, "HF RMSNorm pattern (pow, mean, rsqrt, mul)"),
             ("silu_and_mul", _swiglu_at, "SwiGLU pattern (silu, mul)"))
