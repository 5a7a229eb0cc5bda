"""Prefect tasks that run a stage through the bus: publish a job, await its result with a timeout.

A failed or timed-out stage raises; Prefect's retries (with backoff) re-submit the *same* job_id
with the next attempt number, which is safe because stages are idempotent. A rejected job
(bad input or parameters) raises :class:`JobRejected`, which is not retried.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Mapping

from prefect import task
from prefect.runtime import task_run as _task_run

from diffractflow import bus
from diffractflow.artifacts import Volume, content_key
from diffractflow.config import Settings
from diffractflow.messages import ArtifactRef, JobRequest, JobResult


class StageFailed(RuntimeError):
    """The stage failed (after the worker's own retries) or did not answer in time: retry."""


class JobRejected(RuntimeError):
    """The stage rejected the job as bad input: retrying cannot help."""


def job_id_for(run_id: str, stage: str, key: str) -> str:
    """The readable part of a job id (run, stage, still); :func:`submit_and_wait` appends the content key."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)[-120:]
    return f"{run_id}.{stage}.{safe}"


def content_addressed(job_id: str, service: str, params: Mapping[str, Any], refs: Mapping[str, ArtifactRef]) -> str:
    """``job_id`` + ``-`` + the content key of (service, parameters, input hashes): a re-run with the same config
    and inputs finds the finished job and reuses it; a changed config or input set is a new job with its own
    output directory (the old one stays until ``diffractflow gc``)."""
    return f"{job_id}-{content_key(service, dict(params), refs)}"


def as_refs(volume: Volume, inputs: Mapping[str, ArtifactRef | str | Path]) -> dict[str, ArtifactRef]:
    """Turn paths (absolute or volume-relative) into hashed references; pass references through."""
    refs = {}
    for name, value in inputs.items():
        if isinstance(value, ArtifactRef):
            refs[name] = value
        elif isinstance(value, dict):
            refs[name] = ArtifactRef(**value)
        else:
            p = Path(value)
            refs[name] = volume.ref(p if p.is_absolute() else volume.resolve(p))
    return refs


async def submit_and_wait(service: str, inputs: Mapping[str, Any], params: Mapping[str, Any], *, run_id: str,
                          job_id: str, attempt: int = 1, timeout: float = 600.0,
                          settings: Settings | None = None, nc=None) -> JobResult:
    """Publish one job and wait for its result. Raises StageFailed / JobRejected; returns the ok result."""
    settings = settings or Settings()
    volume = Volume(settings.volume)
    job = JobRequest(job_id=job_id, run_id=run_id, service=service, attempt=attempt,
                     inputs=as_refs(volume, inputs), params=dict(params))
    own = nc is None
    if own:
        nc = await bus.connect(settings, name=f"submit-{service}")
    try:
        js = nc.jetstream()
        if own:
            await bus.ensure_streams(js)
        # a first attempt subscribes before it publishes, so no earlier result can exist; retries look in the stream too
        waiter = asyncio.create_task(bus.await_result(nc, js, service, job_id, timeout, min_attempt=attempt,
                                                      check_stream=attempt > 1))
        await asyncio.sleep(0)  # let the waiter subscribe before the job can finish
        await bus.publish_job(js, job)
        try:
            result = await waiter
        except bus.ResultTimeout as exc:
            raise StageFailed(str(exc)) from exc
    finally:
        if own:
            await nc.drain()
    if result.status == "rejected":
        raise JobRejected(f"{service} rejected job {job_id}: {result.error.message if result.error else '?'}")
    if result.status != "ok":
        raise StageFailed(f"{service} job {job_id} failed: {result.error.message if result.error else '?'}")
    return result


def _retry_unless_rejected(task_, task_run, state) -> bool:
    """Prefect retry condition: retry failures and timeouts, never a rejection (bad input)."""
    return "JobRejected" not in (state.message or "")


@task(name="run-stage", retries=2, retry_delay_seconds=[1, 5, 20], retry_condition_fn=_retry_unless_rejected,
      task_run_name="{service}:{job_id}")
async def run_stage(service: str, inputs: dict[str, Any], params: dict[str, Any], run_id: str, job_id: str,
                    timeout: float = 600.0) -> dict[str, Any]:
    """Run one stage job on the bus; returns the result as a dict (outputs, metrics).

    The job id is ``job_id`` plus the content key of the service, parameters and input hashes
    (:func:`content_addressed`), so flows reuse finished work only when nothing it depends on changed."""
    attempt = int(_task_run.run_count or 1)
    refs = as_refs(Volume(Settings().volume), inputs)
    result = await submit_and_wait(service, refs, params, run_id=run_id,
                                   job_id=content_addressed(job_id, service, params, refs), attempt=attempt,
                                   timeout=timeout)
    return result.model_dump(mode="json")
