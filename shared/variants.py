"""Variants: id = hash of source and params; rendering a template point; loading by id from a
file (Triton's jit needs one); and the static checks that run before any untrusted code does."""
import ast
import hashlib
import importlib.util
import json
import os
import string
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, NamedTuple

ALLOWED_IMPORTS = {"torch", "triton", "triton.language", "triton.language.extra", "triton.language.extra.libdevice",
                   "math", "typing", "functools", "triton.tools.tensor_descriptor"}
# Exceptions to BANNED_ATTRIBUTES: a host-side TMA descriptor is a plain record of a tensor's
# address, shape and strides; the rest of triton.tools (compile, link, disasm) stays out.
ALLOWED_ATTRIBUTES = ("triton.tools.tensor_descriptor.TensorDescriptor",)
BANNED_NAMES = {"eval", "exec", "compile", "open", "__import__", "globals", "locals", "vars",
                "getattr", "setattr", "delattr", "breakpoint", "input", "memoryview", "__builtins__"}
# Module attributes that reach files, processes, the network, native code or the compiler's insides.
BANNED_ATTRIBUTES = ("torch.load", "torch.save", "torch.from_file", "torch.hub", "torch.ops", "torch.utils",
                     "torch.library", "torch.classes", "torch.package", "torch.multiprocessing",
                     "torch.distributed", "torch.serialization", "torch.storage", "torch.compile", "torch.jit",
                     "torch.cuda.memory", "torch.backends", "torch.Tensor", "triton.runtime", "triton.compiler",
                     "triton.tools", "triton.backends", "triton.testing")
# What host code may call on torch: allocation, dtypes and device queries. Anything else computes the
# op's result outside the Triton kernels, which is not a kernel at all.
HOST_TORCH_CALLS = {"empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full",
                    "full_like", "arange", "device", "finfo", "iinfo", "is_tensor", "Size", "dtype",
                    "is_floating_point", "result_type", "promote_types", "get_default_dtype",
                    "cuda.current_device", "cuda.get_device_properties", "cuda.current_stream", "cuda.device",
                    "cuda.is_available", "cuda.get_device_capability", "cuda.get_device_name"}
# Tensor methods that do the op's arithmetic on the host.
HOST_TENSOR_MATH = {"sum", "mean", "var", "std", "norm", "matmul", "mm", "bmm", "addmm", "einsum", "softmax",
                    "log_softmax", "exp", "log", "sqrt", "rsqrt", "pow", "square", "relu", "gelu", "silu",
                    "sigmoid", "tanh", "cumsum", "cumprod", "prod", "amax", "amin", "argmax", "argmin", "max",
                    "min", "mul", "add", "sub", "div", "abs", "clamp", "layer_norm", "conv1d", "conv2d",
                    "baddbmm", "logsumexp", "topk", "sort", "masked_fill", "where", "erf", "sin", "cos",
                    "reciprocal", "neg", "dot", "outer", "mul_", "add_", "div_", "sub_", "copy_", "fill_",
                    "lerp", "addcmul", "index_select", "gather", "scatter", "scatter_add"}
# Tensor methods that leave torch for numpy or Python values, where the dispatcher (and so the
# benchmarker's record of host ops) no longer sees what is computed.
HOST_ESCAPES = {"numpy", "tolist"}


def variant_id(source: str, params: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    digest.update(source.encode())
    digest.update(json.dumps(params, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def render(template: str, params: dict[str, Any]) -> str:
    """Fill a template's $-placeholders; a missing parameter is an error, not a blank."""
    return string.Template(template).substitute({k: repr(v) for k, v in params.items()})


def static_problems(source: str) -> list[str]:
    """Reasons to refuse a source before it runs anywhere; empty when it may go to a worker.

    The source must parse, import only ALLOWED_IMPORTS, reach no file, process, network, eval or
    import machinery, define @triton.jit kernels that launch() really launches, and leave the op's
    arithmetic to those kernels (host code may only allocate and reshape)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return [f"syntax error at line {e.lineno}: {e.msg}"]
    problems = []
    aliases = _module_aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"import of {a.name} is not allowed" for a in node.names if a.name not in ALLOWED_IMPORTS]
        elif isinstance(node, ast.ImportFrom):
            if node.module not in ALLOWED_IMPORTS or node.level:
                problems.append(f"import from {node.module} is not allowed")
            else:
                problems += [f"import of {node.module}.{a.name} is not allowed" for a in node.names
                             if _banned_attribute(f"{node.module}.{a.name}") or a.name == "*"]
        elif isinstance(node, ast.Name) and node.id in BANNED_NAMES:
            problems.append(f"use of {node.id} is not allowed")
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("__") and node.attr != "__init__":
                problems.append(f"access to {node.attr} is not allowed")
            elif (dotted := _dotted(node, aliases)) and _banned_attribute(dotted):
                problems.append(f"use of {dotted} is not allowed")
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    jitted = {name for name, n in functions.items() if any("jit" in ast.unparse(d) for d in n.decorator_list)}
    host = {name: n for name, n in functions.items() if name not in jitted}
    if "launch" not in host:
        problems.append("no top-level launch() function")
    if not jitted:
        problems.append("no @triton.jit kernel")
    elif "launch" in host and not _launches_kernel(host, jitted):
        problems.append("launch() calls none of the @triton.jit kernels (expected kernel[grid](...))")
    for fn in host.values():
        problems += _host_math(fn, aliases)
    return list(dict.fromkeys(problems))  # one line per distinct reason


def _module_aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> module path, for `import torch as T`, `import triton.language as tl` and the like."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`tl.load` -> "triton.language.load" when the chain starts at an imported module, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    return ".".join([aliases[node.id], *reversed(parts)])


def _banned_attribute(dotted: str) -> bool:
    if any(part.startswith("_") for part in dotted.split(".")):
        return True  # torch._C, triton._utils...: private insides
    if dotted in ALLOWED_ATTRIBUTES:
        return False
    return any(dotted == b or dotted.startswith(b + ".") for b in BANNED_ATTRIBUTES)


def _launches_kernel(host: dict[str, ast.FunctionDef], jitted: set[str]) -> bool:
    """Whether launch(), or a host helper it calls, has a `kernel[grid](...)` for one of the kernels."""
    seen, todo = set(), ["launch"]
    while todo:
        name = todo.pop()
        if name in seen or name not in host:
            continue
        seen.add(name)
        for node in ast.walk(host[name]):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Subscript) and isinstance(func.value, ast.Name) and func.value.id in jitted:
                return True
            if isinstance(func, ast.Name):
                todo.append(func.id)
    return False


def _host_math(fn: ast.FunctionDef, aliases: dict[str, str]) -> list[str]:
    problems = []
    for node in ast.walk(fn):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            problems.append(f"{fn.name}() multiplies matrices on the host; do the work in a @triton.jit kernel")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        dotted = _dotted(node.func, aliases)
        if dotted is not None:
            if dotted.startswith("torch.") and dotted.removeprefix("torch.") not in HOST_TORCH_CALLS:
                problems.append(f"{fn.name}() calls {dotted}: host code may only allocate; "
                                "do the work in a @triton.jit kernel")
        elif node.func.attr in HOST_TENSOR_MATH:
            problems.append(f"{fn.name}() calls .{node.func.attr}() on the host; do the work in a @triton.jit kernel")
        elif node.func.attr in HOST_ESCAPES:
            problems.append(f"{fn.name}() calls .{node.func.attr}(): host code may not take tensors out of torch")
    return problems


class Loaded(NamedTuple):
    launch: Callable
    sha256: str  # of the source bytes that were executed: what a benchmark measured


def load(source: str, params: dict[str, Any], expected_id: str, cache_dir: Path) -> Callable:
    """Import a variant's source and return its launch function, after checking its id."""
    return load_measured(source, params, expected_id, cache_dir).launch


def load_measured(source: str, params: dict[str, Any], expected_id: str, cache_dir: Path) -> Loaded:
    """load(), plus the sha256 of the bytes that were executed, taken from those bytes themselves."""
    actual = variant_id(source, params)
    if actual != expected_id:
        raise ValueError(f"variant source hashes to {actual}, not {expected_id}: refusing to load it")
    module_name = f"kl_variant_{expected_id}"
    module = _import_file(source, Path(cache_dir) / f"kl_{expected_id}.py", module_name)
    return Loaded(module.launch, _EXECUTED[module_name])


def source_sha256(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


_EXECUTED: dict[str, str] = {}  # module name -> sha256 of the bytes it was executed from


def _import_file(source: str, path: Path, module_name: str) -> ModuleType:
    if module_name in sys.modules:
        return sys.modules[module_name]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != source:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # Execute the bytes that are hashed, not a second read of the file. Triton reads each kernel's
    # text back from the file while the module runs, so the file must still hold them afterwards.
    data = path.read_bytes()
    exec(compile(data, str(path), "exec"), module.__dict__)
    if path.read_bytes() != data:
        raise ValueError(f"{path} changed while it was loaded: refusing to use it")
    if data != source.encode():
        raise ValueError(f"{path} does not hold the variant's source: refusing to use it")
    sys.modules[module_name] = module
    _EXECUTED[module_name] = hashlib.sha256(data).hexdigest()
    return module
