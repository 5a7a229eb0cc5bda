"""Content-addressed jobs (issue 20): a finished job is reused only when service, parameters and input hashes
match; a changed config or input runs anew into a new directory; `diffractflow gc` removes what no run references.
Against a real nats-server and the echo worker process."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from diffractflow.artifacts import Volume, job_identity, load_valid_manifest
from orchestration.tasks import as_refs, content_addressed, submit_and_wait

BIN = Path(sys.executable).parent


def _submit(settings, volume, src, params, base="r.echo.x"):
    refs = as_refs(Volume(volume), {"data": src})
    jid = content_addressed(base, "echo", params, refs)
    res = asyncio.run(submit_and_wait("echo", refs, params, run_id="r", job_id=jid, timeout=30, settings=settings))
    return jid, res


def test_reuse_only_when_config_and_inputs_are_unchanged(settings, workers, volume):
    workers.start("echo")
    src = volume / "incoming" / "x.dat"
    src.parent.mkdir(parents=True)
    src.write_text("frame one")
    a, ra = _submit(settings, volume, src, {"message": "v1"})
    done = json.loads((volume / "jobs/echo" / a / "manifest.json").read_text())["completed"]
    a2, ra2 = _submit(settings, volume, src, {"message": "v1"})
    assert a2 == a and ra2.outputs == ra.outputs  # nothing changed: the finished job is the answer
    assert json.loads((volume / "jobs/echo" / a / "manifest.json").read_text())["completed"] == done
    b, rb = _submit(settings, volume, src, {"message": "v2"})  # config changed: a new job, a new directory
    assert b != a and not rb.reused
    assert json.loads(Volume(volume).open_ref(rb.outputs["echo"]).read_text())["message"] == "v2"
    assert (volume / "jobs/echo" / a).is_dir()  # the old result stays until gc
    src.write_text("frame one, re-written")  # same name, new content: a new job
    c, rc = _submit(settings, volume, src, {"message": "v2"})
    assert c not in (a, b) and not rc.reused


def test_worker_manifest_records_the_job_identity(settings, workers, volume):
    """The worker records what a job computed from (service major version, parameters, input hashes) and reuses a
    finished job only for the same identity, whatever the job id (a user re-submitting by hand)."""
    from diffractflow.toy import STAGE

    workers.start("echo")
    src = volume / "incoming" / "y.dat"
    src.parent.mkdir(parents=True)
    src.write_text("frame")
    asyncio.run(submit_and_wait("echo", {"data": src}, {"message": "a"}, run_id="r", job_id="fixed", timeout=30,
                                settings=settings))
    refs = as_refs(Volume(volume), {"data": src})
    job_dir = volume / "jobs/echo/fixed"
    same = job_identity("echo", STAGE.version, {"message": "a"}, refs)
    assert load_valid_manifest(Volume(volume), job_dir, same) is not None
    assert load_valid_manifest(Volume(volume), job_dir, job_identity("echo", STAGE.version, {"message": "b"}, refs)) is None
    newer = job_identity("echo", f"{int(STAGE.version.split('.')[0]) + 1}.0.0", {"message": "a"}, refs)
    assert load_valid_manifest(Volume(volume), job_dir, newer) is None
    src.write_text("frame, changed")
    changed = job_identity("echo", STAGE.version, {"message": "a"}, as_refs(Volume(volume), {"data": src}))
    assert load_valid_manifest(Volume(volume), job_dir, changed) is None


def test_gc_removes_only_unreferenced_old_jobs(volume):
    jobs = volume / "jobs" / "svc"
    for name in ("used", "old", "fresh"):
        (jobs / name).mkdir(parents=True)
        (jobs / name / "out.h5").write_bytes(b"x" * 1000)
    old = time.time() - 7200
    for name in ("used", "old"):
        for p in (jobs / name, jobs / name / "out.h5"):
            os.utime(p, (old, old))
    (volume / "runs" / "r1" / "stills").mkdir(parents=True)
    (volume / "runs" / "r1" / "stills" / "s.json").write_text(json.dumps({"partial": {"path": "jobs/svc/used/out.h5"}}))
    env = dict(os.environ)
    dry = subprocess.run([str(BIN / "diffractflow"), "gc", "--volume", str(volume), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "would remove jobs/svc/old" in dry.stdout and (jobs / "old").exists()
    res = subprocess.run([str(BIN / "diffractflow"), "gc", "--volume", str(volume)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not (jobs / "old").exists()
    assert (jobs / "used").exists() and (jobs / "fresh").exists()  # referenced; too recent
