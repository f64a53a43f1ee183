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
from typing import Any, Callable

ALLOWED_IMPORTS = {"torch", "triton", "triton.language", "math", "typing", "functools"}
BANNED_NAMES = {"eval", "exec", "compile", "open", "__import__", "globals", "locals", "vars",
                "getattr", "setattr", "delattr", "breakpoint", "input", "memoryview"}


def variant_id(source: str, params: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    digest.update(source.encode())
    digest.update(json.dumps(params, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def render(template: str, params: dict[str, Any]) -> str:
    """Fill a template's $-placeholders; a missing parameter is an error, not a blank."""
    return string.Template(template).substitute({k: repr(v) for k, v in params.items()})


def static_problems(source: str) -> list[str]:
    """Reasons to refuse a source before it runs anywhere; empty when it may go to a worker."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return [f"syntax error at line {e.lineno}: {e.msg}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"import of {a.name} is not allowed" for a in node.names if a.name not in ALLOWED_IMPORTS]
        elif isinstance(node, ast.ImportFrom):
            if node.module not in ALLOWED_IMPORTS or node.level:
                problems.append(f"import from {node.module} is not allowed")
        elif isinstance(node, ast.Name) and node.id in BANNED_NAMES:
            problems.append(f"use of {node.id} is not allowed")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("__") and node.attr != "__init__":
            problems.append(f"access to {node.attr} is not allowed")
    launchers = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "launch"]
    if not launchers:
        problems.append("no top-level launch() function")
    jitted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in n.decorator_list)]
    if not jitted:
        problems.append("no @triton.jit kernel")
    elif launchers and not any(k.name in ast.unparse(launchers[0]) for k in jitted):
        problems.append("launch() calls none of the @triton.jit kernels")
    return problems


def load(source: str, params: dict[str, Any], expected_id: str, cache_dir: Path) -> Callable:
    """Import a variant's source and return its launch function, after checking its id."""
    actual = variant_id(source, params)
    if actual != expected_id:
        raise ValueError(f"variant source hashes to {actual}, not {expected_id}: refusing to load it")
    module = _import_file(source, Path(cache_dir) / f"kl_{expected_id}.py", f"kl_variant_{expected_id}")
    return module.launch


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
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
    return module
