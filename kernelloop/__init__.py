"""kernelloop's public face: what a workload imports, re-exported from the observer's SDK.

    import kernelloop
    runtime = kernelloop.observe()          # publish kernel.stats, follow the registry
    y = kernelloop.ops.rmsnorm(x, weight)   # served by the deployed variant for x's shape bucket
    kernelloop.patch(model)                 # serve a model's RMSNorm, SwiGLU, rotary, softmax by ops
    kernelloop.patched(model)               # what was swapped, by module path
    kernelloop.unpatch(model)               # the original modules again
"""

__all__ = ["ops", "observe", "patch", "unpatch", "patched"]


def __getattr__(name: str):
    # Lazy, so `kernelloop --help` does not import torch and Triton.
    if name in __all__:
        from observer import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'kernelloop' has no attribute {name!r}")
