"""Correctness of a variant's launcher against its op's torch reference, on fresh random inputs.

Runs inside the worker process, on every shape of the op's ODD_SHAPES (tails that divide no block)
and of the workload profile, several trials each with a new seed, in the key's dtype. The error is
||y - ref|| / ||ref|| in fp32, taken over the whole output and over each row (last dim) on its own,
so a wrong tail or a forgotten last row cannot hide in a large tensor's norm. NaN or Inf anywhere,
a wrong shape, dtype or device, or a launcher that writes into its inputs fails the check. Ops
that return several tensors (rmsnorm_residual's (y, residual)) have each output checked so.

Future work: poisoning the output buffer needs an `out=` argument that launchers do not take; for
now the allocator is only pre-filled with NaN before each call (best effort, see _poison_allocator).
"""
from types import ModuleType
from typing import Callable, Sequence

import torch


def check(launch: Callable, op: ModuleType, dtype: torch.dtype, profile_shapes: Sequence[Sequence[int]],
          device: str, trials: int, seed: int) -> tuple[bool, str]:
    """Run `launch` against `op.reference`; (True, summary) or (False, what failed, where, how much)."""
    tolerance = op.TOLERANCE[_dtype_name(dtype)]
    worst = 0.0
    for shape in unique_shapes(list(op.ODD_SHAPES) + [list(s) for s in profile_shapes]):
        for trial in range(trials):
            trial_seed = seed + trial
            where = f"shape {shape_text(shape)}, trial {trial} (seed {trial_seed})"
            inputs = op.make_inputs(list(shape), dtype, device, trial_seed)
            expected = op.reference(*inputs)
            saved = [t.clone() for t in inputs if isinstance(t, torch.Tensor)]
            for like in _as_tuple(expected):
                _poison_allocator(like)
            try:
                actual = launch(*inputs)
            except Exception as e:  # the caller decides whether a raise is a compile error
                raise LaunchError(f"launch raised on {where}: {type(e).__name__}: {e}") from e
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
