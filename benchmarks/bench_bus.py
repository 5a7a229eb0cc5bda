"""Bus overhead: round-trip latency of a no-op job through NATS + a worker process vs a direct call,
and throughput (jobs/s) with 1 and 2 worker processes. Writes benchmarks/results/bus.json.

    .venv/bin/python benchmarks/bench_bus.py [--jobs 2000] [--latency-jobs 300]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diffractflow import bus
from diffractflow.config import Settings
from diffractflow.messages import JobRequest, JobResult
from diffractflow.natsserver import NatsServer
from diffractflow.runtime import run_inline
from diffractflow.toy import STAGE
from harness import load_average, result_path, write_results

OUT = result_path("bus")


def start_workers(srv: NatsServer, volume: Path, n: int, logdir: Path) -> list[subprocess.Popen]:
    env = dict(os.environ, **srv.env_for("echo"), DIFFRACTFLOW_VOLUME=str(volume), DIFFRACTFLOW_LOG_LEVEL="WARNING",
               DIFFRACTFLOW_MAX_ACK_PENDING="1000")
    return [subprocess.Popen([sys.executable, "-m", "diffractflow.toy"], env=env, start_new_session=True,
                             stdout=open(logdir / f"w{i}.log", "wb"), stderr=subprocess.STDOUT) for i in range(n)]


async def wait_consumer(settings: Settings):
    nc = await bus.connect(settings)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    while await bus.queue_status(js, "echo") is None:
        await asyncio.sleep(0.1)
    await nc.drain()


async def latency(settings: Settings, n: int, tag: str) -> list[float]:
    nc = await bus.connect(settings)
    js = nc.jetstream()
    out = []
    for i in range(n):
        job = JobRequest(job_id=f"{tag}-{i}", service="echo", params={"write_output": False})
        t0 = time.perf_counter()
        waiter = asyncio.create_task(bus.await_result(nc, js, "echo", job.job_id, timeout=30))
        await asyncio.sleep(0)
        await bus.publish_job(js, job)
        res = await waiter
        out.append(time.perf_counter() - t0)
        assert res.status == "ok"
    await nc.drain()
    return out


async def throughput(settings: Settings, n: int, tag: str) -> float:
    nc = await bus.connect(settings)
    js = nc.jetstream()
    done = asyncio.Event()
    seen = set()

    async def on_result(msg):
        r = JobResult.from_bytes(msg.data)
        if r.job_id.startswith(tag):
            seen.add(r.job_id)
            if len(seen) >= n:
                done.set()

    await nc.subscribe("results.echo.>", cb=on_result)
    t0 = time.perf_counter()
    pubs = [bus.publish_job(js, JobRequest(job_id=f"{tag}-{i}", service="echo", params={"write_output": False}))
            for i in range(n)]
    for i in range(0, n, 200):
        await asyncio.gather(*pubs[i:i + 200])
    await asyncio.wait_for(done.wait(), timeout=600)
    dt = time.perf_counter() - t0
    await nc.drain()
    return n / dt


def direct(volume: Path, n: int) -> list[float]:
    s = Settings(volume=volume)
    out = []
    for i in range(n):
        job = JobRequest(job_id=f"direct-{i}", service="echo", params={"write_output": False})
        t0 = time.perf_counter()
        run_inline(STAGE, job, s)
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--latency-jobs", type=int, default=300)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-bus-"))
    volume = work / "volume"
    volume.mkdir()
    results: dict = {"machine": {"cpus": os.cpu_count(), "loadavg_at_start": load_average()}}
    d = np.array(direct(volume, a.latency_jobs)) * 1e3
    results["direct_call_ms"] = {"p50": float(np.percentile(d, 50)), "p99": float(np.percentile(d, 99))}
    for n_workers in (1, 2):
        srv = NatsServer(work / f"nats{n_workers}", extra_services=["echo"]).start()
        settings = Settings(nats_url=srv.url, nats_user="admin", nats_password=srv.creds.users["admin"], volume=volume)
        procs = start_workers(srv, volume, n_workers, work)
        try:
            asyncio.run(wait_consumer(settings))
            if n_workers == 1:
                lat = np.array(asyncio.run(latency(settings, a.latency_jobs, "lat"))) * 1e3
                results["bus_round_trip_ms"] = {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}
                results["bus_overhead_ms"] = {
                    "p50": results["bus_round_trip_ms"]["p50"] - results["direct_call_ms"]["p50"],
                    "p99": results["bus_round_trip_ms"]["p99"] - results["direct_call_ms"]["p99"]}
            rate = asyncio.run(throughput(settings, a.jobs, f"tp{n_workers}"))
            results[f"jobs_per_s_{n_workers}_workers"] = rate
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(20)
            srv.stop()
    results["targets"] = {"overhead_p50_ms": 5, "jobs_per_s": 500}
    results["machine"]["loadavg_at_end"] = load_average()
    write_results(OUT, results, echo=True)


if __name__ == "__main__":
    main()
