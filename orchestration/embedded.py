"""The embedded topology: nats-server, every service's worker and Prefect's server as local processes,
kept alive by a supervisor.

``up`` prepares the run directory (credentials, the nats-server configuration, the volume), writes
``<home>/state.json`` and starts a small supervisor daemon (``python -m orchestration.embedded supervise
HOME``, its own session, so it outlives the shell or process that ran ``up``). The supervisor starts
nats-server, creates the streams, starts Prefect's server and the workers, and from then on is the only
writer of ``state.json``: it restarts any of them that dies (exponential backoff, capped, reset once the
process has stayed up for a while; nats-server on the same port and JetStream store, Prefect on the same
port and database), counts the restarts in ``state.json`` and logs them to ``<home>/logs/supervisor.log``.

Why a daemon and not a loop in ``up``: ``up`` returns (scripts, tests and ``process`` go on using the
topology from the same or another shell), and a single supervising process serves all three ways the
topology is started. Why not supervisord: it restarts a crashed program at once with no exponential
backoff, gives up for good after ``startretries`` quick failures and keeps no restart counts, so it would
need as much glue as this loop.

``down`` (from any shell) sends SIGTERM to the supervisor, which stops restarting before it stops anything
(services, then Prefect, then nats-server: SIGTERM, SIGKILL after a grace period); a restart can therefore
never race the stop. If the supervisor itself is gone, ``down`` stops the process groups named in the state.

``up(cluster=3)`` (``diffractflow up --cluster``) runs the bus as a three-node JetStream cluster on loopback
instead of one nats-server (:class:`diffractflow.natsserver.NatsCluster`'s configuration: authenticated routes,
a monitoring port per node, R3 streams): ``state["nats"]["url"]`` lists every node, so workers and clients fail
over between them, and the supervisor keeps each node alive like any other program (``nats-n1``...), restarting
a dead node on its own ports and JetStream store, where it catches up with the other two.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from diffractflow import bus
from diffractflow.artifacts import DIR_MODE
from diffractflow.config import Settings
from diffractflow.natsserver import (SERVICES, Credentials, NatsCluster, free_port, nats_server_binary,
                                     write_config)

# Stages the platform can run as workers: service name -> command (argv after the venv's bin/)
SERVICE_COMMANDS: dict[str, list[str]] = {s: [s, "serve"] for s in SERVICES}
SERVICE_COMMANDS["echo"] = ["python", "-m", "diffractflow.toy"]


def default_home() -> Path:
    return Path(os.environ.get("DIFFRACTFLOW_HOME", ".diffractflow")).resolve()


def bin_path(name: str) -> str:
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else name


@dataclass
class Backoff:
    """Restart policy of the supervisor: the n-th quick failure in a row waits ``min(cap_s, base_s * 2**(n-1))``
    seconds before the restart; a process that stayed up ``healthy_s`` seconds starts the count again."""

    base_s: float = 0.5
    cap_s: float = 30.0
    healthy_s: float = 60.0


@dataclass
class Topology:
    home: Path

    @property
    def state_file(self) -> Path:
        return self.home / "state.json"

    @property
    def supervisor_log(self) -> Path:
        return self.home / "logs" / "supervisor.log"

    def load(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None

    def save(self, state: dict) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(f"state.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.state_file)

    # ----------------------------------------------------------------- settings for clients
    def settings(self, user: str = "admin") -> Settings:
        state = self.load()
        if not state:
            return Settings()
        return Settings(nats_url=state["nats"]["url"], nats_user=user,
                        nats_password_file=Path(state["credentials_dir"]) / user, volume=Path(state["volume"]))

    def prefect_settings(self):
        """A context in which Prefect clients talk to this topology's server (settings are read at import,
        so changing the environment afterwards is not enough)."""
        state = self.load()
        if not state or not state.get("prefect"):
            return contextlib.nullcontext()
        # prefect (~1 s) only when a topology runs flows: the CLI's --help imports this module
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: state["prefect"]["api_url"]})

    def wait_prefect(self, timeout: float = 120.0) -> None:
        """Wait until this topology's Prefect server answers its health check (it may be restarting after a crash:
        a Prefect client fails at once on a server it has never reached, so a run waits here before its first
        flow)."""
        state = self.load()
        if state and state.get("prefect"):
            _wait_http(state["prefect"]["api_url"].rstrip("/") + "/health", timeout)

    def client_env(self) -> dict[str, str]:
        """Environment variables that point clients (bus, Prefect) at the running topology."""
        state = self.load()
        if not state:
            return {}
        env = {"DIFFRACTFLOW_NATS_URL": state["nats"]["url"], "DIFFRACTFLOW_NATS_USER": "admin",
               "DIFFRACTFLOW_NATS_PASSWORD_FILE": str(Path(state["credentials_dir"]) / "admin"),
               "DIFFRACTFLOW_VOLUME": state["volume"]}
        if state.get("prefect"):
            env["PREFECT_API_URL"] = state["prefect"]["api_url"]
        return env

    def apply_env(self) -> None:
        """Point this process (Prefect client, bus clients) at the running topology, if one is up."""
        env = self.client_env()
        if env:
            os.environ.pop("DIFFRACTFLOW_NATS_PASSWORD", None)
            os.environ.update(env)

    # ----------------------------------------------------------------- up / down
    def up(self, services: list[str], replicas: dict[str, int], volume: Path | None = None,
           prefect: bool = True, nats_port: int | None = None, log=print, backoff: Backoff | None = None,
           timeout: float = 180.0, cluster: int = 0) -> dict:
        """Prepare the run directory, start the supervisor and wait until every process serves.

        ``cluster``: run the bus as a JetStream cluster of this many nats-server nodes (3 for R3 streams; 0: one
        nats-server on ``nats_port``). Returns the state (pids as first started). Raises if something does not
        come up within ``timeout`` seconds; call :meth:`down` then to stop what did.
        """
        if self.load():
            raise RuntimeError(f"a topology is already up in {self.home} (run `diffractflow down` first)")
        self.home.mkdir(parents=True, exist_ok=True)
        volume = Path(volume or self.home / "volume").resolve()
        volume.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        logs = self.home / "logs"
        logs.mkdir(exist_ok=True)
        creds = Credentials.generate(extra_services=[s for s in services if s not in SERVICES])
        cred_dir = self.home / "credentials"
        cred_dir.mkdir(exist_ok=True, mode=0o700)
        for user, pw in creds.users.items():
            f = cred_dir / user
            f.write_text(pw)
            os.chmod(f, 0o600)
        nats_dir = self.home / "nats"
        if cluster:
            nats = _cluster_state(NatsCluster(nats_dir, size=cluster, creds=creds))
        else:
            port = nats_port or free_port()
            conf = write_config(nats_dir / "nats.conf", port, nats_dir / "jetstream", creds)
            nats = {"url": f"nats://127.0.0.1:{port}", "port": port, "pid": None, "restarts": 0,
                    "argv": [nats_server_binary(), "-c", str(conf)], "log": str(nats_dir / "nats-server.log")}
        state: dict = {"home": str(self.home), "volume": str(volume), "credentials_dir": str(cred_dir),
                       "started": time.time(), "phase": "starting",
                       "supervision": asdict(backoff or Backoff()), "nats": nats, "services": []}
        if prefect:
            build_prefect_db_template_later()  # for the next topology; this one's server migrates if it must
            pport = free_port()
            state["prefect"] = {"pid": None, "api_url": f"http://127.0.0.1:{pport}/api", "port": pport, "restarts": 0,
                                "argv": [bin_path("prefect"), "server", "start", "--host", "127.0.0.1",
                                         "--port", str(pport)],
                                "log": str(logs / "prefect-server.log")}
        for service in services:
            for i in range(replicas.get(service, 1)):
                user, _ = creds.for_service(service)
                cmd = SERVICE_COMMANDS[service]
                state["services"].append({
                    "service": service, "replica": i, "pid": None, "restarts": 0,
                    "argv": [bin_path(cmd[0]), *cmd[1:]], "log": str(logs / f"{service}-{i}.log"),
                    "env": {"DIFFRACTFLOW_NATS_URL": state["nats"]["url"], "DIFFRACTFLOW_NATS_USER": user,
                            "DIFFRACTFLOW_NATS_PASSWORD_FILE": str(cred_dir / user),
                            "DIFFRACTFLOW_VOLUME": str(volume)}})
        env = dict(os.environ)
        env.pop("DIFFRACTFLOW_NATS_PASSWORD", None)
        self._supervisor = subprocess.Popen(
            [sys.executable, "-m", "orchestration.embedded", "supervise", str(self.home)],
            stdin=subprocess.DEVNULL, stdout=open(logs / "supervisor.out", "ab"), stderr=subprocess.STDOUT,
            env=env, cwd=self.home, start_new_session=True)
        state["supervisor"] = {"pid": self._supervisor.pid, "log": str(self.supervisor_log)}
        self.save(state)  # the hand-over: from here on only the supervisor writes the state
        log(f"supervisor   pid {self._supervisor.pid}  (restarts logged in {self.supervisor_log})")

        deadline = time.monotonic() + timeout
        while True:
            state = self.load() or {}
            if state.get("phase") == "running":
                break
            if state.get("phase") == "failed" or self._supervisor.poll() is not None:
                raise RuntimeError(f"the supervisor could not start the topology: {state.get('error', '?')} "
                                   f"(see {self.supervisor_log} and {logs / 'supervisor.out'})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the topology did not start within {timeout:.0f} s (see {self.supervisor_log})")
            time.sleep(0.1)
        if state["nats"].get("nodes"):
            for n in state["nats"]["nodes"]:
                log(f"nats-server  {n['url']}  (cluster node {n['name']}, JetStream R{len(state['nats']['nodes'])}, "
                    f"auth on)  pid {n['pid']}")
        else:
            log(f"nats-server  {state['nats']['url']}  (JetStream, auth on)  pid {state['nats']['pid']}")
        for s in state["services"]:
            log(f"{s['service']:<18} replica {s['replica']}  pid {s['pid']}")
        if prefect:
            _wait_http(state["prefect"]["api_url"] + "/health", timeout=max(deadline - time.monotonic(), 30))
            log(f"prefect      {state['prefect']['api_url']}")
        admin = Settings(nats_url=state["nats"]["url"], nats_user="admin", nats_password=creds.users["admin"],
                         volume=volume)
        n_replicas = {s: sum(1 for x in state["services"] if x["service"] == s) for s in services}
        asyncio.run(_wait_consumers(admin, services, timeout=max(deadline - time.monotonic(), 30),
                                    replicas=n_replicas))
        return state

    def down(self, timeout: float = 25.0, log=print) -> list[int]:
        """Stop everything `up` started: the supervisor stops the services, then Prefect, then NATS.
        Returns the pids of process groups still alive afterwards (none, normally)."""
        state = self.load()
        if not state:
            return []
        if state.get("prefect"):
            drain_prefect_clients()
        sup = (state.get("supervisor") or {}).get("pid")
        if sup and _group_alive(sup):
            os.kill(sup, signal.SIGTERM)
            own = getattr(self, "_supervisor", None)
            deadline = time.monotonic() + 2 * timeout + 25
            while time.monotonic() < deadline and _group_alive(sup):
                if own is not None and own.pid == sup:
                    own.poll()
                time.sleep(0.1)
            if _group_alive(sup):  # stuck: take it down and clean up below ourselves
                _stop_groups([sup], 0)
            state = self.load() or state
        # whatever is still running (the supervisor was gone, or failed to stop something)
        groups = [p for p in (_pids(state["services"]) + _pids([state.get("prefect")])) if _group_alive(p)]
        _stop_groups(groups, timeout)
        nats = nats_entries(state)
        _stop_groups([p for p in _pids(nats) if _group_alive(p)], 10)
        everything = _pids(state["services"]) + _pids([state.get("prefect"), *nats]) + ([sup] if sup else [])
        left = [p for p in everything if _group_alive(p)]
        self.state_file.unlink(missing_ok=True)
        restarts = sum(p.get("restarts", 0) for p in [*state["services"], *nats, state.get("prefect") or {}])
        log(f"stopped {len(everything)} process groups ({restarts} restarts while up)"
            + (f"; still alive: {left}" if left else ""))
        return left


def _pids(entries) -> list[int]:
    return [e["pid"] for e in entries if e and e.get("pid")]


def nats_entries(state: dict) -> list[dict]:
    """The state's nats-server processes: the one server, or every node of a cluster."""
    return list(state["nats"].get("nodes") or [state["nats"]])


def nats_programs(state: dict) -> list[tuple[str, dict]]:
    """(program name, state entry) of the bus's processes: ``nats-server``, or ``nats-n1``... for a cluster."""
    nodes = state["nats"].get("nodes")
    return [(f"nats-{n['name']}", n) for n in nodes] if nodes else [("nats-server", state["nats"])]


def _cluster_state(cluster: NatsCluster) -> dict:
    """The state of a cluster bus: every node's URL in ``url`` (clients fail over between them) and one
    supervised entry per node (its configuration written now: ports, routes, store)."""
    nodes = []
    for node in cluster.nodes:
        argv = node.prepare()
        nodes.append({"name": node.name, "url": node.url, "port": node.port, "http_port": node.http_port,
                      "route_port": node.cluster.cluster_port, "store": str(node.store_dir), "pid": None,
                      "restarts": 0, "argv": argv, "log": str(node.log_path)})
    return {"url": cluster.url, "port": cluster.nodes[0].port, "pid": None, "restarts": 0, "cluster": cluster.size,
            "nodes": nodes}


# --------------------------------------------------------------------------------------------- the supervisor
class Supervisor:
    """Runs in its own process (``python -m orchestration.embedded supervise HOME``): starts the programs named
    in ``HOME/state.json``, restarts them when they die and records pids and restart counts there."""

    def __init__(self, home: Path):
        self.topo = Topology(home)
        self.stopping = False
        self.procs: dict[str, subprocess.Popen] = {}
        self.info: dict[str, dict] = {}
        self.failures: dict[str, int] = {}
        self.due: dict[str, float] = {}  # program -> monotonic time of its pending restart
        self.died: dict[str, float] = {}
        self.since: dict[str, float] = {}

    # ---------------------------------------------------------------- logging and state
    def event(self, what: str, program: str | None = None, **fields) -> None:
        t = time.time()
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z",
               "event": what, **({"program": program} if program else {}), **fields}
        with open(self.topo.supervisor_log, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def save(self) -> None:
        self.topo.save(self.state)

    # ---------------------------------------------------------------- programs
    def _programs(self) -> list[tuple[str, dict]]:
        out = nats_programs(self.state)
        if self.state.get("prefect"):
            out.append(("prefect-server", self.state["prefect"]))
        out += [(f"{s['service']}[{s['replica']}]", s) for s in self.state["services"]]
        return out

    def _env(self, name: str, entry: dict) -> dict[str, str]:
        if name == "prefect-server":
            home = Path(self.state["home"])
            env = prefect_env(home)
            if seed_prefect_database(home / "prefect" / "prefect.db"):
                self.event("prefect database from template", name, template=str(prefect_db_template()))
            return env
        env = dict(os.environ)
        env.update(entry.get("env", {}))
        return env

    def start(self, name: str, entry: dict) -> None:
        cwd = self.state["home"] if "service" in entry else None
        with open(entry["log"], "ab") as out:
            proc = subprocess.Popen(entry["argv"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=self._env(name, entry), cwd=cwd, start_new_session=True)
        self.procs[name], self.info[name] = proc, entry
        entry["pid"] = proc.pid
        entry["started_at"] = time.time()
        self.since[name] = time.monotonic()
        if name.startswith("nats-"):
            try:
                _wait_port(entry["port"], proc, timeout=15, log=entry["log"])
            except Exception:  # not serving: do not leave it holding the port or the store
                _kill_group(proc.pid)
                proc.wait()
                entry["pid"] = None
                raise

    def restart(self, name: str) -> None:
        entry = self.info[name]
        self.start(name, entry)
        entry["restarts"] = entry.get("restarts", 0) + 1
        self.event("restarted", name, pid=entry["pid"], restarts=entry["restarts"],
                   down_s=round(time.monotonic() - self.died.pop(name), 3))
        self.save()

    def check(self) -> None:
        """Notice dead programs, schedule their restarts with backoff, run restarts that are due."""
        now = time.monotonic()
        pol = self.state["supervision"]
        for name, proc in list(self.procs.items()):
            if name in self.due or proc.poll() is None:
                continue
            _kill_group(proc.pid)  # what it left behind (a server's worker processes) would hold its port
            rc = proc.returncode
            up_s = now - self.since[name]
            if up_s >= pol["healthy_s"]:
                self.failures[name] = 0
            self.failures[name] = self.failures.get(name, 0) + 1
            delay = min(pol["cap_s"], pol["base_s"] * 2 ** (self.failures[name] - 1))
            self.due[name], self.died[name] = now + delay, now
            entry = self.info[name]
            entry["last_exit"] = f"signal {-rc}" if rc < 0 else f"exit {rc}"
            entry["pid"] = None
            self.event("died", name, pid=proc.pid, how=entry["last_exit"], up_s=round(up_s, 3),
                       restart_in_s=delay, failures_in_a_row=self.failures[name])
            self.save()
        for name, t in sorted(self.due.items(), key=lambda kv: kv[1]):
            if self.stopping:
                return
            if time.monotonic() >= t:
                del self.due[name]
                try:
                    self.restart(name)
                except Exception as exc:  # e.g. nats-server did not listen: try again later, backing off
                    self.failures[name] += 1
                    delay = min(pol["cap_s"], pol["base_s"] * 2 ** (self.failures[name] - 1))
                    self.due[name] = time.monotonic() + delay
                    self.event("restart failed", name, error=str(exc), restart_in_s=delay)
                    self.save()

    # ---------------------------------------------------------------- life cycle
    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        deadline = time.monotonic() + 30
        while True:  # wait for the hand-over: `up` writes the state with our pid once it has started us
            state = self.topo.load()
            if state and (state.get("supervisor") or {}).get("pid") == os.getpid():
                break
            if time.monotonic() > deadline or self.stopping:
                return 2
            time.sleep(0.05)
        self.state = state
        self.event("supervisor started", pid=os.getpid(), policy=state["supervision"])
        try:
            self._start_all()
        except Exception as exc:
            self.state["phase"], self.state["error"] = "failed", str(exc)
            self.event("start failed", error=str(exc))
            self.save()
            self.stop_all()
            return 1
        while not self.stopping:
            self.check()
            time.sleep(0.1)
        self.stop_all()
        return 0

    def _start_all(self) -> None:
        bus_programs = nats_programs(self.state)
        for name, entry in self._programs():
            if self.stopping:
                return
            self.start(name, entry)
            self.event("started", name, pid=entry["pid"])
            self.save()
            if name == bus_programs[-1][0]:  # the bus is complete: its streams, replicated on every node
                nodes = self.state["nats"].get("nodes")
                if nodes:
                    _wait_cluster_healthy(nodes, timeout=60)
                admin_pw = (Path(self.state["credentials_dir"]) / "admin").read_text()
                admin = Settings(nats_url=self.state["nats"]["url"], nats_user="admin", nats_password=admin_pw,
                                 volume=Path(self.state["volume"]))
                asyncio.run(_create_streams(admin, replicas=min(3, len(nodes)) if nodes else None))
        self.state["phase"] = "running"
        self.save()

    def stop_all(self, grace_s: float = 25.0) -> None:
        """Services first (they finish or release their jobs), then Prefect, then nats-server."""
        self.state["phase"] = "stopping"
        self.save()
        self.event("stopping")
        self.due.clear()
        bus_names = [n for n, _ in nats_programs(self.state)]
        order = [[n for n in self.procs if n not in (*bus_names, "prefect-server")], ["prefect-server"], bus_names]
        for names, grace in zip(order, (grace_s, grace_s, 10.0)):
            pids = [self.procs[n].pid for n in names if n in self.procs]
            _stop_groups(pids, grace)
            for n in names:
                if n in self.procs:
                    self.procs[n].poll()
        self.state["phase"] = "stopped"
        self.save()
        self.event("stopped")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, log: str) -> None:
    """Wait until ``proc`` serves NATS on ``port``: a connection there is greeted with NATS's INFO line (so a
    stranger holding the port does not pass) and the process is still running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.3) as s:
                s.settimeout(0.3)
                if s.recv(5) == b"INFO " and proc.poll() is None:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"nats-server did not listen on port {port} within {timeout} s; see {log}")


#: Prefect server services the platform does not use, off unless the environment of ``up`` turns them on: automations
#: (reactive triggers and their actions) and the live event stream to websocket clients. Both read every event the
#: flows emit (~3 per task run): together ~70 ms of server CPU per still, on the cores DIALS is using.
PREFECT_SERVER_SERVICES_OFF = {"PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
                               "PREFECT_API_EVENTS_STREAM_OUT_ENABLED": "false"}


def prefect_env(home: Path) -> dict[str, str]:
    """The environment of the embedded Prefect server: its own home and SQLite database, no analytics, and the
    services in :data:`PREFECT_SERVER_SERVICES_OFF` off unless already set (``export
    PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED=true`` before ``up`` for automations)."""
    env = dict(os.environ)
    env.update({"PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}"})
    for name, value in PREFECT_SERVER_SERVICES_OFF.items():
        env.setdefault(name, value)
    env.pop("PREFECT_API_URL", None)
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    return env


# ------------------------------------------------------------------------------- Prefect database template
def prefect_db_template() -> Path:
    """Where this machine keeps an empty Prefect database, migrated to the installed Prefect's schema
    (``$XDG_CACHE_HOME/diffractflow/prefect-db/<version>/prefect.db``; ``DIFFRACTFLOW_CACHE`` overrides the
    base). A new topology starts its server on a copy: a fresh database costs the server ~6 s of migrations
    (10 s to healthy instead of 4 here), on the cores the workers are importing DIALS with."""
    base = os.environ.get("DIFFRACTFLOW_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffractflow"
    return Path(base) / "prefect-db" / importlib.metadata.version("prefect") / "prefect.db"


def _is_migrated(db: Path) -> bool:
    """Whether ``db`` is a SQLite file with an alembic revision recorded (a finished migration)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
            return bool(c.execute("select version_num from alembic_version").fetchall())
    except sqlite3.Error:
        return False


def build_prefect_db_template(timeout: float = 300.0) -> Path | None:
    """Make :func:`prefect_db_template` if it is missing (``prefect server database upgrade`` on a scratch file,
    moved into place only when migrated: a concurrent or interrupted build never leaves a partial template).
    Returns its path, or None if Prefect could not migrate (then servers migrate their own databases)."""
    target = prefect_db_template()
    if target.exists() and _is_migrated(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(target.parent / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # no writable cache here: every server migrates its own database, as before
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another process is building it
        os.close(lock)
        return None
    if target.exists() and _is_migrated(target):  # built by the holder of the lock before us
        os.close(lock)
        return target
    scratch = target.with_name(f".building-{os.getpid()}")
    scratch.mkdir(exist_ok=True)
    db = scratch / "prefect.db"
    env = dict(os.environ, PREFECT_HOME=str(scratch), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{db}")
    env.pop("PREFECT_API_URL", None)
    try:
        done = subprocess.run([bin_path("prefect"), "server", "database", "upgrade", "-y"], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        if done.returncode == 0 and _is_migrated(db):
            os.replace(db, target)
            return target
        return None
    except (OSError, subprocess.TimeoutExpired):
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.close(lock)  # releases the lock


def build_prefect_db_template_later() -> None:
    """Start :func:`build_prefect_db_template` in a detached process when the template is missing (the first
    topology on a machine migrates its own database meanwhile; the next ones start from the template)."""
    if prefect_db_template().exists():
        return
    with contextlib.suppress(OSError):
        subprocess.Popen([sys.executable, "-m", "orchestration.embedded", "prefect-db-template"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)


def seed_prefect_database(db: Path) -> bool:
    """Copy the migrated template to ``db`` when ``db`` does not exist yet; False (the server then migrates the
    new database itself, as Prefect does) when there is no usable template. An existing database is left alone."""
    if db.exists():
        return False
    template = prefect_db_template()
    if not (template.exists() and _is_migrated(template)):
        return False
    tmp = db.with_name(f".{db.name}.{os.getpid()}")
    try:
        shutil.copyfile(template, tmp)
        os.replace(tmp, db)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


def drain_prefect_clients(timeout: float = 20.0) -> None:
    """Send what this process's Prefect clients still hold (logs, events) while the server is up.

    Call before stopping a Prefect server this process talked to: otherwise Prefect drains them at
    interpreter exit against a server that is gone, retrying for a long time.
    """
    for path, name in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        try:
            getattr(importlib.import_module(path), name).drain_all(timeout=timeout, at_exit=False)
        except Exception:  # best effort: never block a shutdown on it
            pass


async def _create_streams(settings: Settings, replicas: int | None = None) -> None:
    nc = await bus.connect(settings, name="diffractflow-up")
    try:
        await bus.ensure_streams(nc.jetstream(), replicas=replicas)
    finally:
        await nc.drain()


def _wait_cluster_healthy(nodes: list[dict], timeout: float) -> None:
    """Wait until every node's monitoring endpoint says healthy (routes up, JetStream meta leader known), so
    that R3 streams can be placed."""
    deadline = time.monotonic() + timeout
    for n in nodes:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{n['http_port']}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server cluster node {n['name']} not healthy within {timeout:.0f} s; "
                                   f"see {n['log']}")
            time.sleep(0.1)


async def _wait_consumers(settings: Settings, services: list[str], timeout: float,
                          replicas: dict[str, int] | None = None) -> None:
    """Wait until every replica of every service is pulling jobs: its durable consumer exists (made by the first
    replica that serves) and holds a pull request of each replica (``replicas``, default 1 per service). A
    worker pulls only after its warm-up (DIALS, torch imports: seconds), so a run started after `up` does not share
    the cores with replicas still importing."""
    nc = await bus.connect(settings, name="diffractflow-up")
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    want = {s: max(1, (replicas or {}).get(s, 1)) for s in services}

    async def not_ready(s: str) -> bool:
        status = await bus.queue_status(js, s)
        # a replica already busy with a job (queued before `up`) holds it unacknowledged instead of a pull request
        return status is None or status.waiting + status.ack_pending < want[s]

    try:
        missing = list(services)
        while missing and time.monotonic() < deadline:
            missing = [s for s in missing if await not_ready(s)]
            if missing:
                await asyncio.sleep(0.3)
        if missing:
            raise TimeoutError(f"services not serving after {timeout:.0f} s: "
                               f"{', '.join(f'{s} (of {want[s]} replicas)' for s in missing)} (see the logs)")
    finally:
        await nc.drain()


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie leader of ours still counts as gone
    try:
        pid, _ = os.waitpid(pgid, os.WNOHANG)
        if pid == pgid:
            return _group_alive(pgid)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pgid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                return False
    except OSError:
        pass
    return True


def _stop_groups(pgids: list[int], timeout: float) -> None:
    for g in pgids:
        try:
            os.killpg(g, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_group_alive(g) for g in pgids):
        time.sleep(0.1)
    for g in pgids:
        if _group_alive(g):
            try:
                os.killpg(g, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_group_alive(g) for g in pgids):
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    if argv == ["prefect-db-template"]:
        path = build_prefect_db_template()
        print(path if path else "the Prefect database template could not be made (servers migrate their own)")
        return 0 if path else 1
    if len(argv) != 2 or argv[0] != "supervise":
        print("usage: python -m orchestration.embedded supervise HOME | prefect-db-template", file=sys.stderr)
        return 2
    return Supervisor(Path(argv[1]).resolve()).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
