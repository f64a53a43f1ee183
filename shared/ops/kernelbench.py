"""Ops declared in the KernelBench problem format: a Python file with a `Model` nn.Module whose forward
is the reference, `get_inputs()` and `get_init_inputs()`, and the sizes get_inputs uses as
module-level ints (`batch_size = 16`, `dim = 16384`). From it kernelloop derives what a catalog op
module has, so such an op is observed, searched (by the LLM: it has no template), benchmarked and
deployed like the built-in ones.

- The shape of a call is the list of those sizes (SHAPE_PARAMS, by default every module-level int
  that get_inputs reads, in file order); make_inputs sets them, seeds torch and calls get_inputs.
- The model's parameters and buffers become extra launcher arguments after the forward's, so the
  reference is a pure function of its inputs: `launch(x, weight, bias)` for a Linear.
- The reference runs in float32 and casts back, as real kernels accumulate.
- Optional in the file: SHAPE_PARAMS, TOLERANCE (per dtype), ODD_SHAPES, DTYPES, NAME, a docstring.

Op files are operator-provided code, trusted like a file in shared/ops/; they run in every service
that handles the op. Generated kernels still run only in the benchmarker's workers.
"""
import ast
import math
import threading
import types
from pathlib import Path

import torch

from shared.ops.base import Cost

DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
_LOCK = threading.RLock()  # make_inputs rebinds the file's size globals for the call


FALLBACK_TEMPLATE = '''"""Fallback of op NAME: its torch reference; no Triton kernel serves it yet."""
from shared.ops import get_op


def launch(*args):
    return get_op("NAME").reference(*args)
'''


class OpFileError(ValueError):
    """An op file that does not follow the KernelBench format; the message names what is wrong."""


def load_op(source: str, name: str, filename: str = "<op file>") -> types.ModuleType:
    """A catalog-style op module built from a KernelBench-format source."""
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as e:
        raise OpFileError(f"{filename}: syntax error at line {e.lineno}: {e.msg}") from None
    file = types.ModuleType(f"kernelloop_user_op_{name}")
    file.__file__ = filename
    exec(compile(tree, filename, "exec"), file.__dict__)  # noqa: S102 - an operator's op file, see above
    for needed in ("Model", "get_inputs", "get_init_inputs"):
        if not hasattr(file, needed):
            raise OpFileError(f"{filename}: no `{needed}` defined (KernelBench format: Model, get_inputs, "
                              "get_init_inputs)")
    params = list(getattr(file, "SHAPE_PARAMS", None) or _size_globals(tree, file))
    for p in params:
        if not isinstance(file.__dict__.get(p), int):
            raise OpFileError(f"{filename}: shape parameter {p!r} is not a module-level int")
    model = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Model"), None)
    loops = model is not None and any(isinstance(n, (ast.For, ast.While)) for n in ast.walk(model))
    return _OpBuilder(file, source, name, params, filename, loops).build()


def _size_globals(tree: ast.Module, file: types.ModuleType) -> list[str]:
    """Module-level ints that get_inputs or get_init_inputs read (directly or through a helper)."""
    ints = [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
            if isinstance(t, ast.Name) and isinstance(file.__dict__.get(t.id), int)
            and not isinstance(file.__dict__.get(t.id), bool)]
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    read, todo, seen = set(), ["get_inputs", "get_init_inputs"], set()
    while todo:
        fn = todo.pop()
        if fn in seen or fn not in functions:
            continue
        seen.add(fn)
        for node in ast.walk(functions[fn]):
            if isinstance(node, ast.Name):
                read.add(node.id)
                todo.append(node.id)
    return list(dict.fromkeys(i for i in ints if i in read))


class _OpBuilder:
    def __init__(self, file, source: str, name: str, params: list[str], filename: str, loops: bool):
        self.file, self.source, self.name, self.params, self.filename = file, source, name, params, filename
        self.loops = loops  # Model has Python loops: no FLOP count (see _count)
        self.example = [file.__dict__[p] for p in params]
        self._models: dict = {}
        self._costs: dict = {}
        self.op_shape = self.op_shape_fn()

    def build(self) -> types.ModuleType:
        f = self.file
        op = types.ModuleType(f"kernelloop.user_ops.{self.name}")
        model = self.model(self.example)
        forward_args = [p for p in _signature_names(model.forward)]
        tensors = [n.replace(".", "_") for n, _ in self.state(model)]
        op.__doc__ = ((f.__doc__ or "").strip() or f"User op {self.name}: Model.forward is the reference.") + (
            f"\nShape of a call: [{', '.join(self.params)}] (KernelBench format; file {Path(self.filename).name}).")
        if tensors:
            op.__doc__ += f"\nThe model's parameters and buffers come after forward's inputs: {', '.join(tensors)}."
        op.NAME = getattr(f, "NAME", self.name)
        op.DTYPES = tuple(getattr(f, "DTYPES", ("float32", "float16", "bfloat16")))
        op.TOLERANCE = {**DEFAULT_TOLERANCE, **getattr(f, "TOLERANCE", {})}
        op.SHAPE_PARAMS = list(self.params)
        op.LAUNCH_SIGNATURE = f"launch({', '.join(forward_args + tensors)})"
        op.REFERENCE_SOURCE = self.source
        # No Triton template: the LLM writes the kernels. Where a catalog op's fallback is its
        # template at DEFAULT (the interpreter), this op's is its torch reference, through this launcher.
        op.SPACE, op.DEFAULT, op.TEMPLATE_IS_REFERENCE = {}, {}, True
        op.TEMPLATE = FALLBACK_TEMPLATE.replace("NAME", op.NAME)
        op.reference = self.reference
        op.make_inputs = self.make_inputs
        op.shape_bucket = shape_bucket
        op.example_shapes = example_shapes
        op.cost = self.cost
        op.op_shape = self.op_shape
        op.ODD_SHAPES = tuple(getattr(f, "ODD_SHAPES", None) or self.odd_shapes())
        op.EXAMPLE_SHAPE = list(self.example)
        return op

    # ---- the reference and its inputs ------------------------------------------------------------

    def model(self, shape: list[int]) -> torch.nn.Module:
        """The Model at these sizes (get_init_inputs may read them), built once with a fixed seed."""
        key = tuple(shape)
        if key not in self._models:
            with _LOCK, self._sizes(shape), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self._models[key] = self.file.Model(*self.file.get_init_inputs()).eval()
        return self._models[key]

    def state(self, model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
        return list(model.named_parameters()) + list(model.named_buffers())

    def reference(self, *args):
        model = self.model(self.op_shape(*args))
        names = [n for n, _ in self.state(model)]
        n_inputs = len(args) - len(names)
        out_dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with torch.no_grad():
            out = torch.func.functional_call(model, dict(zip(names, up[n_inputs:])), tuple(up[:n_inputs]))
        return _cast(out, out_dtype)

    def make_inputs(self, shape: list[int], dtype: torch.dtype, device: str, seed: int) -> tuple:
        """Fresh inputs at this shape; the model's parameters after them, drawn from the same seed."""
        with _LOCK, self._sizes(shape), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inputs = list(self.file.get_inputs())
            with torch.no_grad():
                # fresh weights each call: the initialised ones moved by noise at their own scale
                state = [t + torch.randn_like(t) * 0.5 * max(float(t.float().std()) if t.numel() > 1 else 0.0, 0.1)
                         if t.is_floating_point() else t.clone() for _, t in self.state(self.model(shape))]
        return tuple(_to(t, dtype, device) for t in inputs + state)

    def _sizes(self, shape: list[int]):
        file, params = self.file, self.params
        if len(shape) != len(params):
            raise ValueError(f"op {self.name}: a shape is [{', '.join(params)}], got {shape}")

        class Sizes:
            def __enter__(self):
                self.saved = [file.__dict__[p] for p in params]
                file.__dict__.update(zip(params, shape))

            def __exit__(self, *exc):
                file.__dict__.update(zip(params, self.saved))

        return Sizes()

    def cost(self, shape: list[int], dtype: torch.dtype) -> Cost:
        key = (tuple(shape), dtype)
        if key not in self._costs:
            self._costs[key] = self._count(shape, dtype)
        return self._costs[key]

    def _count(self, shape: list[int], dtype: torch.dtype) -> Cost:
        """FLOPs counted by torch's flop counter and bytes of inputs plus outputs. Small shapes run
        for real on the CPU (meta tensors are slow per op, and references may loop in Python); large
        ones on meta tensors, so nothing big is allocated. An op the counter does not know costs bytes."""
        from torch.utils.flop_counter import FlopCounterMode

        device = "cpu" if math.prod(shape) <= 1 << 20 else "meta"
        if device == "cpu":
            args = list(self.make_inputs(list(shape), dtype, "cpu", 0))
            n = len(args) - len(self.state(self.model(shape)))
            inputs, state = args[:n], args[n:]
        else:
            with _LOCK, self._sizes(shape), torch.device("meta"):
                inputs = [_to(t, dtype, "meta") for t in self.file.get_inputs()]
            state = [t.to("meta", dtype=dtype if t.is_floating_point() else t.dtype)
                     for _, t in self.state(self.model(shape))]
        bytes_in = sum(t.numel() * t.element_size() for t in inputs + state if isinstance(t, torch.Tensor))
        try:
            with torch.device(device):
                out = self.reference(*inputs, *state)
            flops = 0
            if not self.loops:  # the flop counter costs ~ms per op: a Python loop would take seconds
                counter = FlopCounterMode(display=False)
                with counter, torch.device(device):
                    self.reference(*inputs, *state)
                flops = counter.get_total_flops()
            outs = out if isinstance(out, (tuple, list)) else [out]
            bytes_out = sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
        except Exception:  # an op the meta device cannot run: count what is read only
            flops, bytes_out = 0, 0
        return Cost(flops=int(flops), bytes_moved=int(bytes_in + bytes_out))

    def op_shape_fn(self):
        """args -> the call's shape: each size read off the input dimension that follows it."""
        where = {}
        with torch.device("meta"):
            base = self._meta_shapes(self.example)
            for i, p in enumerate(self.params):
                probe = list(self.example)
                probe[i] += 1
                try:
                    changed = self._meta_shapes(probe)
                except Exception:
                    continue
                for j, (a, b) in enumerate(zip(base, changed)):
                    dims = [d for d, (x, y) in enumerate(zip(a, b)) if x != y]
                    if dims and p not in where:
                        where[p] = (j, dims[0])
        example = list(self.example)
        params = list(self.params)

        def op_shape(*args) -> list[int]:
            return [int(args[where[p][0]].shape[where[p][1]]) if p in where else example[i]
                    for i, p in enumerate(params)]

        return op_shape

    def _meta_shapes(self, shape: list[int]) -> list[tuple]:
        """Shapes of the launcher's arguments at these sizes, on the meta device (nothing allocated)."""
        with _LOCK, self._sizes(shape), torch.device("meta"):
            inputs = list(self.file.get_inputs())
            state = [t for _, t in self.state(self.file.Model(*self.file.get_init_inputs()))]
        return [tuple(t.shape) if isinstance(t, torch.Tensor) else () for t in inputs + state]

    def odd_shapes(self) -> list[list[int]]:
        """The example with every size made odd and smaller (masked tails), if the reference takes it."""
        odd = [max(1, v // 2 - 1) | 1 for v in self.example]
        if odd == self.example:
            return [self.example]
        try:
            self.reference(*self.make_inputs(odd, torch.float32, "cpu", 0))
        except Exception:
            return [self.example]
        return [odd]


def shape_bucket(shape: list[int]) -> str:
    """Kernels are specialised per exact size: the bucket is the shape itself."""
    return "s" + "x".join(str(int(v)) for v in shape)


def example_shapes(bucket: str) -> list[list[int]]:
    return [[int(v) for v in bucket.removeprefix("s").split("x")]]


def _signature_names(fn) -> list[str]:
    import inspect

    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _to(t, dtype: torch.dtype, device: str):
    if not isinstance(t, torch.Tensor):
        return t
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _cast(out, dtype):
    if dtype is None:
        return out
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_cast(o, dtype) for o in out)
    return out


def validate(op: types.ModuleType) -> None:
    """Run the reference once at the example shape and on the odd shapes: a broken file fails here,
    at registration, not in the middle of a campaign."""
    for shape in [op.EXAMPLE_SHAPE, *op.ODD_SHAPES]:
        if math.prod(shape) > 1 << 26:
            continue  # too large to run at registration; the benchmarker will
        try:
            out = op.reference(*op.make_inputs(list(shape), torch.float32, "cpu", 0))
        except Exception as e:
            raise OpFileError(f"op {op.NAME}: the reference fails at shape {shape}: {type(e).__name__}: {e}") from e
        if not isinstance(out, torch.Tensor):
            raise OpFileError(f"op {op.NAME}: Model.forward must return one tensor, got {type(out).__name__}")
    bucket = op.shape_bucket(op.EXAMPLE_SHAPE)
    if op.example_shapes(bucket) != [op.EXAMPLE_SHAPE]:
        raise OpFileError(f"op {op.NAME}: bucket {bucket} does not round-trip to its shape")
