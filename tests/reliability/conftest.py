"""Helpers for the reliability suite: read back what the bus holds (dead letters, results) and run the real
service workers through faults."""
from __future__ import annotations

import asyncio
import bz2
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from diffractflow import bus
from diffractflow.artifacts import Volume, load_valid_manifest, sha256_file
from diffractflow.config import Settings
from diffractflow.messages import JobRequest, JobResult


@pytest.fixture
def thaumatin_cbf(shared_dir):
    """thaumatin_cbf(dest, number): a real PILATUS 6M still from the team's data, decompressed into dest."""
    return lambda dest, number: _thaumatin_cbf(shared_dir, dest, number)


def _thaumatin_cbf(shared_dir: Path, dest: Path, number: int) -> Path:
    src = shared_dir / "data" / "thaumatin_grid" / f"thau_3_2_{number:04d}.cbf.bz2"
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / src.name[:-4]
    out.write_bytes(bz2.decompress(src.read_bytes()))
    return out


def job_log_lines(workers, job_id: str) -> list[tuple[str, dict]]:
    """(log file name, record) of every JSON log record of ``job_id`` across the worker logs."""
    out = []
    for f in sorted(workers.logdir.glob("*.log")):
        for line in f.read_text(errors="replace").splitlines():
            if job_id in line and line.startswith("{"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("job_id") == job_id:
                    out.append((f.name, rec))
    return out


@pytest.fixture
def kill_mid_job_and_recover(settings, workers):
    """kill_mid_job_and_recover(job, hold_s=0.5): see ``_kill_mid_job_and_recover``."""
    return lambda job, **kw: _kill_mid_job_and_recover(settings, workers, job, **kw)


def _kill_mid_job_and_recover(settings: Settings, workers, job: JobRequest, *, hold_s: float = 0.5,
                              timeout: float = 600.0) -> JobResult:
    """SIGKILL the only replica of ``job.service`` while it runs ``job``; a fresh replica must finish it.

    Asserts that the kill really happened mid-job (no result yet), that the job then completed exactly once
    (one "job done" across all worker logs, from the new replica) and that its outputs are complete: a valid
    manifest whose hashes match the files and the result, and no temporary files left behind.
    """
    volume = Volume(settings.volume)
    first = workers.start(job.service, ack_wait_s=3)

    async def scenario() -> JobResult:
        nc = await bus.connect(settings)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        waiter = asyncio.create_task(bus.await_result(nc, js, job.service, job.job_id, timeout=timeout))
        await asyncio.sleep(0)
        await bus.publish_job(js, job)
        deadline = time.monotonic() + 300
        while not any(r.get("msg") == "job started" for _f, r in job_log_lines(workers, job.job_id)):
            assert time.monotonic() < deadline and first.poll() is None, workers.log_text()[-3000:]
            await asyncio.sleep(0.1)
        await asyncio.sleep(hold_s)
        assert not waiter.done(), "the job finished before the kill: make it bigger"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        workers.start(job.service, ack_wait_s=3)
        try:
            return await waiter
        finally:
            await nc.drain()

    res = asyncio.run(scenario())
    assert res.status == "ok", (res.error, workers.log_text()[-3000:])
    for _ in range(100):  # the worker logs "job done" just after it publishes the result and acks
        done = [(f, r) for f, r in job_log_lines(workers, job.job_id) if r.get("msg") == "job done"]
        if done:
            break
        time.sleep(0.1)
    assert len(done) == 1, done  # computed once, by the replacement
    assert done[0][0] != job_log_lines(workers, job.job_id)[0][0]
    job_dir = volume.job_dir(job.service, job.job_id)
    manifest = load_valid_manifest(volume, job_dir)
    assert manifest is not None, sorted(p.name for p in job_dir.rglob("*"))
    assert set(manifest["outputs"]) == set(res.outputs)
    for name, ref in res.outputs.items():
        assert sha256_file(volume.resolve(ref.path)) == ref.sha256 == manifest["outputs"][name].sha256
    assert not [p for p in job_dir.rglob("*") if p.name.endswith(".part")]
    return res


@dataclass
class BadCase:
    """A job that must be rejected: ``kind`` as in the dead letter, ``says`` a fragment of the reason."""

    job_id: str
    inputs: dict
    params: dict
    kind: str
    says: str


@pytest.fixture
def expect_rejections(settings, workers, probe):
    """expect_rejections(service, cases): one replica of the real service gets every bad job; each must come
    back rejected with its reason and leave a dead letter with the same reason; the worker keeps serving."""
    from orchestration.tasks import JobRejected, submit_and_wait

    def check(service: str, cases: list[tuple]):
        """cases: (job_id, inputs, params, kind, says) as in ``BadCase``."""
        cases = [BadCase(*c) for c in cases]
        proc = workers.start(service)
        for c in cases:
            try:
                res = asyncio.run(submit_and_wait(service, c.inputs, c.params, run_id="bad", job_id=c.job_id,
                                                  timeout=300, settings=settings))
                pytest.fail(f"{c.job_id} was not rejected: {res.status} {res.metrics}")
            except JobRejected as err:
                assert c.says.lower() in str(err).lower(), (c.job_id, str(err))
        letters = {l.job_id: l for l in probe.dead_letters() if l.service == service}
        for c in cases:
            assert c.job_id in letters, (c.job_id, sorted(letters))
            assert letters[c.job_id].kind == c.kind, (c.job_id, letters[c.job_id].kind, letters[c.job_id].reason)
            assert c.says.lower() in letters[c.job_id].reason.lower(), (c.job_id, letters[c.job_id].reason)
            assert all(r.status == "rejected" for r in probe.results_for(service, c.job_id))
        assert proc.poll() is None, workers.log_text()[-3000:]  # never a crash
        assert "Traceback" not in workers.log_text()
        return proc

    return check
