"""The embedded topology: nats-server, every service's worker and Prefect's server as local processes.

``up`` writes everything it starts into ``<home>/state.json`` so ``down`` (from any shell) can stop it
all, process group by process group, and ``status`` can find it.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from diffractflow import bus
from diffractflow.artifacts import DIR_MODE
from diffractflow.config import Settings
from diffractflow.natsserver import SERVICES, Credentials, NatsServer, free_port

# Stages the platform can run as workers: service name -> command (argv after the venv's bin/)
SERVICE_COMMANDS: dict[str, list[str]] = {s: [s, "serve"] for s in SERVICES}
SERVICE_COMMANDS["echo"] = ["python", "-m", "diffractflow.toy"]


def default_home() -> Path:
    return Path(os.environ.get("DIFFRACTFLOW_HOME", ".diffractflow")).resolve()


def bin_path(name: str) -> str:
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else name


@dataclass
class Topology:
    home: Path

    @property
    def state_file(self) -> Path:
        return self.home / "state.json"

    def load(self) -> dict | None:
        if not self.state_file.exists():
            return None
        return json.loads(self.state_file.read_text())

    def save(self, state: dict) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
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
        import contextlib

        state = self.load()
        if not state or not state.get("prefect"):
            return contextlib.nullcontext()
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: state["prefect"]["api_url"]})

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
           prefect: bool = True, nats_port: int | None = None, log=print) -> dict:
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
        state: dict = {"home": str(self.home), "volume": str(volume), "credentials_dir": str(cred_dir),
                       "services": [], "started": time.time()}
        nats = NatsServer(self.home / "nats", port=nats_port, creds=creds)
        nats.start()
        state["nats"] = {"url": nats.url, "pid": nats.proc.pid, "port": nats.port}
        self.save(state)  # from here on `down` can clean up whatever follows
        log(f"nats-server  {nats.url}  (JetStream, auth on)  pid {nats.proc.pid}")
        admin = Settings(nats_url=nats.url, nats_user="admin", nats_password=creds.users["admin"], volume=volume)
        asyncio.run(_create_streams(admin))

        if prefect:
            port = free_port()
            env = prefect_env(self.home)
            proc = subprocess.Popen([bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                    stdout=open(logs / "prefect-server.log", "ab"), stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
            state["prefect"] = {"pid": proc.pid, "api_url": f"http://127.0.0.1:{port}/api", "port": port}
            self.save(state)

        for service in services:
            for i in range(replicas.get(service, 1)):
                user, password = creds.for_service(service)
                env = dict(os.environ)
                env.update({"DIFFRACTFLOW_NATS_URL": nats.url, "DIFFRACTFLOW_NATS_USER": user,
                            "DIFFRACTFLOW_NATS_PASSWORD_FILE": str(cred_dir / user), "DIFFRACTFLOW_VOLUME": str(volume)})
                env.pop("DIFFRACTFLOW_NATS_PASSWORD", None)
                cmd = SERVICE_COMMANDS[service]
                argv = [bin_path(cmd[0]), *cmd[1:]]
                proc = subprocess.Popen(argv, stdout=open(logs / f"{service}-{i}.log", "ab"), stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True, cwd=self.home)
                state["services"].append({"service": service, "replica": i, "pid": proc.pid, "argv": argv})
                self.save(state)
                log(f"{service:<18} replica {i}  pid {proc.pid}")

        if prefect:
            _wait_http(state["prefect"]["api_url"] + "/health", timeout=90)
            log(f"prefect      {state['prefect']['api_url']}")
        asyncio.run(_wait_consumers(admin, services, timeout=120))
        return state

    def down(self, timeout: float = 25.0, log=print) -> list[int]:
        """Stop everything `up` started (services first, then Prefect, then NATS). Returns leftover pids."""
        state = self.load()
        if not state:
            return []
        if state.get("prefect"):
            drain_prefect_clients()
        groups = [s["pid"] for s in state.get("services", [])]
        if state.get("prefect"):
            groups.append(state["prefect"]["pid"])
        _stop_groups(groups, timeout)
        _stop_groups([state["nats"]["pid"]], 10)
        left = [p for p in [*groups, state["nats"]["pid"]] if _group_alive(p)]
        self.state_file.unlink(missing_ok=True)
        log(f"stopped {len(groups) + 1} process groups" + (f"; still alive: {left}" if left else ""))
        return left


def prefect_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}"})
    env.pop("PREFECT_API_URL", None)
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    return env


def drain_prefect_clients(timeout: float = 20.0) -> None:
    """Send what this process's Prefect clients still hold (logs, events) while the server is up.

    Call before stopping a Prefect server this process talked to: otherwise Prefect drains them at
    interpreter exit against a server that is gone, retrying for a long time.
    """
    for path, name in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        try:
            import importlib

            getattr(importlib.import_module(path), name).drain_all(timeout=timeout, at_exit=False)
        except Exception:  # best effort: never block a shutdown on it
            pass


async def _create_streams(settings: Settings) -> None:
    nc = await bus.connect(settings, name="diffractflow-up")
    try:
        await bus.ensure_streams(nc.jetstream())
    finally:
        await nc.drain()


async def _wait_consumers(settings: Settings, services: list[str], timeout: float) -> None:
    """Each service creates its durable consumer when it starts serving: wait for all of them."""
    nc = await bus.connect(settings, name="diffractflow-up")
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    try:
        missing = list(services)
        while missing and time.monotonic() < deadline:
            missing = [s for s in missing if await bus.queue_status(js, s) is None]
            if missing:
                await asyncio.sleep(0.3)
        if missing:
            raise TimeoutError(f"services not serving after {timeout:.0f} s: {', '.join(missing)} (see the logs)")
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
