"""A job is never computed twice at once: when JetStream redelivers a job whose first delivery is still computing
(its heartbeats starved, as when a native library holds the GIL), the second worker waits on the job directory's
lock, heartbeating, and then answers from the first one's manifest. A killed delivery's scratch is cleared before
the job is computed again. Real nats-server (JetStream, auth) and two in-process workers."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from diffractflow.artifacts import Volume
from diffractflow.runtime import JobContext, Stage, Worker
from diffractflow.toy import EchoParams, handle_echo


def test_a_redelivery_waits_for_the_computing_delivery(settings, volume, monkeypatch):
    from orchestration.tasks import submit_and_wait

    calls: list[str] = []

    def counted(ctx: JobContext, params: EchoParams) -> None:
        calls.append(ctx.job.job_id)
        handle_echo(ctx, params)

    stage = Stage(service="echo", params_model=EchoParams, handler=counted)
    s = settings.model_copy(update={"ack_wait_s": 1.0, "max_deliver": 5})
    starved = Worker(stage, s)
    helper = Worker(stage, s)

    async def no_heartbeat(msg, beat_now):  # the first worker's heartbeats never reach JetStream
        await asyncio.Event().wait()

    monkeypatch.setattr(starved, "_heartbeat", no_heartbeat)
    inp = volume / "incoming" / "x.bin"
    inp.parent.mkdir(parents=True)
    inp.write_bytes(b"x" * 100)

    async def scenario():
        t1 = asyncio.create_task(starved.run())
        await asyncio.sleep(1.0)
        t2 = asyncio.create_task(helper.run())  # joins once the first has the job: it gets the redelivery
        try:
            return await submit_and_wait("echo", {"in": inp}, {"sleep_s": 4.0, "message": "once"}, run_id="lock",
                                         job_id="lock-1", timeout=60, settings=s)
        finally:
            await asyncio.sleep(3.0)  # let a redelivery land, if any
            starved.stop()
            helper.stop()
            await asyncio.gather(t1, t2)

    res = asyncio.run(scenario())
    assert res.status == "ok"
    assert calls == ["lock-1"], calls  # computed once although delivered more than once
    out = json.loads((Volume(volume).job_dir("echo", "lock-1") / "echo.json").read_text())
    assert out["message"] == "once"


def test_a_killed_deliverys_scratch_is_cleared_before_recomputing(settings, volume):
    from orchestration.tasks import submit_and_wait

    jd = Volume(volume).job_dir("echo", "scratch-1")
    (jd / ".vm-work-123").mkdir()
    (jd / ".vm-work-123" / "block.h5").write_bytes(b"\0" * 10)
    (jd / ".echo.json.part").write_bytes(b"half")
    inp = volume / "incoming" / "y.bin"
    inp.parent.mkdir(parents=True)
    inp.write_bytes(b"y" * 10)

    async def scenario():
        w = Worker(Stage(service="echo", params_model=EchoParams, handler=handle_echo), settings)
        t = asyncio.create_task(w.run())
        try:
            return await submit_and_wait("echo", {"in": inp}, {}, run_id="s", job_id="scratch-1", timeout=60,
                                         settings=settings)
        finally:
            w.stop()
            await t

    assert asyncio.run(scenario()).status == "ok"
    assert sorted(p.name for p in Path(jd).iterdir()) == ["echo.json", "manifest.json"]
