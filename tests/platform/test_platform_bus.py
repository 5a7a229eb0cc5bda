"""The bus and the worker runtime against a real nats-server (JetStream, auth on) and real worker processes."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import nats
import pytest

from diffractflow import bus
from diffractflow.artifacts import Volume, sha256_file
from diffractflow.config import Settings
from diffractflow.messages import ArtifactRef, JobRequest, new_id
from orchestration.tasks import JobRejected, StageFailed, submit_and_wait


def run(coro):
    return asyncio.run(coro)


def make_input(volume: Path, name="in.txt", text="hello beamline") -> Path:
    p = volume / "incoming" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


async def ensure(settings):
    nc = await bus.connect(settings)
    await bus.ensure_streams(nc.jetstream())
    await nc.drain()


def test_job_round_trip(settings, workers, volume, probe):
    workers.start("echo")
    src = make_input(volume)
    res = run(submit_and_wait("echo", {"data": src}, {"message": "hi"}, run_id="r1", job_id="job-1",
                              timeout=30, settings=settings))
    assert res.status == "ok" and res.attempt == 1 and not res.reused
    out = Volume(volume).open_ref(res.outputs["echo"])  # hash verified
    payload = json.loads(out.read_text())
    assert payload["message"] == "hi"
    assert payload["inputs"]["data"] == sha256_file(src)
    assert out.stat().st_mode & 0o777 == 0o640
    # the same job again (a retry) is answered from its manifest, not recomputed
    mtime = out.stat().st_mtime_ns
    run(submit_and_wait("echo", {"data": src}, {"message": "hi"}, run_id="r1", job_id="job-1", attempt=2,
                        timeout=30, settings=settings))
    for _ in range(100):
        second = [r for r in probe.results_for("echo", "job-1") if r.attempt == 2]
        if second:
            break
        time.sleep(0.1)
    assert second and second[0].reused and second[0].outputs["echo"].sha256 == res.outputs["echo"].sha256
    assert out.stat().st_mtime_ns == mtime


def test_sigkill_while_holding_a_job_is_redelivered_once(settings, workers, volume, probe):
    first = workers.start("echo", ack_wait_s=2)
    src = make_input(volume)

    async def scenario():
        nc = await bus.connect(settings)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        job = JobRequest(job_id="slow-1", service="echo", inputs={"data": Volume(volume).ref(src)},
                         params={"sleep_s": 4})
        waiter = asyncio.create_task(bus.await_result(nc, js, "echo", "slow-1", timeout=60))
        await bus.publish_job(js, job)
        job_dir = volume / "jobs" / "echo" / "slow-1"
        for _ in range(200):  # the worker creates the job directory when it starts the job
            if job_dir.exists():
                break
            await asyncio.sleep(0.05)
        assert job_dir.exists(), workers.log_text()
        await asyncio.sleep(1.0)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(5)
        workers.start("echo", ack_wait_s=2)  # a replacement replica picks the job up after ack_wait
        res = await waiter
        await nc.drain()
        return res

    res = run(scenario())
    assert res.status == "ok"
    job_dir = volume / "jobs" / "echo" / "slow-1"
    assert sorted(p.name for p in job_dir.iterdir()) == ["echo.json", "manifest.json"]
    oks = [r for r in probe.results_for("echo", "slow-1") if r.status == "ok"]
    assert len(oks) == 1
    assert sha256_file(job_dir / "echo.json") == oks[0].outputs["echo"].sha256


def test_malformed_message_is_dead_lettered_and_worker_keeps_serving(settings, workers, volume, probe):
    workers.start("echo")
    run(ensure(settings))

    async def publish_raw():
        nc = await bus.connect(settings)
        js = nc.jetstream()
        await js.publish("jobs.echo", b"{this is not json")
        await js.publish("jobs.echo", json.dumps({"schema_version": 99, "job_id": "v99", "service": "echo"}).encode())
        await nc.drain()

    run(publish_raw())
    src = make_input(volume)
    res = run(submit_and_wait("echo", {"data": src}, {}, run_id="r", job_id="after-bad", timeout=30, settings=settings))
    assert res.status == "ok"
    letters = probe.dead_letters()
    reasons = [(l.kind, l.reason, l.job_id) for l in letters]
    assert any(k == "bad_message" and "invalid JobRequest" in r for k, r, _ in reasons), reasons
    assert any(j == "v99" and "schema version 99" in r for _, r, j in reasons), reasons


def test_bad_params_and_bad_input_are_rejected_not_retried(settings, workers, volume, probe):
    workers.start("echo")
    src = make_input(volume)
    empty = make_input(volume, "empty.txt", "")
    with pytest.raises(JobRejected, match="sleep_s"):
        run(submit_and_wait("echo", {"data": src}, {"sleep_s": -1}, run_id="r", job_id="badp", timeout=30,
                            settings=settings))
    with pytest.raises(JobRejected, match="empty"):
        run(submit_and_wait("echo", {"data": empty}, {}, run_id="r", job_id="badi", timeout=30, settings=settings))
    kinds = {l.job_id: l.kind for l in probe.dead_letters()}
    assert kinds == {"badp": "bad_params", "badi": "bad_input"}


def test_reference_outside_the_volume_is_rejected(settings, workers, volume, tmp_path):
    workers.start("echo")
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    v = Volume(volume)
    for bad in ("../secret.txt", "incoming/../../secret.txt"):
        with pytest.raises(ValueError, match="escapes the volume root"):
            v.resolve(bad)
    with pytest.raises(ValueError, match="relative"):
        ArtifactRef(path="/etc/passwd")
    (volume / "link").symlink_to(tmp_path)  # a symlink out of the volume is an escape too
    with pytest.raises(ValueError, match="escapes"):
        v.resolve("link/secret.txt")

    async def submit_traversal():
        nc = await bus.connect(settings)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        job = JobRequest(job_id="trav", service="echo", inputs={"data": ArtifactRef(path="../secret.txt")})
        waiter = asyncio.create_task(bus.await_result(nc, js, "echo", "trav", timeout=30))
        await bus.publish_job(js, job)
        res = await waiter
        await nc.drain()
        return res

    res = run(submit_traversal())
    assert res.status == "rejected" and "escapes the volume root" in res.error.message


def test_transient_failure_is_retried_by_the_bus(settings, workers, volume):
    workers.start("echo", max_deliver=3)
    src = make_input(volume)
    res = run(submit_and_wait("echo", {"data": src}, {"fail_times": 2}, run_id="r", job_id="flaky", timeout=30,
                              settings=settings))
    assert res.status == "ok"
    assert (volume / ".toy-failures/flaky").read_text() == "2"


def test_failure_after_max_deliver_is_reported_and_dead_lettered(settings, workers, volume, probe):
    workers.start("echo", max_deliver=2)
    src = make_input(volume)
    with pytest.raises(StageFailed, match="planned failure 2"):
        run(submit_and_wait("echo", {"data": src}, {"fail_times": 5}, run_id="r", job_id="doomed", timeout=30,
                            settings=settings))
    letters = probe.dead_letters()
    assert [(l.job_id, l.kind, l.deliveries) for l in letters] == [("doomed", "failure", 2)]


def test_wrong_credentials_are_refused(nats_server):
    async def attempt(**kw):
        nc = await nats.connect(nats_server.url, max_reconnect_attempts=0, allow_reconnect=False,
                                connect_timeout=3, **kw)
        await nc.close()

    with pytest.raises(Exception, match="[Aa]uthorization"):
        run(attempt(user="admin", password="wrong"))
    with pytest.raises(Exception, match="[Aa]uthorization"):
        run(attempt())


def test_service_credentials_are_limited_to_own_subjects(nats_server, volume):
    admin = Settings(nats_url=nats_server.url, nats_user="admin", nats_password=nats_server.creds.users["admin"],
                     volume=volume)
    user, pw = nats_server.creds.for_service("echo")
    svc = Settings(nats_url=nats_server.url, nats_user=user, nats_password=pw, volume=volume)
    run(ensure(admin))

    async def try_publish(subject):
        nc = await bus.connect(svc)
        js = nc.jetstream()
        try:
            await js.publish(subject, b"x", timeout=1.5)
            return True
        except Exception:
            return False
        finally:
            await nc.close()

    assert run(try_publish("results.echo.j1")) is True
    assert run(try_publish("results.stills-processor.j1")) is False
    assert run(try_publish("jobs.scaler")) is False


def test_graceful_sigterm_finishes_the_current_job(settings, workers, volume):
    w = workers.start("echo", shutdown_grace_s=20)
    src = make_input(volume)

    async def scenario():
        nc = await bus.connect(settings)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        waiter = asyncio.create_task(bus.await_result(nc, js, "echo", "term-1", timeout=30))
        await bus.publish_job(js, JobRequest(job_id="term-1", service="echo",
                                             inputs={"data": Volume(volume).ref(src)}, params={"sleep_s": 2}))
        for _ in range(200):
            if (volume / "jobs/echo/term-1").exists():
                break
            await asyncio.sleep(0.05)
        os.killpg(w.pid, signal.SIGTERM)
        res = await waiter
        await nc.drain()
        return res

    res = run(scenario())
    assert res.status == "ok"
    assert w.wait(20) == 0


def test_duplicate_publish_is_stored_once(settings):
    run(ensure(settings))

    async def scenario():
        nc = await bus.connect(settings)
        js = nc.jetstream()
        job = JobRequest(job_id="dup", service="nobody")
        await bus.publish_job(js, job)
        await bus.publish_job(js, job)
        info = await js.stream_info(bus.JOBS)
        await nc.drain()
        return info.state.messages

    assert run(scenario()) == 1


@pytest.mark.parametrize("service", ["stem-polar", "diffuse-extractor"])
def test_serve_runs_the_stage_warm_up_before_taking_jobs(workers, service):
    """Services that declare a warm-up (compiled kernels) run it once in `serve`, and log how long it took."""
    w = workers.start(service)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "warm-up done" not in workers.log_text():
        assert w.poll() is None, workers.log_text()
        time.sleep(0.2)
    text = workers.log_text()
    assert "warm-up done" in text and "warm-up failed" not in text, text
