"""Which profiler trace events are which catalog op, and with which shape:

| trace event                                             | catalog op     | shape                         |
|---------------------------------------------------------|----------------|-------------------------------|
| aten::linear (x [..., K], w [N, K])                     | matmul         | [M, N, K], M = rows of x      |
| aten::addmm (bias, x [M, K], w.T [K, N]), aten::mm      | matmul         | [M, N, K]                     |
| aten::matmul with a 2-D second input [K, N]             | matmul         | [M, N, K]                     |
| aten::rms_norm, aten::_fused_rms_norm                   | rmsnorm        | x                             |
| pow(x, 2), mean(-1), add(eps), rsqrt, mul, mul(weight)  | rmsnorm        | x (HF LlamaRMSNorm, unfused)  |
| as above, then add(weight, 1), mul(x, 1 + weight)       | rmsnorm        | x (HF GemmaRMSNorm, unfused)  |
| aten::silu(g [..., d]) then aten::mul(g', u) on [..., d]| silu_and_mul   | [rows, 2d] (SwiGLU, unfused)  |
| chunk(h [..., 2d], 2, -1), silu(g), mul(silu(g), u)     | silu_and_mul   | [rows, 2d] (Phi-3 gate_up)    |
| mul(x, cos), slice, slice, neg, cat, mul(r, sin), add   | rotary         | [tokens, heads, head_dim]     |
| aten::softmax, aten::_softmax, aten::_safe_softmax      | softmax        | x, over the last dim only     |
| aten::layer_norm, aten::native_layer_norm               | layernorm      | x, over the last dim only     |
| kernelloop::<op>                                        | <op>           | x (matmul: as aten::linear)   |
| other namespaces naming an op (_C::silu_and_mul, ...)   | that op        | x                             |

The rotary row is HF's apply_rotary_pos_emb, q * cos + rotate_half(q) * sin with rotate_half a
slice, neg and cat, once for q and once for k: x is [batch, heads, seq, head_dim] (cos [.., 1, seq,
head_dim]) or [batch, seq, heads, head_dim] (cos [.., seq, 1, head_dim]), tokens = batch * seq.
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


def _rmsnorm_at(seq: list, i: int, one_plus: bool = False) -> tuple[list[int], str | None, list] | None:
    """HF LlamaRMSNorm, unfused: [to] pow(x, 2) mean(-1) [add(eps)] rsqrt mul [to] [mul(weight)].
    one_plus: GemmaRMSNorm's tail instead, all in fp32: [to(weight)] add(weight, 1) mul(x, 1 + weight)
    [type_as], the same op with 1 + weight for its weight."""
    first = i
    if seq[i].name in _CASTS and i + 1 < len(seq):
        i += 1
    if seq[i].name != "aten::pow" or _concrete(seq[i].args, 1) not in (None, "2"):
        return None
    x = (dims_of(seq[i]) or [None])[0]
    if not x:
        return None
    r = x[:-1] + [1]  # the per-row statistic
    weighted = ("aten::mul", lambda d: {tuple(v) for v in d[:2]} == {tuple(x), (x[-1],)}, one_plus)
    steps = [("aten::mean", lambda d: d[:1] == [x], True), ("aten::add", lambda d: d[:1] == [r], False),
             ("aten::rsqrt", lambda d: d[:1] == [r], True),
             ("aten::mul", lambda d: {tuple(v) for v in d[:2]} == {tuple(x), tuple(r)}, True)]
    steps += [("aten::add", lambda d: d[:1] == [[x[-1]]], True), weighted] if one_plus else [weighted]
    j = i + 1
    for name, fits, required in steps:
        while j < len(seq) and seq[j].name in _CASTS:
            j += 1
        if j < len(seq) and seq[j].name == name and fits(dims_of(seq[j])):
            j += 1
        elif required:
            return None
    if one_plus and j < len(seq) and seq[j].name in _CASTS and dims_of(seq[j])[:1] == [x]:
        j += 1  # type_as(x): back to the input's dtype
    members = seq[first:j]
    return x, DTYPES.get(type_of(members[0].args, 0)), members


def _gemma_rmsnorm_at(seq: list, i: int) -> tuple[list[int], str | None, list] | None:
    return _rmsnorm_at(seq, i, one_plus=True)


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


def _gate_up_at(seq: list, i: int) -> tuple[list[int], str | None, list] | None:
    """Phi-3's fused gate_up_proj: chunk(h [..., 2d], 2, -1), then silu(gate) and mul(up, silu)."""
    if seq[i].name != "aten::chunk" or _concrete(seq[i].args, 1) not in (None, "2"):
        return None
    h = (dims_of(seq[i]) or [None])[0]
    if not h or h[-1] % 2 or i + 1 == len(seq) or dims_of(seq[i + 1])[:1] != [h[:-1] + [h[-1] // 2]]:
        return None  # the gate is not h's first half along the last dim
    found = _swiglu_at(seq, i + 1, lookahead=2)
    return (found[0], found[1], [seq[i], *found[2]]) if found else None


_VIEWS = {"aten::slice", "aten::narrow", "aten::chunk", "aten::split", "aten::alias"}


def _rotary_shape(x: list[int], c: list[int]) -> list[int] | None:
    """[tokens, heads, head_dim] of q or k rotated by cos c, or None when c is no rotary's angle.
    Heads are the dim cos broadcasts over next to the sequence dim, cos varying along the other:
    [batch, heads, seq, d] with cos [.., 1, seq, d]; [batch, seq, heads, d] with cos [.., seq, 1, d];
    [tokens, heads, d] with cos [tokens, 1, d]."""
    if len(c) != len(x) or c[-1] != x[-1] or x[-1] % 2 or c == x or any(a not in (1, b) for a, b in zip(c, x)):
        return None
    if len(x) == 3:
        return [x[0], x[1], x[2]] if c[1] == 1 and c[0] == x[0] else None
    if len(x) != 4:
        return None
    if c[1] == 1 and c[2] == x[2]:  # unsqueeze_dim=1, HF's default
        return [x[0] * x[2], x[1], x[3]]
    if c[2] == 1 and c[1] == x[1]:  # unsqueeze_dim=2
        return [x[0] * x[1], x[2], x[3]]
    return None


def _rotary_at(seq: list, i: int, lookahead: int = 10) -> tuple[list[int], str | None, list] | None:
    """HF's q * cos + rotate_half(q) * sin on one of q or k: mul(x, cos), [slice, slice] neg(x2)
    cat(-x2, x1) (rotate_half), mul(rotated, sin), add."""
    if seq[i].name != "aten::mul":
        return None
    dims = dims_of(seq[i])
    if len(dims) < 2 or not all(type(n) is int for d in dims[:2] for n in d):
        return None
    x, c = dims[0], dims[1]
    shape = _rotary_shape(x, c)
    if shape is None:
        return None
    half = x[:-1] + [x[-1] // 2]
    steps = [("aten::neg", lambda d: d[:1] == [half]), ("aten::cat", lambda d: d[:1] == [[half, half]]),
             ("aten::mul", lambda d: d[:2] == [x, c]), ("aten::add", lambda d: d[:2] == [x, x])]
    j, end = i + 1, min(i + 1 + lookahead, len(seq))
    for name, fits in steps:
        while j < end and (seq[j].name in _CASTS or seq[j].name in _VIEWS and name == "aten::neg"):
            j += 1
        if j == end or seq[j].name != name or not fits(dims_of(seq[j])):
            return None
        j += 1
    return shape, DTYPES.get(type_of(seq[i].args, 0)), seq[i:j]


# Tried in this order at each call; the first that matches takes its calls.
PATTERNS = (("rmsnorm", _gemma_rmsnorm_at, "Gemma RMSNorm pattern (pow, mean, rsqrt, mul, 1 + weight)"),
            ("rmsnorm", _rmsnorm_at, "HF RMSNorm pattern (pow, mean, rsqrt, mul)"),
            ("silu_and_mul", _gate_up_at, "fused gate-up pattern (chunk, silu, mul)"),
            ("silu_and_mul", _swiglu_at, "SwiGLU pattern (silu, mul)"),
            ("rotary", _rotary_at, "rotary pattern (mul, neg, cat, mul, add)"))
