"""Where no GPU is, Triton must run in its interpreter; it reads TRITON_INTERPRET when a kernel
module is imported, so entry points call this first, before anything imports Triton kernels."""
import os
import shutil


def use_interpreter_without_gpu() -> bool:
    """Set TRITON_INTERPRET=1 unless a GPU driver is present or the caller chose already."""
    if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
        os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET") == "1"
