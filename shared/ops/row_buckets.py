"""Shape buckets of row-wise ops: the row length exactly (kernels specialise on it) and the number
of rows in decode / small / prefill ranges, e.g. h4096-r16."""
import math

_RANGES = ((16, "r16"), (256, "r256"), (4096, "r4k"))
_REPRESENTATIVE = {"r16": 16, "r256": 256, "r4k": 4096, "rbig": 16384}


def bucket(shape: list[int], prefix: str = "h") -> str:
    length, rows = shape[-1], math.prod(shape[:-1])
    name = next((name for limit, name in _RANGES if rows <= limit), "rbig")
    return f"{prefix}{length}-{name}"


def example(bucket_name: str, prefix: str = "h") -> list[list[int]]:
    """A representative shape for a bucket, for hand-written events that name no shapes; a name
    this op's buckets cannot have raises ValueError (or KeyError for the rows part)."""
    length_part, rows_part = bucket_name.split("-", 1)
    if not length_part.startswith(prefix):
        raise ValueError(f"bucket {bucket_name!r} does not start with {prefix!r}")
    return [[_REPRESENTATIVE[rows_part], int(length_part.removeprefix(prefix))]]


def block_too_wide(params: dict, profile) -> bool:
    """At most one BLOCK above the longest row's next power of 2: wider blocks only mask work off."""
    length = max(s.shape[-1] for s in profile)
    return params["BLOCK"] > 2 * (1 << (length - 1).bit_length())
