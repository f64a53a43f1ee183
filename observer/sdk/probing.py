"""Probe checks for module patching: a seeded probe input, and whether a block and the op's
reference compute the same on it, so that only a block that does is swapped."""
import logging
from typing import Callable

import torch

log = logging.getLogger("kernelloop.observer")

# Probe bar, relative norm error: a few roundings of the dtype. A look-alike that computes another
# function (a GELU gate, interleaved rotary pairs) misses it by orders of magnitude.
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@torch.no_grad()
def agrees(expected: Callable, got: Callable, dtype: torch.dtype) -> bool:
    """Whether two computations of a probe agree within the dtype's probe tolerance; what cannot
    be run (weights on the meta device, say) does not agree."""
    try:
        want, have = expected(), got()
    except Exception as e:
        log.debug("patch: probe failed: %s", e)
        return False
    want = want if isinstance(want, tuple) else (want,)
    have = have if isinstance(have, tuple) else (have,)
    bar = PROBE_TOLERANCE.get(dtype, 2e-2)
    return len(want) == len(have) and all(
        w.shape == h.shape and bool((w.float() - h.float()).norm() <= bar * w.float().norm())
        for w, h in zip(want, have))


def probe_input(shape: tuple[int, ...], like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A seeded random input of `shape` on `like`'s device and dtype."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(like.device, like.dtype)
