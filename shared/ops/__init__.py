"""The op catalog: op name -> module with reference, make_inputs, shape_bucket, example_shapes,
cost, TOLERANCE, ODD_SHAPES, SPACE, DEFAULT and TEMPLATE. Adding an op is adding one file here."""
from pathlib import Path
from types import ModuleType

import torch

from shared.ops import layernorm, matmul, rmsnorm, rmsnorm_residual, rotary, silu_and_mul, softmax

# Optional per op: prune(params, profile); eager(*args), torch's own fast path (the fallback on a
# GPU; the reference otherwise); op_shape(*args), the op's shape of a call when that is not the
# first argument's shape (matmul's [M, N, K]).
CATALOG: dict[str, ModuleType] = {op.NAME: op for op in (rmsnorm, rmsnorm_residual, layernorm, softmax,
                                                          silu_and_mul, rotary, matmul)}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# The folder of ops added with `kernelloop op add FILE` (shared/userops.py), set once at start-up by
# whoever read the settings (shared/service.py, the SDK, the command line); None: the catalog only.
_user_ops: Path | None = None


def use_user_ops(folder: Path | None) -> None:
    global _user_ops
    _user_ops = Path(folder) if folder is not None else None


def user_ops_folder() -> Path | None:
    return _user_ops


def get_op(name: str) -> ModuleType:
    try:
        return CATALOG[name]
    except KeyError:
        pass
    known = sorted(CATALOG)
    if _user_ops is not None:
        from shared import userops  # it imports this package for CATALOG

        user = userops.find_user_op(name, _user_ops)
        if user is not None:
            return user
        known += userops.user_op_names(_user_ops)
    raise KeyError(f"unknown op {name!r}; known ops: {', '.join(known)}") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise KeyError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None
