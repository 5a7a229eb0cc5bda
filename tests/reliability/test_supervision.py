"""Supervision of the embedded topology (issue 20, item 1): a real `Topology.up` (supervisor daemon, nats-server,
echo workers, Prefect's server); processes are SIGKILLed and must come back by themselves (nats-server on the
same port and store, Prefect on the same port and database), restarts are counted in `diffractflow status`,
`down` from another process leaves nothing behind, and a stream of jobs survives random kills."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from diffractflow import bus
from diffractflow.artifacts import Volume
from diffractflow.messages import JobRequest, JobResult
from orchestration.embedded import Backoff, Topology

BIN = Path(sys.executable).parent
QUIET = dict(log=lambda *a: None)


def _alive(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_new_pid(topo: Topology, get, old: int, timeout: float = 60.0) -> tuple[int, float]:
    """Wait until the state names a live process other than ``old``; (new pid, seconds waited)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pid = get(topo.load())
        if pid and pid != old and _alive(pid):
            return pid, time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"no new process within {timeout} s; supervisor log:\n{topo.supervisor_log.read_text()}")


@pytest.fixture
def topo(tmp_path):
    t = Topology(tmp_path / "home")
    yield t
    t.down(**QUIET)


def test_restart_backoff_doubles_is_capped_and_resets_after_health(topo, echo_job, processes_under):
    """A worker that dies again right after each restart waits base, 2 base, 4 base, then the cap; once it has
    stayed up for `healthy_s` the next restart is quick again. Delays measured from outside (kill -> new pid)."""
    pol = Backoff(base_s=0.4, cap_s=1.6, healthy_s=4.0)
    topo.up(["echo"], {}, prefect=False, backoff=pol, **QUIET)
    worker = lambda s: s["services"][0]["pid"]  # noqa: E731
    pid = worker(topo.load())
    waits = []
    for _ in range(5):
        os.kill(pid, signal.SIGKILL)
        pid, waited = _wait_new_pid(topo, worker, pid)
        waits.append(waited)
    time.sleep(pol.healthy_s + 0.5)
    os.kill(pid, signal.SIGKILL)
    pid, after_health = _wait_new_pid(topo, worker, pid)
    expected = [0.4, 0.8, 1.6, 1.6, 1.6]
    for w, e in zip(waits, expected):
        assert e <= w < e + 0.6, (waits, expected)
    assert 0.4 <= after_health < 1.0, after_health
    assert topo.load()["services"][0]["restarts"] == 6
    assert echo_job(topo, "after-backoff").status == "ok"

    # nats-server killed while something else grabs its port: the restart fails, is retried with backoff, and
    # once the port is free nats-server is back on it
    nats = topo.load()["nats"]
    os.kill(nats["pid"], signal.SIGKILL)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the killed server's TIME_WAITs
        deadline = time.monotonic() + 5
        while True:
            try:
                squatter.bind(("127.0.0.1", nats["port"]))
                break
            except OSError:  # still held by the dying server
                assert time.monotonic() < deadline, topo.supervisor_log.read_text()[-2000:]
                time.sleep(0.01)
        squatter.listen()
        time.sleep(2.6)  # covers the attempts after 0.4 s and after 0.4 + 0.8 s
    _wait_new_pid(topo, lambda s: s["nats"]["pid"], nats["pid"])
    assert topo.load()["nats"]["port"] == nats["port"]
    assert echo_job(topo, "after-port-squat").status == "ok"
    failed = [json.loads(x) for x in topo.supervisor_log.read_text().splitlines() if '"restart failed"' in x]
    assert failed and all(e["program"] == "nats-server" for e in failed)
    assert [e["restart_in_s"] for e in failed[:2]] == [0.8, 1.6]  # backing off while the port is taken
    assert topo.load()["nats"]["restarts"] == 1  # failed attempts are not restarts

    # `down` while a restart is pending: the stop wins, nothing is started after it and nothing is left
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while topo.load()["services"][0]["pid"] is not None:  # the death is noticed, its restart scheduled
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert topo.down(**QUIET) == []
    assert processes_under(topo.home) == []
    events = [json.loads(x)["event"] for x in topo.supervisor_log.read_text().splitlines()]
    stop = events.index("stopping")
    assert events[stop - 1] == "died" and events[stop + 1:] == ["stopped"], events[-5:]


def test_killed_worker_nats_and_prefect_come_back(topo, tmp_path, echo_job, processes_under):
    """SIGKILL the worker, then nats-server, then Prefect's server: each is restarted (nats-server on its port with
    its JetStream store: results stored before the kill are still there; Prefect on its port with its database:
    a flow run recorded before the kill is still there), jobs and flows submitted afterwards complete, `status`
    (another process) shows one restart each, and `down` (another process) leaves no process behind."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="supervision-probe")
    def probe(x: int) -> int:
        return x + 1

    async def read_run(run_id):
        async with get_client() as client:
            return await client.read_flow_run(run_id)

    home = tmp_path / "home"
    state = topo.up(["echo"], {}, prefect=True, backoff=Backoff(base_s=0.2, cap_s=2.0, healthy_s=60.0), **QUIET)
    assert echo_job(topo, "before").status == "ok"
    with topo.prefect_settings():
        before = probe(1, return_state=True)
        assert before.is_completed() and before.result() == 2
    latency = {}

    # a worker
    old = state["services"][0]["pid"]
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    _wait_new_pid(topo, lambda s: s["services"][0]["pid"], old)
    assert echo_job(topo, "after-worker-kill").status == "ok"
    latency["worker (kill -> job done)"] = time.monotonic() - t0

    # nats-server, with a job waiting in its store while it is down
    nats = topo.load()["nats"]
    t0 = time.monotonic()
    os.kill(nats["pid"], signal.SIGKILL)
    new_nats, _ = _wait_new_pid(topo, lambda s: s["nats"]["pid"], nats["pid"])
    assert topo.load()["nats"]["port"] == nats["port"] and topo.load()["nats"]["url"] == nats["url"]
    assert echo_job(topo, "after-nats-kill").status == "ok"  # the worker reconnected to the same URL
    latency["nats-server (kill -> job done)"] = time.monotonic() - t0
    # same JetStream store: the results published before the kill are still in the RESULTS stream
    kept = asyncio.run(_collect(topo.settings(), "", 3, timeout=30))
    assert {"before", "after-worker-kill", "after-nats-kill"} <= set(kept), sorted(kept)

    # Prefect's server (the leader only: its uvicorn child must not keep the port)
    pf = topo.load()["prefect"]
    t0 = time.monotonic()
    os.kill(pf["pid"], signal.SIGKILL)
    _wait_new_pid(topo, lambda s: s["prefect"]["pid"], pf["pid"])
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(pf["api_url"] + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, (home / "logs" / "prefect-server.log").read_text()[-3000:]
        time.sleep(0.2)
    latency["prefect (kill -> healthy)"] = time.monotonic() - t0
    assert topo.load()["prefect"]["api_url"] == pf["api_url"]
    with topo.prefect_settings():
        old_run = asyncio.run(read_run(before.state_details.flow_run_id))
        assert old_run.state.is_completed()  # same database
        after = probe(41, return_state=True)
        assert after.is_completed() and after.result() == 42
    print("restart latency (s):", {k: round(v, 2) for k, v in latency.items()})

    st = subprocess.run([BIN / "diffractflow", "status", "--home", home, "--runs", "3"], capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, COLUMNS="200"))
    assert st.returncode == 0, st.stdout + st.stderr
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in st.stdout.splitlines() if line.startswith("│") and line.count("│") == 6}
    for name in ("nats-server", "prefect server", "echo[0]"):
        assert rows[name][1] == "yes" and rows[name][2] == "1" and rows[name][3] == "signal 9", (name, st.stdout)
    events = [json.loads(x) for x in topo.supervisor_log.read_text().splitlines()]
    assert sorted(e["program"] for e in events if e["event"] == "restarted") == \
        ["echo[0]", "nats-server", "prefect-server"]

    sup = topo.load()["supervisor"]["pid"]
    down = subprocess.run([BIN / "diffractflow", "down", "--home", home], capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "3 restarts" in down.stdout
    assert not _alive(sup)
    assert processes_under(home) == []
    assert not topo.state_file.exists()
    assert json.loads(topo.supervisor_log.read_text().splitlines()[-1])["event"] == "stopped"
    assert not [e for e in map(json.loads, topo.supervisor_log.read_text().splitlines()[len(events):])
                if e["event"] in ("restarted", "died")]  # no restart raced the stop


async def _collect(settings, prefix: str, n: int, timeout: float) -> dict[str, JobResult]:
    """Ok results of jobs ``prefix*`` as the RESULTS stream holds them (reconnects while nats-server restarts)."""
    deadline = time.monotonic() + timeout
    seen: dict[str, JobResult] = {}
    while time.monotonic() < deadline and len(seen) < n:
        try:
            nc = await bus.connect(settings, name="collect")
            try:
                async for _seq, _subj, data in bus.iter_stream(nc.jetstream(), bus.RESULTS, subject="results.echo.>",
                                                               limit=10 ** 6):
                    r = JobResult.from_bytes(data)
                    if r.job_id.startswith(prefix) and r.status == "ok":
                        seen[r.job_id] = r
            finally:
                await nc.close()
        except Exception:  # nats-server restarting
            pass
        if len(seen) < n:
            await asyncio.sleep(0.5)
    return seen


def test_chaos_random_kills_during_a_job_stream(topo, monkeypatch, processes_under):
    """Every ~2.5 s one of nats-server and the two echo workers is SIGKILLed while jobs are published (0.3 s of
    work each, one every 0.25 s); every job completes, each kill was followed by a restart."""
    monkeypatch.setenv("DIFFRACTFLOW_ACK_WAIT_S", "2")  # a killed worker's job is redelivered quickly
    monkeypatch.setenv("DIFFRACTFLOW_NAK_DELAY_S", "0.2")
    topo.up(["echo"], {"echo": 2}, prefect=False, backoff=Backoff(base_s=0.2, cap_s=2.0, healthy_s=5.0), **QUIET)
    settings = topo.settings()
    volume = Volume(settings.volume)
    src = settings.volume / "incoming" / "x.dat"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("x")
    ref = volume.ref(src)
    rng = random.Random(20)
    n_jobs, kills = 56, []

    async def publish_all():
        nc = await bus.connect(settings, name="chaos-publisher")
        js = nc.jetstream()
        try:
            for i in range(n_jobs):
                job = JobRequest(job_id=f"chaos-{i:03d}", run_id="chaos", service="echo", inputs={"data": ref},
                                 params={"sleep_s": 0.3, "message": str(i)})
                while True:  # while nats-server is down the publish times out: same id again (de-duplicated)
                    try:
                        await bus.publish_job(js, job)
                        break
                    except Exception:
                        await asyncio.sleep(0.3)
                await asyncio.sleep(0.25)
        finally:
            await nc.close()

    async def chaos(stop: asyncio.Event):
        while not stop.is_set():
            await asyncio.sleep(2.5)
            state = topo.load()
            victims = [("nats-server", state["nats"]["pid"])] + \
                      [(f"echo[{s['replica']}]", s["pid"]) for s in state["services"]]
            name, pid = rng.choice([v for v in victims if v[1]])
            os.kill(pid, signal.SIGKILL)
            kills.append(name)

    async def scenario():
        stop = asyncio.Event()
        killer = asyncio.create_task(chaos(stop))
        await publish_all()
        stop.set()
        await killer
        return await _collect(settings, "chaos-", n_jobs, timeout=90)

    t0 = time.monotonic()
    seen = asyncio.run(scenario())
    missing = sorted({f"chaos-{i:03d}" for i in range(n_jobs)} - set(seen))
    assert not missing, (missing, kills, topo.supervisor_log.read_text()[-3000:])
    assert len(kills) >= 4, kills
    state = topo.load()
    restarts = {"nats-server": state["nats"]["restarts"],
                **{f"echo[{s['replica']}]": s["restarts"] for s in state["services"]}}
    deadline = time.monotonic() + 10  # the last kill's restart may still be pending
    while sum(restarts.values()) < len(kills) and time.monotonic() < deadline:
        time.sleep(0.2)
        state = topo.load()
        restarts = {"nats-server": state["nats"]["restarts"],
                    **{f"echo[{s['replica']}]": s["restarts"] for s in state["services"]}}
    assert restarts == {k: kills.count(k) for k in restarts}, (restarts, kills)
    for r in seen.values():  # complete outputs on the volume
        assert Path(volume.resolve(r.outputs["echo"].path)).is_file()
    # the supervisor itself SIGKILLed: nothing restarts any more, but `down` still stops what the state names
    os.kill(state["supervisor"]["pid"], signal.SIGKILL)
    assert topo.down(**QUIET) == []
    assert processes_under(topo.home) == []
    print(f"chaos: {len(kills)} kills ({', '.join(kills)}), {n_jobs} jobs ok in {time.monotonic() - t0:.1f} s")
