"""The op catalog: op name -> module with reference, make_inputs, shape_bucket, example_shapes,
cost, TOLERANCE, ODD_SHAPES, SPACE, DEFAULT and TEMPLATE. Adding an op is adding one file here."""
from types import ModuleType

import torch

from shared.ops import rmsnorm

CATALOG: dict[str, ModuleType] = {rmsnorm.NAME: rmsnorm}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def get_op(name: str) -> ModuleType:
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(sorted(CATALOG))}") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise KeyError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None
