"""Start the loop on one machine: an embedded nats-server (unless a NATS URL is given) and the five
services as separate processes; stop them all, in order, on request or when one dies. The embedded
server has one user per service (shared/nats_auth.py), its passwords generated into the state folder."""
import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
from nats.js.errors import NotFoundError, ServiceUnavailableError

from shared import nats_auth, nats_server, subjects
from shared.settings import Settings, nats_servers

SERVICES = ("observer", "detector", "generator", "benchmarker", "deployer")


@dataclass
class Loop:
    nats_url: str
    state_dir: Path
    server: nats_server.NatsServer | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # NATS_URL here is nats_url: people and tools
    urls: dict[str, str] = field(default_factory=dict)  # user -> its NATS_URL, when the server has users
    pins: dict[str, dict[str, str]] = field(default_factory=dict)  # process -> its own env (a benchmarker's GPU)

    def url_for(self, user: str) -> str:
        """The NATS_URL a service (or the workload) connects with: its own user where there are users."""
        return self.urls.get(user, self.nats_url)

    def env_for(self, name: str) -> dict[str, str]:
        return {**self.env, "NATS_URL": self.url_for(_module(name)), **self.pins.get(name, {})}

    def kill(self, name: str) -> None:
        """SIGKILL one service, as a crash would: no draining, no clean-up."""
        self.processes[name].kill()
        self.processes[name].wait()

    def restart(self, name: str) -> None:
        self.processes[name] = _spawn(name, self.state_dir, self.env_for(name))

    def add_replica(self, service: str, spawn: bool = True) -> str:
        """Start one more process of a stage; replicas share its durable consumers, so each
        message goes to one of them. Returns the new process's name, e.g. deployer#2 (with
        spawn=False only the name, for a caller that starts it with its own env)."""
        name = f"{service}#{sum(_module(n) == service for n in self.processes) + 1}"
        if spawn:
            self.processes[name] = _spawn(name, self.state_dir, self.env_for(name))
        return name

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
          services: tuple[str, ...] = SERVICES, auth: bool = True) -> Loop:
    """With no nats_url, start an embedded server: with auth, each service connects as its own user
    and loop.nats_url is the admin's (passwords in <state_dir>/auth/nats.env, mode 0600)."""
    state_dir = Path(state_dir).resolve()
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    server, urls = None, {}
    if not nats_url:
        server, urls = _embedded_server(state_dir, auth)
        nats_url = urls.get(nats_auth.ADMIN, server.url)
    env = {**os.environ, **(env or {}), "NATS_URL": nats_url, "KERNELLOOP_STATE_DIR": str(state_dir),
           "PYTHONUNBUFFERED": "1"}
    loop = Loop(nats_url=nats_url, state_dir=state_dir, server=server, env=env, urls=urls)
    try:
        for name in services:
            if name != "benchmarker":  # below: one per GPU and worker
                loop.processes[name] = _spawn(name, state_dir, loop.env_for(name))
        if "benchmarker" in services:
            for i, pin in enumerate(benchmarker_pins(visible_gpus(env), _bench_workers(env))):
                name = "benchmarker" if i == 0 else loop.add_replica("benchmarker", spawn=False)
                loop.pins[name] = pin
                loop.processes[name] = _spawn(name, state_dir, loop.env_for(name))
    except Exception:
        loop.stop()
        raise
    return loop


def visible_gpus(env: dict[str, str]) -> list[str]:
    """The GPUs benchmarkers may be pinned to: CUDA_VISIBLE_DEVICES as given, else every device
    CUDA reports; none under the Triton interpreter or without CUDA."""
    if env.get("TRITON_INTERPRET") == "1":
        return []
    given = env.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip() and d.strip() != "-1"]
    import torch  # only here: the loop's other processes need no CUDA in this one

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def benchmarker_pins(gpus: list[str], workers_per_device: int) -> list[dict[str, str]]:
    """The extra environment of each benchmarker process: workers_per_device pinned to each GPU
    (a worker measures only on its own card), or that many unpinned where there is no GPU."""
    if not gpus:
        return [{} for _ in range(workers_per_device)]
    return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus for _ in range(workers_per_device)]


def _bench_workers(env: dict[str, str]) -> int:
    given = {k: env[k] for k in ("KERNELLOOP_BENCH_WORKERS",) if k in env}
    return Settings(**given).bench_workers


def _embedded_server(state_dir: Path, auth: bool) -> tuple[nats_server.NatsServer, dict[str, str]]:
    log = state_dir / "logs" / "nats-server.log"
    if not auth:
        return nats_server.start(state_dir / "nats", log_path=log), {}
    folder = state_dir / "auth"
    passwords = nats_auth.credentials(folder)
    server = nats_server.start(state_dir / "nats", log_path=log, config=nats_auth.write_config(folder),
                               env=nats_auth.server_environment(passwords))
    return server, {user: nats_auth.url_for(server.url, user, p) for user, p in passwords.items()}


def _module(name: str) -> str:
    return name.split("#", 1)[0]  # deployer#2 is a second process of the deployer


def _spawn(name: str, state_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(state_dir / "logs" / f"{name}.log", "ab") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", _module(name)], cwd=Path(__file__).resolve().parent.parent, env=env, stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the supervisor, not the terminal, decides when they stop
        )


# No consumer yet; or, on a cluster, one just created whose replicas are still electing a leader.
NOT_YET = (NotFoundError, ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError)


async def _wait_ready(nats_url: str, loop: Loop, timeout: float) -> None:
    nc = await nats.connect(nats_servers(nats_url), connect_timeout=5)
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
                except NOT_YET:
                    pass
            if missing and time.monotonic() > deadline:
                raise TimeoutError(f"not ready within {timeout:.0f} s: no consumer {', '.join(sorted(missing))}")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
