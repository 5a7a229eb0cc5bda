"""Shared fixtures: a real nats-server (JetStream, auth), a volume, worker processes, Prefect's local server."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
