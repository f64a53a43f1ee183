"""Who may do what on NATS: one user per service, one for the workload, one for people and tools.
Each user publishes only the subjects it produces and writes only its own KV buckets: only the
deployer publishes `deploy` and writes the registry. This one table renders deploy/nats.conf
(compose: passwords from the server's environment) and the embedded server's config (passwords
generated into the state folder)."""
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from shared import subjects


@dataclass(frozen=True)
class Role:
    publishes: tuple[str, ...]  # event subjects it produces
    buckets: tuple[str, ...] = ()  # KV buckets it writes (a put is a publish to $KV.<bucket>.<key>)
    object_stores: tuple[str, ...] = ()  # object stores it writes or empties
    dead_letters: bool = True  # a stage dead-letters what it cannot use


ROLES = {
    "observer": Role((subjects.KERNEL_STATS,), (subjects.TRACE_SUMMARY_BUCKET,), (subjects.TRACE_OBJECT_BUCKET,)),
    "detector": Role((subjects.USAGE_CHANGED, subjects.HYPOTHESIS), (subjects.DETECTOR_BUCKET,)),
    "generator": Role((subjects.VARIANT_READY,), (subjects.PROGRAM_BUCKET,)),
    "benchmarker": Role((subjects.BENCH_RESULT,), (subjects.HARDWARE_BUCKET,)),
    "deployer": Role((subjects.DEPLOY, subjects.DEPLOY_PENDING, subjects.REFINE),
                     (subjects.REGISTRY_BUCKET, subjects.CAMPAIGN_BUCKET, subjects.CANARY_BUCKET)),
    # The inference process (observer SDK): publishes its stats and its canaries' A/B; reads and
    # watches the registry.
    "workload": Role((subjects.KERNEL_STATS, subjects.CANARY_REPORT), dead_letters=False),
}
ADMIN = "admin"  # people and tools: the kernelloop CLI, approvals, hand-written events
USERS = (*ROLES, ADMIN)

# Every client uses the JetStream API (streams, consumers, KV reads by direct get), acks and flow
# control, and gets replies and deliveries on its own inboxes.
JETSTREAM = ("$JS.API.>", "$JS.ACK.>", "$JS.FC.>")
INBOXES = "_INBOX.>"


def _stream_api(stream: str) -> tuple[str, ...]:
    # The API calls that would remove or rewrite a stream's contents without a publish to it.
    return tuple(f"$JS.API.STREAM.{verb}.{stream}" for verb in ("DELETE", "PURGE", "MSG.DELETE", "UPDATE"))


def publish_allow(role: Role) -> list[str]:
    return [*JETSTREAM, *(f"$KV.{b}.>" for b in role.buckets), *(f"$O.{o}.>" for o in role.object_stores),
            *([f"{subjects.DEAD_LETTER_PREFIX}.>"] if role.dead_letters else []), *role.publishes]


def publish_deny(role: Role) -> list[str]:
    """The JetStream API is open to all, so the registry's stream is guarded there too: only its
    writer may delete, purge or reconfigure it. Nobody but people may delete the event stream."""
    denied = [f"$JS.API.STREAM.{verb}.{subjects.STREAM_NAME}" for verb in ("DELETE", "PURGE")]
    registry = f"KV_{subjects.REGISTRY_BUCKET}"
    if subjects.REGISTRY_BUCKET not in role.buckets:
        denied += _stream_api(registry)
    return denied


def password_variable(user: str) -> str:
    return f"NATS_{user.upper()}_PASSWORD"


def _list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


HEADER = """\
# NATS for `docker compose up`: JetStream on the mounted volume, one user per service.
# Rendered from shared/nats_auth.py (python -m shared.nats_auth > deploy/nats.conf); edit the table there.
# Each user publishes only the subjects it produces and writes only its own KV buckets (a KV put is a
# publish to $KV.<bucket>.<key>): only the deployer publishes `deploy` and writes the registry.
# Passwords come from the server's environment (compose passes them from .env).
port: 4222
http_port: 8222
jetstream: enabled  # its store is the mounted volume, given by compose as `-sd /data`

"""


def render_config(listen: bool = True) -> str:
    """The authorization block with a password variable per user; with listen, the whole compose
    config (the embedded server gets address, ports and store on its command line instead)."""
    lines = ["authorization {", "  users: ["]
    for user, role in ROLES.items():
        if user == "workload":
            lines.append("    # The inference process (observer SDK): publishes its stats and canary reports, watches the registry.")
        lines += [f"    {{user: {user}, password: ${password_variable(user)},",
                  f"     permissions: {{publish: {{allow: {_list(publish_allow(role))},",
                  f"                             deny: {_list(publish_deny(role))}}},",
                  f'                   subscribe: {{allow: "{INBOXES}"}}}}}}']
    lines += ["    # People and tools: the kernelloop CLI, `nats pub`, approvals, hand-written events.",
              f"    {{user: {ADMIN}, password: ${password_variable(ADMIN)}}}", "  ]", "}", ""]
    return (HEADER if listen else "") + "\n".join(lines)


# ---- embedded mode: generated credentials --------------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT


def new_password() -> str:
    # nats-server parses a variable's value as config: one starting with a digit may read as a number
    # or a date. A letter, then hex digits, is always a plain string (and needs no quoting in a URL).
    return "k" + secrets.token_hex(16)


def credentials(folder: Path) -> dict[str, str]:
    """user -> password, generated once into folder/nats.env (mode 0600, the names of .env) and
    read back on later starts, so a restarted loop keeps its users."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / "nats.env"
    known = {}
    if path.exists():
        known = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    passwords = {u: known.get(password_variable(u)) or new_password() for u in USERS}
    if any(password_variable(u) not in known for u in USERS):
        _write_private(path, "".join(f"{password_variable(u)}={p}\n" for u, p in passwords.items()))
    return passwords


def write_config(folder: Path) -> Path:
    """The embedded server's config; it holds no secret (the passwords reach the server by env)."""
    path = Path(folder) / "nats.conf"
    _write_private(path, render_config(listen=False))
    return path


def server_environment(passwords: dict[str, str]) -> dict[str, str]:
    return {password_variable(u): p for u, p in passwords.items()}


def url_for(url: str, user: str, password: str) -> str:
    """url with the user's credentials in it, the form NATS_URL takes."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"))


if __name__ == "__main__":
    print(render_config(), end="")
