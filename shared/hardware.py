"""The hardware fingerprint: which machine served or measured a kernel, as a registry token."""
import os
import re
import socket

import torch
import triton

from shared.schemas import Hardware


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()


def device() -> str:
    return "cpu" if interpreted() else "cuda"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:64]


def fingerprint() -> Hardware:
    if interpreted():
        name, key = "CPU (Triton interpreter)", "cpu-interpreter"
    else:
        name = torch.cuda.get_device_name()
        key = slug(name)
    return Hardware(
        key=key,
        name=name,
        interpreter=interpreted(),
        torch=torch.__version__,
        triton=triton.__version__,
        host=socket.gethostname(),
    )
