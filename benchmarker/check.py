"""Correctness of a variant's launcher against its op's torch reference, on fresh random inputs.

Runs inside the worker process, on every shape of the op's ODD_SHAPES (tails that divide no block)
and of the workload profile, several trials each with a new seed, in the key's dtype. The error is
||y - ref|| / ||ref|| in fp32, taken over the whole output and over each row (last dim) on its own,
so a wrong tail or a forgotten last row cannot hide in a large tensor's norm. NaN or Inf anywhere,
a wrong shape, dtype or device, or a launcher that writes into its inputs fails the check. Ops
that return several tensors (rmsnorm_residual's (y, residual)) have each output checked so.

The trials are arranged against launchers that remember: after the first, each trial writes new
values into the same input tensors (a result cached by tensor, address or shape is then stale),
and the last scales the first input up (a kernel right only on small or unit-range values fails).
Every launch runs under a record of the torch ops it makes on the host: anything beyond
allocating, viewing and copying is torch doing the work, not a kernel (HostCompute).

Future work: poisoning the output buffer needs an `out=` argument that launchers do not take; for
now the allocator is only pre-filled with NaN before each call (best effort, see _poison_allocator).
"""
from types import ModuleType
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The first input is scaled by this in the last trial: far outside [0, 1), and past fp16's range
# once squared (256^2 * the inputs' own spread), well inside it unsquared.
LARGE_SCALE = 256.0
# What a launcher may ask of torch on the host: allocate, view, copy, cast, fill. The Triton
# interpreter's own argument copies are in here too.
HOST_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "new_zeros", "new_ones",
            "new_full", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "fill_", "zero_", "arange",
            "view", "_unsafe_view", "_reshape_alias", "as_strided", "expand", "permute", "transpose", "t",
            "unsqueeze", "squeeze", "select", "slice", "split", "split_with_sizes", "unbind", "narrow", "alias",
            "detach", "clone", "copy_", "_to_copy", "set_", "lift_fresh", "resize_", "sym_size", "sym_stride",
            "sym_numel", "sym_storage_offset", "is_same_size", "_local_scalar_dense"}


def check(launch: Callable, op: ModuleType, dtype: torch.dtype, profile_shapes: Sequence[Sequence[int]],
          device: str, trials: int, seed: int) -> tuple[bool, str]:
    """Run `launch` against `op.reference`; (True, summary) or (False, what failed, where, how much).
    Raises LaunchError when the launcher raises, HostCompute when it computes with torch."""
    tolerance = op.TOLERANCE[_dtype_name(dtype)]
    worst = 0.0
    for shape in unique_shapes(list(op.ODD_SHAPES) + [list(s) for s in profile_shapes]):
        inputs = None
        for trial in range(trials + 1):
            trial_seed = seed + trial
            large = trial == trials
            where = f"shape {shape_text(shape)}, trial {trial}{' (large inputs)' if large else ''} (seed {trial_seed})"
            fresh = op.make_inputs(list(shape), dtype, device, trial_seed)
            if large:
                fresh = scaled_first(fresh, LARGE_SCALE)
            inputs = fresh if inputs is None else refill(inputs, fresh)
            expected = op.reference(*inputs)
            if large and not all(bool(torch.isfinite(e).all()) for e in _as_tuple(expected)):
                continue  # the dtype cannot hold the answer at this scale: nothing to compare
            saved = [t.clone() for t in inputs if isinstance(t, torch.Tensor)]
            for like in _as_tuple(expected):
                _poison_allocator(like)
            with HostOps() as host:
                try:
                    actual = launch(*inputs)
                except Exception as e:  # the caller decides whether a raise is a compile error
                    raise LaunchError(f"launch raised on {where}: {type(e).__name__}: {e}") from e
            if computed := host.computed():
                raise HostCompute(host_compute_message(computed, where))
            problem = outputs_problem(actual, expected)
            if problem is None and not _unchanged(inputs, saved):
                problem = "the launcher wrote into its inputs"
            if problem is not None:
                return False, f"{problem} on {where}"
            error = max(relative_error(a, e) for a, e in zip(_as_tuple(actual), _as_tuple(expected)))
            if not error <= tolerance:  # written so that a NaN error fails too
                return False, f"error {error:.3g} > tolerance {tolerance:g} on {where}"
            worst = max(worst, error)
    return True, f"max error {worst:.3g} <= tolerance {tolerance:g}"


def refill(inputs: tuple, fresh: tuple) -> tuple:
    """Write fresh's values into the tensors of inputs and return inputs: same tensors, same
    addresses, new contents."""
    for old, new in zip(inputs, fresh):
        if isinstance(old, torch.Tensor):
            old.copy_(new)
    return inputs


def scaled_first(inputs: tuple, scale: float) -> tuple:
    """inputs with the first floating-point tensor multiplied by scale (the activation)."""
    out, done = [], False
    for t in inputs:
        if not done and isinstance(t, torch.Tensor) and t.is_floating_point():
            t, done = t * scale, True
        out.append(t)
    return tuple(out)


class HostOps(TorchDispatchMode):
    """Records the aten ops that run on the host while it is active (a launcher's own torch calls;
    Triton kernels do not go through the dispatcher)."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def computed(self) -> list[str]:
        """The recorded ops that compute rather than allocate, view or copy."""
        return sorted(self.ops - HOST_OPS)


def host_compute_message(ops: Sequence[str], where: str) -> str:
    return (f"launch() computed with torch on the host ({', '.join('aten.' + o for o in ops)}) on {where}; "
            "the work must be done in @triton.jit kernels")


class HostCompute(RuntimeError):
    """The launcher did (part of) the op's arithmetic with torch instead of in its kernels."""


class LaunchError(RuntimeError):
    """The launcher raised during the check; the message names the shape and trial."""


def outputs_problem(actual, expected) -> str | None:
    """output_problem for ops that return one tensor or a tuple of them (e.g. (y, residual))."""
    if not isinstance(expected, tuple):
        return output_problem(actual, expected)
    if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
        return f"launch returned {type(actual).__name__}, not a tuple of {len(expected)} tensors"
    for i, (a, e) in enumerate(zip(actual, expected)):
        if (problem := output_problem(a, e)) is not None:
            return f"output {i}: {problem}"
    return None


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def output_problem(actual, expected: torch.Tensor) -> str | None:
    """What makes an output unusable before its values are compared, or None."""
    if not isinstance(actual, torch.Tensor):
        return f"launch returned {type(actual).__name__}, not a tensor"
    if tuple(actual.shape) != tuple(expected.shape):
        return f"output shape {list(actual.shape)} != expected {list(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"output dtype {actual.dtype} != expected {expected.dtype}"
    if actual.device != expected.device:
        return f"output device {actual.device} != expected {expected.device}"
    finite = torch.isfinite(actual)
    if not bool(finite.all()):
        first = tuple(int(i) for i in (~finite).nonzero()[0])
        return f"non-finite output ({int((~finite).sum())} elements, first at {list(first)})"
    return None


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max(||y - ref|| / ||ref|| over the whole tensor, the same over each row), in fp32."""
    y, ref = actual.float(), expected.float()
    whole = _ratio(torch.linalg.vector_norm(y - ref), torch.linalg.vector_norm(ref))
    if ref.dim() < 2:
        return whole
    # rows: [rows, last]; a tiny floor keeps an all-zero reference row from dividing by zero
    rows_y, rows_ref = y.reshape(-1, y.shape[-1]), ref.reshape(-1, ref.shape[-1])
    diff = torch.linalg.vector_norm(rows_y - rows_ref, dim=-1)
    norm = torch.linalg.vector_norm(rows_ref, dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return max(whole, float((diff / norm).max()))


def unique_shapes(shapes: Sequence[Sequence[int]]) -> list[list[int]]:
    seen, out = set(), []
    for shape in shapes:
        if tuple(shape) not in seen:
            seen.add(tuple(shape))
            out.append(list(shape))
    return out


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    num, den = float(num), float(den)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def _unchanged(inputs: tuple, saved: list[torch.Tensor]) -> bool:
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    return all(torch.equal(t, s) for t, s in zip(tensors, saved))


def _poison_allocator(like: torch.Tensor) -> None:
    # A launcher that leaves elements unwritten returns whatever the allocator hands back. Freeing
    # a NaN block of the output's size first makes that garbage likely NaN (reliably so with the
    # CUDA caching allocator), so an unwritten element fails the finite check instead of passing.
    block = torch.full_like(like, float("nan"))
    del block


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TimedCheck:
    """Checks the calls that are timed, outside their timed windows (benchmarker/timing.py calls
    before, call and after). Before every call the first input gets values no call saw before (a
    rotation of the original by a secret amount), and afterwards the output of fn `checked` is
    compared with the reference: a launcher that skips work on inputs it has seen, keeps results
    between calls or leaves state behind for the next timed run returns a stale answer here. Every
    call is recorded as in check(), so torch doing the work only while timed is caught too. On a
    GPU the comparison stays on the device and is read once, in verdict()."""

    def __init__(self, op: ModuleType, inputs: tuple, tolerance: float, seed: int, checked: int):
        self.op, self.inputs, self.tolerance, self.checked = op, inputs, tolerance, checked
        self.first = next((t for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
        self.original = self.first.clone() if self.first is not None else None
        self.rng = torch.Generator(device="cpu").manual_seed(seed)
        self.expected = None
        self.calls = 0
        self.errors: list[tuple[int, torch.Tensor]] = []  # (call, relative error on the device)
        self.problems: list[str] = []
        self.host: set[str] = set()

    def before(self, i: int) -> None:
        if self.first is not None and self.first.numel() > 1:
            shift = int(torch.randint(1, self.first.numel(), (1,), generator=self.rng))
            self.first.copy_(self.original.flatten().roll(shift).view_as(self.first))
        if i == self.checked:
            self.expected = self.op.reference(*self.inputs)
            for like in _as_tuple(self.expected):
                _poison_allocator(like)

    def call(self, i: int, fn: Callable, args: tuple):
        with HostOps() as host:  # every fn, so each pays the same for the record
            out = fn(*args)
        if i == self.checked:
            self.host |= set(host.computed())
        return out

    def after(self, i: int, out) -> None:
        if i != self.checked:
            return
        self.calls += 1
        expected = _as_tuple(self.expected)
        actual = _as_tuple(out)
        if len(actual) != len(expected) or not all(
                isinstance(a, torch.Tensor) and a.shape == e.shape and a.dtype == e.dtype
                for a, e in zip(actual, expected)):
            self.problems.append(f"timed call {self.calls} returned {outputs_problem(out, self.expected)}")
            return
        for a, e in zip(actual, expected):
            # NaN anywhere makes the error NaN, which fails the comparison in verdict()
            diff = torch.linalg.vector_norm(a.float() - e.float())
            self.errors.append((self.calls, diff / torch.linalg.vector_norm(e.float()).clamp_min(1e-30)))

    def computed(self) -> list[str]:
        return sorted(self.host)

    def verdict(self) -> str | None:
        """What was wrong with the checked fn's timed outputs, or None."""
        if self.problems:
            return self.problems[0]
        if not self.errors:
            return None
        errors = torch.stack([e for _, e in self.errors]).cpu().tolist()  # the one read of the device
        for (call, _), error in zip(self.errors, errors):
            if not error <= self.tolerance:
                return (f"timed call {call} of {self.calls}: error {error:.3g} > tolerance {self.tolerance:g} on "
                        "inputs it had not seen (a result kept or work skipped between calls)")
        return None
