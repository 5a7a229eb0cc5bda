"""A dispatcher SIGKILLed in the middle of a Bluesky run: the restarted one rebuilds the open run from the stream.

A real RunEngine (an ophyd detector writing one file per point) publishes through bluesky-nats into the embedded
nats-server as the topology's publish-only 'bluesky' user. The dispatcher runs as its own process; each frame's flow
runs the echo stage (1 s per job, so frames are in hand when the dispatcher dies). The dispatcher is SIGKILLed in
the middle of a run (two cases, see the test), the rest of the run is published while none runs, then a new
dispatcher starts. Every frame must be computed exactly once, every frame's flow must finish before the end of the
run, and the end of the run must be triggered once."""
from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestration.bluesky import frame_file_detector

RUN = "bs-recover"

DISPATCHER = r'''
import asyncio, json, signal, sys, time
from prefect import flow
from diffractflow.artifacts import Volume
from diffractflow.config import Settings
from orchestration.bluesky import BlueskyTranslator
from orchestration.tasks import job_id_for, run_stage
from orchestration.watcher import dispatch

out = open(sys.argv[1], "a", buffering=1)

def note(**k):
    out.write(json.dumps({**k, "t": time.time(), "pid": __import__("os").getpid()}) + "\n")

@flow(name="slow-echo")
async def slow_echo(path: str, run_id: str):
    return await run_stage("echo", {"data": path}, {"sleep_s": 1.0}, run_id, job_id_for(run_id, "echo", path),
                           timeout=120)

async def on_file(ev):
    note(kind="file start", path=ev.path)
    await slow_echo(ev.path, ev.run_id)
    note(kind="file done", path=ev.path)

async def on_end(ev):
    note(kind="end", run_id=ev.run_id)

async def main():
    settings = Settings()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tr = BlueskyTranslator(Volume(settings.volume), settle_s=float(sys.argv[2]), frame_timeout_s=60,
                           validate_config=False)
    note(kind="up")
    await dispatch(settings, on_file, on_end, stop, bluesky=tr)

asyncio.run(main())
'''


def _sources(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / "sources" / f"src{i}.cbf"
        p.parent.mkdir(exist_ok=True, parents=True)
        p.write_bytes(hashlib.sha256(bytes([i])).digest() * (3000 + 500 * i))
        out.append(p)
    return out


def _notes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("kill", ["flows in hand", "waiting for frames after the stop"])
def test_dispatcher_killed_mid_run_recovers_the_open_run(tmp_path, nats_server, volume, settings, bus_env,
                                                          workers, prefect_server, kill):
    """``flows in hand``: killed once the first frame's flow finished, the next two flows running; the rest of the
    run and its stop are published while no dispatcher runs. ``waiting for frames after the stop``: the detector's
    files land seconds after its events; killed once every document, the stop included, was delivered and before
    any frame was complete."""
    from bluesky import RunEngine
    from bluesky import plan_stubs as bps
    from bluesky import preprocessors as bpp

    from diffractflow import bus
    from orchestration.bluesky import connect_publisher
    from orchestration.tasks import job_id_for

    workers.start("echo")
    late = kill != "flows in hand"
    n1, n2 = (6, 0) if late else (3, 3)
    src = _sources(tmp_path, n1 + n2)
    # a late file is written in two halves 3 s apart: 3.5 s of stable size make it complete
    lag, settle = (3.0, 3.5) if late else (0.0, 0.3)
    det = frame_file_detector("det", src, volume / "incoming" / RUN, prefix="f", lag_s=lag)
    frames = [f"incoming/{RUN}/f_{i:06d}.cbf" for i in range(n1 + n2)]
    notes = tmp_path / "dispatcher.jsonl"
    script = tmp_path / "dispatcher.py"
    script.write_text(DISPATCHER)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    logs = open(tmp_path / "dispatcher.log", "ab")

    def start_dispatcher() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(notes), str(settle)], env=env, stdout=logs,
                                stderr=subprocess.STDOUT, start_new_session=True)

    asyncio.run(_ensure_streams(settings))
    first = start_dispatcher()
    second = None
    gate, done = threading.Event(), threading.Event()

    def plan():
        @bpp.stage_decorator([det])
        @bpp.run_decorator(md={"diffractflow": {"run_id": RUN}, "num_points": n1 + n2})
        def inner():
            for i in range(n1 + n2):
                if i == n1:
                    assert gate.wait(120), "the test never released the second half of the plan"
                yield from bps.trigger_and_read([det])
        return (yield from inner())

    def acquire():
        pub = connect_publisher(nats_server.url, "bluesky", nats_server.creds.users["bluesky"], source="bl")
        RE = RunEngine({}, context_managers=[])
        RE.subscribe(pub)
        try:
            RE(plan())
        finally:
            assert pub.close()
            done.set()

    try:
        _wait(lambda: any(n["kind"] == "up" for n in _notes(notes)), 120, "the first dispatcher")
        threading.Thread(target=acquire, daemon=True).start()
        if late:
            _wait(done.is_set, 60, "the RunEngine")
            _wait(lambda: asyncio.run(_all_delivered(settings)), 30, "the dispatcher to receive every document")
        else:
            _wait(lambda: any(n["kind"] == "file done" for n in _notes(notes)), 120, "the first frame's flow")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        started = {n["path"] for n in _notes(notes) if n["kind"] == "file start"}
        finished = {n["path"] for n in _notes(notes) if n["kind"] == "file done"}
        if late:  # the dispatcher held every event and the stop, waiting for the files
            assert not started and not asyncio.run(_event_subjects(settings, "events.file.>"))
        else:
            assert started - finished, "the dispatcher was to die with frames in hand"
        gate.set()  # the rest of the run and its stop are published while no dispatcher runs
        _wait(done.is_set, 60, "the RunEngine")
        second = start_dispatcher()
        _wait(lambda: any(n["kind"] == "end" for n in _notes(notes)), 180, "the end of the run")
        time.sleep(3)  # anything duplicated would show up now
    finally:
        gate.set()
        for p in (first, second):  # the dispatcher is killed again: what it left is done and recorded
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)

    got = _notes(notes)
    ends = [n for n in got if n["kind"] == "end"]
    assert len(ends) == 1 and ends[0]["run_id"] == RUN
    # every frame's flow finished before the end of the run (frames in hand at the kill were taken up again)
    finished = {n["path"]: n["t"] for n in got if n["kind"] == "file done" and n["t"] <= ends[0]["t"]}
    assert set(finished) == set(frames), sorted(set(frames) - set(finished))
    # each frame computed once by the echo stage, on the whole file the detector wrote
    computed = collections.Counter(json.loads(line)["job_id"] for line in workers.log_text().splitlines()
                                   if line.startswith("{") and '"job computed"' in line)
    per_frame = {f: sum(v for k, v in computed.items() if k.startswith(job_id_for(RUN, "echo", f) + "-"))
                 for f in frames}
    assert per_frame == {f: 1 for f in frames}, computed
    assert sum(computed.values()) == len(frames)
    for i, f in enumerate(frames):
        job_dirs = list((volume / "jobs" / "echo").glob(job_id_for(RUN, "echo", f) + "-*"))
        assert len(job_dirs) == 1
        echo = json.loads((job_dirs[0] / "echo.json").read_text())
        assert echo["inputs"]["data"] == hashlib.sha256(src[i].read_bytes()).hexdigest()
    # the run's record and the bus agree: each frame dispatched once in order, one end of run
    rec = json.loads((volume / "runs" / RUN / "bluesky.json").read_text())
    assert rec["frames"] == frames and rec["status"] == "ended" and rec["missing"] == []
    subjects = asyncio.run(_event_subjects(settings))
    assert subjects.count(bus.event_subject("end_of_run", RUN)) == 1


async def _ensure_streams(settings):
    from diffractflow import bus

    nc = await bus.connect(settings)
    await bus.ensure_streams(nc.jetstream())
    await nc.drain()


async def _all_delivered(settings) -> bool:
    """The dispatcher's consumer was delivered everything the EVENTS stream holds, none of it acknowledged yet
    (False while the dispatcher has not made its consumer: it notes "up" before, and a loaded machine can take the
    whole run to get from one to the other)."""
    from nats.js.errors import NotFoundError

    from diffractflow import bus

    nc = await bus.connect(settings)
    try:
        js = nc.jetstream()
        try:
            info = await js.consumer_info(bus.EVENTS, "dispatcher")
        except NotFoundError:
            return False
        stream = await js.stream_info(bus.EVENTS)
        return info.delivered.stream_seq == stream.state.last_seq and info.num_ack_pending > 0
    finally:
        await nc.drain()


async def _event_subjects(settings, subject: str | None = None) -> list[str]:
    from diffractflow import bus

    nc = await bus.connect(settings)
    try:
        return [subj async for _s, subj, _d in bus.iter_stream(nc.jetstream(), bus.EVENTS, subject=subject,
                                                               limit=10 ** 5)]
    finally:
        await nc.drain()
