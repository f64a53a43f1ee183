"""The op catalog: op name -> module with reference, make_inputs, shape_bucket, example_shapes,
cost, TOLERANCE, ODD_SHAPES, SPACE, DEFAULT and TEMPLATE. Adding an op is adding one file here."""
from types import ModuleType

import torch

from shared.ops import layernorm, matmul, rmsnorm, rmsnorm_residual, rotary, silu_and_mul, softmax

# Optional per op: prune(params, profile); eager(*args), torch's own fast path (the fallback on a
# GPU; the reference otherwise); op_shape(*args), the op's shape of a call when that is not the
# first argument's shape (matmul's [M, N, K]).
CATALOG: dict[str, ModuleType] = {op.NAME: op for op in (rmsnorm, rmsnorm_residual, layernorm, softmax,
                                                          silu_and_mul, rotary, matmul)}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def get_op(name: str) -> ModuleType:
    try:
        return CATALOG[name]
    except KeyError:
        pass
    # ops added with `kernelloop op add FILE` (KernelBench format), kept under the state dir
    from shared.ops import kernelbench

    user = kernelbench.find_user_op(name)
    if user is not None:
        return user
    known = sorted(CATALOG) + kernelbench.user_op_names()
    raise KeyError(f"unknown op {name!r}; known ops: {', '.join(known)}") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise KeyError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None
