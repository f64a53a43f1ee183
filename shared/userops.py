"""The user-op store: ops added with `kernelloop op add FILE` (KernelBench format, loaded by
shared/ops/kernelbench.py), kept as their source files in one folder, `<state dir>/ops/<name>.py`.

Every service resolves ops synchronously (the benchmarker's workers included, which hold no NATS
connection), and the services that `kernelloop up` starts share that state dir, so a file there is
seen by all of them at their next lookup. Services on other machines get the same files from the
OPS_BUCKET KV mirror (publish_op / sync_ops). The folder is always an argument: whoever starts a
process knows it from the settings (shared/ops `use_user_ops`)."""
import ast
import re
import types
from pathlib import Path

import nats.js.errors

from shared.ops import CATALOG
from shared.ops.kernelbench import OpFileError, load_op, validate

_NAME = r"^[A-Za-z0-9_\-]{1,64}$"
_CACHE: dict[Path, tuple[float, types.ModuleType]] = {}


def register_op_file(path: str | Path, folder: Path, name: str | None = None) -> types.ModuleType:
    """Validate a KernelBench-format file and add it as op `name` (default: the file's NAME, else its
    stem) under `folder`. Raises OpFileError naming what is wrong; an op of the catalog cannot be
    replaced. Adding a name again replaces that user op."""
    path = Path(path)
    if not path.is_file():
        raise OpFileError(f"{path}: no such file")
    name = name or getattr(_peek_name(path), "value", None) or path.stem
    if not re.match(_NAME, name):
        raise OpFileError(f"op name {name!r}: letters, digits, '_' and '-' only, at most 64")
    if name in CATALOG:
        raise OpFileError(f"op {name!r} is built in; give the file another name (or NAME = ...)")
    source = path.read_text()
    op = load_op(source, name, str(path))
    validate(op)
    _write(Path(folder) / f"{name}.py", source.encode())
    return op


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)  # atomic: a service never reads half a file


def _peek_name(path: Path):
    """The file's NAME = "..." if it sets one, read without running it."""
    try:
        tree = ast.parse(path.read_text())
    except SyntaxError as e:
        raise OpFileError(f"{path}: syntax error at line {e.lineno}: {e.msg}") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NAME" for t in node.targets):
            return node.value if isinstance(node.value, ast.Constant) else None
    return None


def find_user_op(name: str, folder: Path) -> types.ModuleType | None:
    """The op added under this name, or None; reloaded when its file changes."""
    if not re.match(_NAME, name):
        return None
    path = Path(folder) / f"{name}.py"
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    cached = _CACHE.get(path)
    if cached is None or cached[0] != mtime:
        try:
            cached = (mtime, load_op(path.read_text(), name, str(path)))
        except Exception as e:  # edited by hand since it was added: callers treat it as unknown
            raise KeyError(f"op {name!r}: {path} no longer loads: {type(e).__name__}: {e}") from None
        _CACHE[path] = cached
    return cached[1]


def user_op_names(folder: Path) -> list[str]:
    folder = Path(folder)
    return sorted(p.stem for p in folder.glob("*.py")) if folder.is_dir() else []


async def publish_op(kv, name: str, folder: Path) -> int:
    """Mirror an added op into the OPS_BUCKET KV (kv: a nats KeyValue), for services elsewhere."""
    return await kv.put(name, (Path(folder) / f"{name}.py").read_bytes())


async def sync_ops(kv, folder: Path) -> list[str]:
    """Write every op of the OPS_BUCKET KV into this machine's folder; the names written."""
    try:
        names = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    written = []
    for name in names:
        entry = await kv.get(name)
        target = Path(folder) / f"{name}.py"
        if entry.value and (not target.exists() or target.read_bytes() != entry.value):
            _write(target, entry.value)
            written.append(name)
    return written
