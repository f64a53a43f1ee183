"""The kernelloop::<op> custom ops and the one dispatch table every call of them goes through: `ops`
holds each catalog op (a torch.library custom op, dispatched per shape bucket to the deployed
variant or the op's fallback) and, on first use, each op added with `kernelloop op add`. The SDK's
observe() and patching both use them, so they live here, apart from either."""
import inspect
from pathlib import Path
from types import ModuleType

import torch
import torch.autograd.profiler as _profiler

from observer.sdk.dispatch import Dispatcher
from shared.ops import CATALOG, use_user_ops, user_ops_folder
from shared.settings import Settings
from shared.userops import find_user_op, user_op_names

# One table per process: every call of an op, compiled or not, dispatches through it (observe() hands
# it to the runtime, whose hot swap installs the deployed variants in it).
dispatcher = Dispatcher()


def traced() -> bool:
    """Whether torch.compile is tracing or the profiler recording: a call then goes through the
    custom op (one opaque node in the graph; kernelloop::<name> in the trace), else straight to the
    dispatch."""
    return torch.compiler.is_compiling() or _profiler._is_profiler_enabled


def _register(op: ModuleType):
    """The op as kernelloop::<name>, a PyTorch custom op whose schema is its reference's signature.
    A custom op is opaque to torch.compile: the graph keeps one call, and the dispatch (and with it
    the hot swap) happens inside it at run time. Its fake (shape) implementation is the reference
    itself, run on fake tensors, so outputs' shapes and dtypes cannot drift from the reference's."""
    name, signature = op.NAME, inspect.signature(op.reference)

    def impl(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()  # the dispatcher and the launchers take positional arguments
        return dispatcher.call(name, *bound.args)

    impl.__signature__ = signature  # read by torch's schema inference
    impl.__name__ = name
    custom = torch.library.custom_op(f"kernelloop::{name}", impl, mutates_args=())
    custom.register_fake(op.reference)
    n_params = len(signature.parameters)
    dispatch = dispatcher.call

    def call(*args, **kwargs):
        # Under torch.compile the graph gets the custom op, one opaque node; under the profiler the
        # trace shows it as kernelloop::<name> (observer/ingest/stats.py reads such traces). Otherwise
        # (CUDA graph capture included) the torch dispatcher's trip through the custom op costs the
        # host tens of microseconds per call for nothing: the call goes to kernelloop's dispatch.
        if traced():
            return custom(*args, **kwargs)
        if kwargs or len(args) != n_params:
            return impl(*args, **kwargs)
        return dispatch(name, *args)

    call.__signature__, call.__name__, call.__doc__ = signature, name, op.__doc__
    call.custom_op = custom  # torch.ops.kernelloop.<name> as well
    return call


def _register_user_op(op: ModuleType):
    """An op added with `kernelloop op add`: dispatched like a catalog op, per shape bucket, to its
    deployed variant or its reference. Its reference takes the Model's inputs then its parameters
    (*args), which torch.library cannot give a schema, so it is a plain function: under
    torch.compile the call is traced through (a graph break) rather than kept as one node."""
    name, dispatch = op.NAME, dispatcher.call

    def call(*args):
        return dispatch(name, *args)

    call.__name__, call.__doc__ = name, op.__doc__
    return call


class _Ops:
    """The catalog's ops, one attribute each (ops.rmsnorm, ops.matmul, ...), and ops added with
    `kernelloop op add` (found in the state folder on first use); forward only (inference)."""

    def __init__(self):
        for name, op in CATALOG.items():
            setattr(self, name, _register(op))

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        folder = _user_ops()
        try:
            op = find_user_op(name, folder)
        except KeyError as e:  # its file was edited by hand and no longer loads
            raise AttributeError(str(e)) from None
        if op is None:
            raise AttributeError(f"kernelloop.ops has no op {name!r}: the catalog has {', '.join(sorted(CATALOG))}; "
                                 f"add one with `kernelloop op add FILE` (KernelBench format)")
        call = _register_user_op(op)
        setattr(self, name, call)
        return call

    def __dir__(self):
        return sorted(CATALOG) + sorted(set(user_op_names(_user_ops())) - set(CATALOG))


def _user_ops() -> Path:
    """The folder of added ops: what the process set at start-up, else the settings' (a workload that
    only imports kernelloop.ops sets nothing); get_op then finds them too, for dispatch."""
    folder = user_ops_folder()
    if folder is None:
        folder = Settings().user_ops_dir
        use_user_ops(folder)
    return folder


ops = _Ops()
