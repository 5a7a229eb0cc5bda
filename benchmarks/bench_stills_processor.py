"""Throughput of stills-processor on the real thaumatin stills: stills per minute.

Three ways over the same N crystal images (decompressed into a temporary directory):

- ``dials_cli``: DIALS' command-line programs one image after another, the verified recipe of
  ../shared/data/README.md (dials.import convert_sequences_to_stills=True, dials.find_spots,
  dials.index ... indexing.stills.indexer=sequences). No integration: the baseline does less work.
- ``run``: ``stills-processor run IMAGES --nproc P`` as a user runs it (process start and DIALS import
  included), which also integrates and validates every still.
- ``service``: a real nats-server, ``stills-processor serve`` as a long-lived worker (warmed by one
  job), and one batch job of the N images (image0..N-1) submitted over the bus; timed submit -> result.

The machine is shared with other jobs, so wall-clock figures move with its load (recorded). CPU seconds
per still (DIALS programs: rusage of the child processes; stills-processor: per-unit process time from
summary.h5) do not, and give the throughput on 2 free cores: ``2 * 60 / cpu_s_per_still``.

Writes benchmarks/results/stills_processor.json. Usage:
    .venv/bin/python benchmarks/bench_stills_processor.py --n 6 --nproc 2 [--skip-cli] [--skip-service]
"""
from __future__ import annotations

import argparse
import asyncio
import bz2
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, Clock, load_average, machine, result_path, write_results

DATA = REPO.parent / "shared" / "data" / "thaumatin_grid"
VENV_BIN = Path(sys.executable).parent
SYMMETRY = ["--space-group", "P41212", "--unit-cell", "57.8,57.8,150,90,90,90"]


def decompress(n: int, dest: Path) -> list[Path]:
    out = []
    for i in range(1, n + 1):
        src = DATA / f"thau_3_2_{i:04d}.cbf.bz2"
        dst = dest / src.name[:-4]
        dst.write_bytes(bz2.decompress(src.read_bytes()))
        out.append(dst)
    return out


def bench_dials_cli(images: list[Path], work: Path) -> dict:
    """The three DIALS programs per image, sequentially (each program a new process)."""
    per_image, cpu, indexed = [], [], 0
    t0 = time.perf_counter()
    for img in images:
        d = work / f"cli_{img.stem}"
        d.mkdir()
        clock = Clock().start()
        cmds = [
            ["dials.import", str(img), "convert_sequences_to_stills=True"],
            ["dials.find_spots", "imported.expt"],
            ["dials.index", "imported.expt", "strong.refl", "space_group=P41212",
             "unit_cell=57.8,57.8,150,90,90,90", "indexing.stills.indexer=sequences"],
        ]
        ok = True
        for c in cmds:
            r = subprocess.run(c, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ok = ok and r.returncode == 0
        indexed += int(ok and (d / "indexed.expt").exists())
        clock.read()
        per_image.append(clock.wall_s)
        cpu.append(clock.children_cpu_s)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "per_image_s": per_image, "n_indexed": indexed,
            "stills_per_min": 60 * len(images) / wall, **_cpu_figures(cpu, nproc=2),
            "steps": "import + find_spots + index (no integration)"}


def _cpu_figures(cpu_per_still: list[float], nproc: int) -> dict:
    mean = sum(cpu_per_still) / len(cpu_per_still)
    return {"cpu_s_per_still": mean, "cpu_s_per_still_all": cpu_per_still,
            "cpu_bound_stills_per_min": 60 * nproc / mean}


def bench_run(images: list[Path], work: Path, nproc: int) -> dict:
    out = work / "run_out"
    t0 = time.perf_counter()
    r = subprocess.run([str(VENV_BIN / "stills-processor"), "run", *map(str, images), "--out", str(out), *SYMMETRY,
                        "--nproc", str(nproc), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"stills-processor run failed ({r.returncode}): {r.stderr[-2000:]}")
    from stills_processor.artifacts import read_summary

    rows = read_summary(out / "summary.h5")
    return {"wall_s": wall, "n_indexed": sum(x["status"] == "indexed" for x in rows),
            "stills_per_min": 60 * len(images) / wall, "nproc": nproc,
            **_cpu_figures([x["cpu_seconds"] for x in rows], nproc),
            "steps": "import + find_spots + index + refine + integrate + validate (process start included)"}


async def _submit(settings, job, timeout: float):
    from diffractflow import bus

    nc = await bus.connect(settings, name="bench")
    js = nc.jetstream()
    try:
        waiter = asyncio.create_task(bus.await_result(nc, js, "stills-processor", job.job_id, timeout,
                                                      check_stream=False))
        await asyncio.sleep(0.2)
        t = time.perf_counter()
        await bus.publish_job(js, job)
        res = await waiter
        return res, time.perf_counter() - t
    finally:
        await nc.drain()


async def _wait_consumer(settings, timeout: float) -> None:
    from diffractflow import bus

    nc = await bus.connect(settings, name="bench")
    try:
        await bus.ensure_streams(nc.jetstream())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await bus.queue_status(nc.jetstream(), "stills-processor") is not None:
                return
            await asyncio.sleep(0.3)
        raise TimeoutError("stills-processor did not start serving")
    finally:
        await nc.drain()


def bench_service(images: list[Path], work: Path, nproc: int) -> dict:
    from diffractflow.artifacts import sha256_file
    from diffractflow.config import Settings
    from diffractflow.messages import ArtifactRef, JobRequest
    from diffractflow.natsserver import NatsServer

    vol = work / "volume"
    (vol / "in").mkdir(parents=True)
    staged = []
    for img in images:
        dst = vol / "in" / img.name
        os.link(img, dst)
        staged.append(dst)
    blank = vol / "in" / "thau_3_2_0016.cbf"
    blank.write_bytes(bz2.decompress((DATA / "thau_3_2_0016.cbf.bz2").read_bytes()))
    (work / "nats").mkdir()
    server = NatsServer(work / "nats").start()
    env = {**os.environ, **server.env_for("stills-processor"), "DIFFRACTFLOW_VOLUME": str(vol),
           "DIFFRACTFLOW_LOG_LEVEL": "WARNING", "DIFFRACTFLOW_ACK_WAIT_S": "60"}
    worker = subprocess.Popen([str(VENV_BIN / "stills-processor"), "serve"], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(work / "worker.log", "wb"), start_new_session=True)
    admin = Settings(nats_url=server.url, nats_user="admin", nats_password=server.creds.users["admin"], volume=vol)
    params = {"space_group": "P41212", "unit_cell": [57.8, 57.8, 150, 90, 90, 90], "nproc": nproc}

    def ref(p):
        return ArtifactRef(path=str(p.relative_to(vol)), sha256=sha256_file(p))

    try:
        asyncio.run(_wait_consumer(admin, 60))
        warm = JobRequest(job_id="bench-warm", service="stills-processor", inputs={"image0": ref(blank)}, params=params)
        res_w, t_warm = asyncio.run(_submit(admin, warm, 600))
        job = JobRequest(job_id="bench-batch", service="stills-processor",
                         inputs={f"image{i}": ref(p) for i, p in enumerate(staged)}, params=params)
        res, wall = asyncio.run(_submit(admin, job, 3600))
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        server.stop()
    if res.status != "ok":
        raise RuntimeError(f"service job failed: {res.error}")
    from stills_processor.artifacts import read_summary

    rows = read_summary(vol / "jobs" / "stills-processor" / job.job_id / "summary.h5")
    return {"wall_s": wall, "warmup_job_s": t_warm, "n_indexed": res.metrics.get("n_indexed"),
            "stills_per_min": 60 * len(images) / wall, "nproc": nproc,
            **_cpu_figures([x["cpu_seconds"] for x in rows], nproc),
            "steps": "as run; long-lived worker (warmed), timed submit -> result"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6, help="crystal images (1..15)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--skip-service", action="store_true")
    ap.add_argument("--out", type=Path, default=result_path("stills_processor"))
    a = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent")
    result = {"benchmark": "stills_processor", "n_images": a.n, "host": machine()["host"], "cpus": os.cpu_count(),
              "load_avg_start": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = decompress(a.n, work)
        if not a.skip_cli:
            result["dials_cli"] = bench_dials_cli(images, work)
            print("dials_cli", result["dials_cli"]["stills_per_min"], flush=True)
        result["run"] = bench_run(images, work, a.nproc)
        print("run", result["run"]["stills_per_min"], flush=True)
        if not a.skip_service:
            result["service"] = bench_service(images, work, a.nproc)
            print("service", result["service"]["stills_per_min"], flush=True)
    result["load_avg_end"] = load_average()
    for k in ("stills_per_min", "cpu_bound_stills_per_min"):
        if "dials_cli" in result:
            result[f"speedup_run_vs_cli_{k}"] = result["run"][k] / result["dials_cli"][k]
        if "service" in result:
            result[f"service_vs_run_{k}"] = result["service"][k] / result["run"][k]
    write_results(a.out, result)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
