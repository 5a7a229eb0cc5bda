"""Faults, load and secrets on the bus itself (real nats-server, real worker processes, the echo stage)."""
from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from diffractflow import bus
from diffractflow.artifacts import Volume
from diffractflow.config import Settings
from diffractflow.messages import JobRequest, JobResult
from orchestration.tasks import StageFailed, submit_and_wait


def _input(volume: Path) -> Path:
    p = volume / "incoming" / "x.dat"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("x")
    return p


async def _collect_results(settings: Settings, prefix: str, n: int, timeout: float) -> dict[str, JobResult]:
    """Results of jobs `prefix-*` as stored in the RESULTS stream (survives our own reconnects)."""
    nc = await bus.connect(settings)
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    seen: dict[str, JobResult] = {}
    try:
        while time.monotonic() < deadline and len(seen) < n:
            async for _seq, subject, data in bus.iter_stream(js, bus.RESULTS, subject=f"results.echo.>",
                                                              limit=10 ** 6):
                r = JobResult.from_bytes(data)
                if r.job_id.startswith(prefix) and r.status == "ok":
                    seen[r.job_id] = r
            if len(seen) < n:
                await asyncio.sleep(0.5)
    finally:
        await nc.drain()
    return seen


def test_nats_server_restart_mid_run_loses_nothing(nats_server, settings, workers, volume):
    workers.start("echo")
    src = Volume(volume).ref(_input(volume))
    n = 30

    async def publish(ids):
        nc = await bus.connect(settings)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        for i in ids:
            await bus.publish_job(js, JobRequest(job_id=f"rs-{i}", service="echo", inputs={"data": src},
                                                 params={"sleep_s": 0.1}))
        await nc.drain()

    asyncio.run(publish(range(n // 2)))
    time.sleep(0.6)  # the worker is mid-run
    nats_server.restart()  # same port, same JetStream store
    asyncio.run(publish(range(n // 2, n)))
    got = asyncio.run(_collect_results(settings, "rs-", n, timeout=90))
    assert len(got) == n, f"missing: {sorted(set(f'rs-{i}' for i in range(n)) - set(got))}\n{workers.log_text()[-3000:]}"
    for i in range(n):
        assert (volume / f"jobs/echo/rs-{i}/echo.json").is_file()
    assert workers.procs[0].poll() is None  # the worker reconnected instead of dying


def test_flow_waiting_on_a_stage_survives_a_nats_restart(prefect_server, bus_env, nats_server, workers, volume):
    """A Prefect flow is waiting for a stage's result when nats-server restarts: the worker and the flow's client
    reconnect, the result arrives, the flow completes, and the job ran once."""
    import threading

    from prefect import flow

    from orchestration.tasks import run_stage

    workers.start("echo")
    _input(volume)

    def restart_when_started():
        deadline = time.monotonic() + 60
        while "job started" not in workers.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        nats_server.restart()

    @flow(name="through-a-restart")
    async def f():
        return await run_stage("echo", {"data": "incoming/x.dat"}, {"sleep_s": 2.0}, "rs-flow", "across-restart",
                               timeout=60)

    t = threading.Thread(target=restart_when_started)
    t.start()
    res = asyncio.run(f())
    t.join()
    assert res["status"] == "ok"
    assert workers.log_text().count('"job done"') == 1
    assert len(list((volume / "jobs/echo").glob("across-restart-*/echo.json"))) == 1  # content-addressed id


def test_stage_timeout_in_prefect_is_retried(prefect_server, bus_env, workers, volume):
    from prefect import flow

    from orchestration.tasks import run_stage

    workers.start("echo")
    _input(volume)

    @flow(name="timeout-then-retry")
    async def f():
        return await run_stage("echo", {"data": "incoming/x.dat"}, {"sleep_s": 2.5}, "to-run", "slowjob", timeout=1.5)

    res = asyncio.run(f())
    assert res["status"] == "ok"  # attempt 1 timed out; the retry found (or waited for) the result
    assert len(list((volume / "jobs/echo").glob("slowjob-*/echo.json"))) == 1  # content-addressed id


@pytest.fixture
def tiny_volume(tmp_path):
    """A 2 MB tmpfs as the volume's jobs directory: a volume that runs out of space."""
    vol = tmp_path / "vol"
    jobs = vol / "jobs"
    jobs.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(jobs)], check=True)
    yield vol
    subprocess.run(["umount", "-l", str(jobs)], check=False)


def test_volume_full_gives_a_clear_error_and_no_partial_artifact(nats_server, workers, tiny_volume):
    settings = Settings(nats_url=nats_server.url, nats_user="admin", nats_password=nats_server.creds.users["admin"],
                        volume=tiny_volume)
    workers.volume = tiny_volume
    workers.start("echo", max_deliver=2)
    src = tiny_volume / "in.dat"
    src.write_text("x")
    with pytest.raises(StageFailed, match="No space left on device"):
        asyncio.run(submit_and_wait("echo", {"data": src}, {"output_bytes": 5 << 20}, run_id="r", job_id="big",
                                    timeout=30, settings=settings))
    job_dir = tiny_volume / "jobs/echo/big"
    left = sorted(p.name for p in job_dir.iterdir())
    assert left == [], left  # neither blob.bin, nor a temporary file, nor a manifest
    # the worker is still serving once there is room again
    res = asyncio.run(submit_and_wait("echo", {"data": src}, {}, run_id="r", job_id="small", timeout=30,
                                      settings=settings))
    assert res.status == "ok"


def test_thousand_jobs_against_two_replicas(settings, workers, volume):
    """Load: 1000 jobs queued at once; 2 replicas; back-pressure via max_ack_pending; memory bounded."""
    procs = [workers.start("echo", max_ack_pending=8, log_level="WARNING") for _ in range(2)]
    src = Volume(volume).ref(_input(volume))
    n = 1000

    async def scenario():
        nc = await bus.connect(settings)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        while await bus.queue_status(js, "echo") is None:
            await asyncio.sleep(0.1)
        done: set[str] = set()
        finished = asyncio.Event()

        async def on_result(msg):
            r = JobResult.from_bytes(msg.data)
            if r.status == "ok":
                done.add(r.job_id)
                if len(done) >= n:
                    finished.set()

        await nc.subscribe("results.echo.>", cb=on_result)
        t0 = time.monotonic()
        await asyncio.gather(*[bus.publish_job(js, JobRequest(job_id=f"load-{i}", service="echo",
                                                              inputs={"data": src}, params={"write_output": False}))
                               for i in range(n)])
        max_in_flight, peak_rss = 0, 0
        while not finished.is_set():
            st = await bus.queue_status(js, "echo")
            max_in_flight = max(max_in_flight, st.ack_pending)
            peak_rss = max(peak_rss, *(psutil.Process(p.pid).memory_info().rss for p in procs))
            try:
                await asyncio.wait_for(finished.wait(), 0.2)
            except asyncio.TimeoutError:
                if time.monotonic() - t0 > 300:
                    break
        wall = time.monotonic() - t0
        await nc.drain()
        return len(done), max_in_flight, peak_rss, wall

    n_done, max_in_flight, peak_rss, wall = asyncio.run(scenario())
    print(f"\nload: {n_done}/{n} jobs in {wall:.1f} s ({n_done / wall:.0f}/s), "
          f"max in flight {max_in_flight}, peak worker RSS {peak_rss / 2**20:.0f} MiB")
    assert n_done == n
    assert max_in_flight <= 8  # JetStream never handed out more than max_ack_pending
    assert peak_rss < 400 * 2 ** 20


def test_secrets_never_logged(settings, workers, volume):
    workers.start("echo", log_level="DEBUG")
    src = _input(volume)
    asyncio.run(submit_and_wait("echo", {"data": src}, {}, run_id="r", job_id="sec", timeout=30, settings=settings))
    for _ in range(50):  # the worker logs "job done" just after it publishes the result
        logs = workers.log_text()
        if "job done" in logs:
            break
        time.sleep(0.1)
    assert "job done" in logs
    user, pw = workers.nats.creds.for_service("echo")
    assert pw not in logs and workers.nats.creds.users["admin"] not in logs
    assert os.stat(workers.nats.config_path).st_mode & 0o077 == 0  # the server's config is private
