"""One device, several benchmark workers: their compiles and checks may overlap, their timings may
not overlap anything. A reader-writer lock across processes on two lock files:

    with lock.shared():      # compile and check: any number at once
    with lock.exclusive():   # timing: alone on the device, no other worker's kernels running

A worker waiting for exclusive holds the turnstile, so readers that arrive later wait behind it:
a steady stream of checks cannot starve a timing. flock locks die with their process, so a
worker that is killed mid-stage leaves nothing held.
"""
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def device_id(device: str) -> str:
    """A name for the physical device this process runs on: the GPU's UUID (the same card under
    any CUDA_VISIBLE_DEVICES numbering), else the host's CPU."""
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        uuid = getattr(props, "uuid", None)
        return f"gpu-{uuid}" if uuid is not None else f"gpu-{torch.cuda.current_device()}"
    return "cpu"


class DeviceLock:
    def __init__(self, folder: Path, device: str):
        folder.mkdir(parents=True, exist_ok=True)
        self._turn = folder / f"{device}.turn"
        self._main = folder / f"{device}.lock"

    @contextmanager
    def shared(self) -> Iterator[float]:
        """Held while compiling and checking; yields the seconds waited for it."""
        started = time.monotonic()
        with _open(self._turn) as turn, _open(self._main) as main:
            fcntl.flock(turn, fcntl.LOCK_EX)  # behind any writer already waiting
            fcntl.flock(main, fcntl.LOCK_SH)
            fcntl.flock(turn, fcntl.LOCK_UN)
            try:
                yield time.monotonic() - started
            finally:
                fcntl.flock(main, fcntl.LOCK_UN)

    @contextmanager
    def exclusive(self) -> Iterator[float]:
        """Held while timing; yields the seconds waited for it."""
        started = time.monotonic()
        with _open(self._turn) as turn, _open(self._main) as main:
            fcntl.flock(turn, fcntl.LOCK_EX)
            try:
                fcntl.flock(main, fcntl.LOCK_EX)
                try:
                    yield time.monotonic() - started
                finally:
                    fcntl.flock(main, fcntl.LOCK_UN)
            finally:
                fcntl.flock(turn, fcntl.LOCK_UN)


@contextmanager
def _open(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)
