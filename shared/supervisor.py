"""Start the loop on one machine: an embedded nats-server (unless a NATS URL is given) and the five
services as separate processes; stop them all, in order, on request or when one dies."""
import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.js.errors import NotFoundError

from shared import nats_server, subjects

SERVICES = ("observer", "detector", "generator", "benchmarker", "deployer")


@dataclass
class Loop:
    nats_url: str
    state_dir: Path
    server: nats_server.NatsServer | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def kill(self, name: str) -> None:
        """SIGKILL one service, as a crash would: no draining, no clean-up."""
        self.processes[name].kill()
        self.processes[name].wait()

    def restart(self, name: str) -> None:
        self.processes[name] = _spawn(name, self.state_dir, self.env)

    def dead(self) -> list[str]:
        return [name for name, p in self.processes.items() if p.poll() is not None]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the stream and every stage's durable consumer exist, i.e. events published now
        are kept and each stage will see them."""
        asyncio.run(_wait_ready(self.nats_url, self, timeout))

    def stop(self, timeout: float = 15.0) -> None:
        # SIGTERM lets each service finish the message in hand (FastStream drains), then the server.
        for p in self.processes.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.processes.values():
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.server:
            self.server.stop()


def start(state_dir: Path, nats_url: str | None = None, env: dict[str, str] | None = None,
          services: tuple[str, ...] = SERVICES) -> Loop:
    state_dir = Path(state_dir).resolve()
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    server = None
    if not nats_url:
        server = nats_server.start(state_dir / "nats", log_path=state_dir / "logs" / "nats-server.log")
        nats_url = server.url
    env = {**os.environ, **(env or {}), "NATS_URL": nats_url, "KERNELLOOP_STATE_DIR": str(state_dir),
           "PYTHONUNBUFFERED": "1"}
    loop = Loop(nats_url=nats_url, state_dir=state_dir, server=server, env=env)
    try:
        for name in services:
            loop.processes[name] = _spawn(name, state_dir, env)
    except Exception:
        loop.stop()
        raise
    return loop


def _spawn(name: str, state_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(state_dir / "logs" / f"{name}.log", "ab") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", name], cwd=Path(__file__).resolve().parent.parent, env=env, stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the supervisor, not the terminal, decides when they stop
        )


async def _wait_ready(nats_url: str, loop: Loop, timeout: float) -> None:
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        missing = set(subjects.DURABLE.values())
        while missing:
            if dead := loop.dead():
                raise RuntimeError(f"{', '.join(dead)} exited before the loop was ready; see {loop.state_dir / 'logs'}")
            for durable in list(missing):
                try:
                    await js.consumer_info(subjects.STREAM_NAME, durable)
                    missing.discard(durable)
                except NotFoundError:
                    pass
            if missing and time.monotonic() > deadline:
                raise TimeoutError(f"not ready within {timeout:.0f} s: no consumer {', '.join(sorted(missing))}")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
