"""Shared fixtures: a real nats-server (JetStream, auth), a volume, worker processes, Prefect's local server."""
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

import psutil
import pytest

# torch before anything that loads DIALS: dxtbx's import brings an OpenMP runtime, and torch initialised after it
# cannot raise its thread count (set_num_threads(2) leaves 1) and its float32 kernels then return wrong images
# (measured: Pearson 0.19 against nanoBragg C on a golden case). Importing torch first avoids it.
import torch  # noqa: F401, E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run the long variants")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="long variant: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"team data folder {SHARED} is absent (CI always has it)")
    return SHARED


@pytest.fixture
def nats_server(tmp_path_factory):
    from diffractflow.natsserver import NatsServer

    srv = NatsServer(tmp_path_factory.mktemp("nats"), extra_services=["echo"]).start()
    yield srv
    srv.stop()


@pytest.fixture
def volume(tmp_path) -> Path:
    v = tmp_path / "volume"
    v.mkdir()
    return v


@pytest.fixture
def settings(nats_server, volume):
    from diffractflow.config import Settings

    return Settings(nats_url=nats_server.url, nats_user="admin", nats_password=nats_server.creds.users["admin"],
                    volume=volume, ack_wait_s=5, nak_delay_s=0.2)


@dataclass
class BusProbe:
    """Read-only views of the streams, as an operator would query them."""

    settings: "Settings"

    async def _with_js(self, fn):
        from diffractflow import bus

        nc = await bus.connect(self.settings)
        try:
            return await fn(nc.jetstream())
        finally:
            await nc.drain()

    def dead_letters(self) -> list:
        from diffractflow import bus
        from diffractflow.messages import DeadLetter

        async def read(js):
            return [DeadLetter.from_bytes(d) async for _s, subj, d in bus.iter_stream(js, bus.DLQ, limit=10 ** 5)
                    if subj.startswith("dlq.")]
        return asyncio.run(self._with_js(read))

    def results_for(self, service: str, job_id: str) -> list:
        from diffractflow import bus
        from diffractflow.messages import JobResult

        async def read(js):
            return [JobResult.from_bytes(d) async for _s, _subj, d in
                    bus.iter_stream(js, bus.RESULTS, subject=bus.result_subject(service, job_id))]
        return asyncio.run(self._with_js(read))


@pytest.fixture
def probe(settings) -> BusProbe:
    return BusProbe(settings)


#: what a numpy shape bug raises: a ValueError that is no fault of the input
PLANTED_BUG = "operands could not be broadcast together with shapes (3,) (4,)"


@pytest.fixture
def planted_bug(settings, probe, monkeypatch):
    """``run(stage, target, attr, inputs, params)``: replace ``target.attr`` with a function raising a ValueError
    (as a numpy bug would), submit one job to an in-process worker of ``stage`` (max_deliver 2) and return (how
    often the bug ran, the dead letters as (job_id, kind)). A service must retry a bug and then dead-letter it as a
    failure, ``(2, [("bug", "failure")])``, never reject it as bad input at once."""
    from diffractflow.runtime import Worker
    from orchestration.tasks import StageFailed, submit_and_wait

    def run(stage, target, attr, inputs, params):
        calls = []

        def buggy(*args, **kwargs):
            calls.append(1)
            raise ValueError(PLANTED_BUG)

        monkeypatch.setattr(target, attr, buggy)
        s = settings.model_copy(update={"max_deliver": 2})

        async def scenario():
            w = Worker(stage, s)
            task = asyncio.create_task(w.run())
            try:
                with pytest.raises(StageFailed, match="broadcast"):
                    await submit_and_wait(stage.service, inputs, params, run_id="r", job_id="bug", timeout=60,
                                          settings=s)
            finally:
                w.stop()
                await task

        asyncio.run(scenario())
        return len(calls), [(letter.job_id, letter.kind) for letter in probe.dead_letters()]

    return run


@pytest.fixture
def bus_env(settings, monkeypatch):
    """Point Settings() (as used inside Prefect tasks) at the test server and volume."""
    monkeypatch.setenv("DIFFRACTFLOW_NATS_URL", settings.nats_url)
    monkeypatch.setenv("DIFFRACTFLOW_NATS_USER", "admin")
    monkeypatch.setenv("DIFFRACTFLOW_NATS_PASSWORD", settings.nats_password.get_secret_value())
    monkeypatch.setenv("DIFFRACTFLOW_VOLUME", str(settings.volume))
    return settings


class WorkerProcs:
    """Start service workers as real subprocesses (the same way `diffractflow up` does)."""

    def __init__(self, nats_server, volume: Path, logdir: Path):
        self.nats, self.volume, self.logdir = nats_server, volume, logdir
        self.procs: list[subprocess.Popen] = []

    def start(self, service: str = "echo", argv: list[str] | None = None, **env_overrides) -> subprocess.Popen:
        env = dict(os.environ)
        env.update(self.nats.env_for(service))
        env["DIFFRACTFLOW_VOLUME"] = str(self.volume)
        env.setdefault("DIFFRACTFLOW_ACK_WAIT_S", "5")
        env.setdefault("DIFFRACTFLOW_NAK_DELAY_S", "0.2")
        env.update({f"DIFFRACTFLOW_{k.upper()}": str(v) for k, v in env_overrides.items()})
        argv = argv or ([sys.executable, "-m", "diffractflow.toy"] if service == "echo"
                        else [str(Path(sys.executable).parent / service), "serve"])
        log = open(self.logdir / f"{service}-{len(self.procs)}.log", "ab")
        p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def log_text(self) -> str:
        return "\n".join(f.read_text(errors="replace") for f in sorted(self.logdir.glob("*.log")))

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                with_suppress(lambda: os.killpg(p.pid, signal.SIGTERM))
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with_suppress(lambda: os.killpg(p.pid, signal.SIGKILL))
                p.wait(5)


def with_suppress(fn):
    try:
        fn()
    except ProcessLookupError:
        pass


@pytest.fixture
def workers(nats_server, volume, tmp_path):
    logdir = tmp_path / "worker-logs"
    logdir.mkdir()
    w = WorkerProcs(nats_server, volume, logdir)
    yield w
    w.stop_all()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """Prefect's real server (`prefect server start`, own home and SQLite database) for the session's flow
    tests; this process's Prefect clients point at it while it runs."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from diffractflow.natsserver import free_port
    from orchestration.embedded import _stop_groups, _wait_http, bin_path, drain_prefect_clients, prefect_env

    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    proc = subprocess.Popen([bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=prefect_env(home), stdout=open(home / "server.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_http(url + "/health", timeout=180)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
            drain_prefect_clients()  # while the server is still there to receive them
    finally:
        _stop_groups([proc.pid], 20)


# ----------------------------------------------------------------------------- topologies, supervision, clusters
class NatsMonitor:
    """What a nats-server node itself reports on its monitoring port (/connz, /jsz), as an operator would query it.

    A node is a :class:`diffractflow.natsserver.NatsServer` (a test's own cluster) or a node of a topology's state
    (a dict with ``http_port``); an unreachable node raises OSError."""

    @staticmethod
    def endpoint(node, path: str) -> dict:
        if isinstance(node, dict):
            with urllib.request.urlopen(f"http://127.0.0.1:{node['http_port']}/{path}", timeout=5) as r:
                return json.loads(r.read())
        return node.monitor(path)

    def stream(self, node, stream: str) -> dict | None:
        """This node's own replica of ``stream`` (its /jsz stream detail), or None if it has none."""
        jsz = self.endpoint(node, "jsz?accounts=true&streams=true")
        for acc in jsz.get("account_details") or []:
            for st in acc.get("stream_detail") or []:
                if st.get("name") == stream:
                    return st
        return None

    def messages(self, node, stream: str) -> int | None:
        """Messages in this node's replica of ``stream`` (None: no replica)."""
        st = self.stream(node, stream)
        return None if st is None else st["state"]["messages"]

    def leader(self, node, stream: str) -> str | None:
        """The leader of ``stream`` as this node sees it."""
        st = self.stream(node, stream)
        return None if st is None else (st.get("cluster") or {}).get("leader")

    def client_node(self, nodes, prefix: str):
        """The node holding a client connection whose name starts with ``prefix`` (unreachable nodes skipped)."""
        for node in nodes:
            try:
                conns = self.endpoint(node, "connz?limit=1000").get("connections") or []
            except OSError:
                continue
            if any((c.get("name") or "").startswith(prefix) for c in conns):
                return node
        return None


@pytest.fixture
def nats_monitor() -> NatsMonitor:
    return NatsMonitor()


def _processes_under(home: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if (p.info["cwd"] or "").startswith(str(home)) or str(home) in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture
def processes_under():
    """``processes_under(home)``: live processes of a topology (their cwd or command line names its home): what
    ``down`` must leave at none."""
    return _processes_under


def _echo_job(topo, job_id: str, *, run_id: str = "echo", timeout: float = 60.0, retry: bool = False,
              tries: list | None = None):
    settings = topo.settings()
    src = settings.volume / "incoming" / "x.dat"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("x")
    from orchestration.tasks import submit_and_wait

    deadline = time.monotonic() + timeout
    while True:
        try:
            return asyncio.run(submit_and_wait("echo", {"data": src}, {"message": job_id}, run_id=run_id,
                                               job_id=job_id, timeout=timeout, settings=settings))
        except Exception as exc:  # noqa: BLE001 - with retry, anything repeats until the deadline
            if not retry:
                raise
            if tries is not None:
                tries.append(repr(exc)[:200])
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture
def echo_job():
    """``echo_job(topo, job_id, run_id=, timeout=, retry=False, tries=None)``: one echo job through a running
    topology (:class:`orchestration.embedded.Topology`), its JobResult. With ``retry`` a failed submission is
    repeated with the same job id until ``timeout`` (as a flow's task retry would; while a cluster elects new
    stream leaders a JetStream request can time out), each failure appended to ``tries``."""
    return _echo_job
