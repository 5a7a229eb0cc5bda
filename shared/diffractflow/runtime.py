"""One worker runtime for every service's ``serve``.

A service declares a :class:`Stage` (its name, a pydantic model of its parameters and a handler
``handle(ctx, params)``); the runtime does everything else:

- pulls jobs from the service's durable consumer (replicas share it), ``concurrency`` at a time;
- validates the message and the parameters (bad ones are terminated and dead-lettered with the reason);
- skips work whose outputs already exist with matching hashes (idempotent re-delivery);
- runs the handler in a thread while heart-beating ``in_progress()`` so long jobs keep their lease;
- publishes the result, writes the manifest, acks; on failure ``nak``s with backoff until
  ``max_deliver``, then publishes a failed result and a dead letter;
- on SIGTERM stops pulling, lets the current job finish within a grace period, else releases it.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import traceback
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from . import bus
from .artifacts import Volume, VolumeError, job_identity, load_valid_manifest, write_manifest
from .config import Settings
from .logs import job_id_var, run_id_var, setup_logging
from .messages import (
    ArtifactRef,
    DeadLetter,
    JobErrorInfo,
    JobRequest,
    JobResult,
    MessageError,
    peek_ids,
    utcnow,
)

from .errors import InputError

log = logging.getLogger("diffractflow.runtime")


#: The job cannot succeed as given (bad file, wrong shape, ...): reject it, do not retry. Kept under this name
#: for the workers; services subclass :class:`diffractflow.errors.InputError`.
BadInput = InputError


@dataclass
class Stage:
    """What a service declares: its name, its parameter model and its handler; optionally a ``warm_up`` that
    ``serve`` runs once before taking jobs (load compiled kernels, heavy imports), so the first job does not
    pay for it."""

    service: str
    params_model: type[BaseModel]
    handler: Callable[["JobContext", BaseModel], None]
    version: str = "0.1.0"
    warm_up: Callable[[], None] | None = None


@dataclass
class JobContext:
    """What a handler sees: the job, the volume, its output directory, outputs and metrics."""

    job: JobRequest
    volume: Volume
    out_dir: Path
    settings: Settings
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    _beat: Callable[[], None] | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("diffractflow.job"))

    def input_path(self, name: str) -> Path:
        """The named input, resolved inside the volume and checked against its hash."""
        if name not in self.job.inputs:
            raise BadInput(f"job {self.job.job_id} has no input named {name!r} (has: {sorted(self.job.inputs)})")
        try:
            return self.volume.open_ref(self.job.inputs[name])
        except VolumeError as exc:
            raise BadInput(str(exc)) from exc

    def input_paths(self, prefix: str = "") -> list[Path]:
        return [self.input_path(n) for n in sorted(self.job.inputs) if n.startswith(prefix)]

    def add_output(self, name: str, path: str | os.PathLike) -> None:
        p = Path(path).resolve()
        if not p.exists():
            raise FileNotFoundError(f"output {name!r} was registered but {p} does not exist")
        self.volume.relative(p)  # must be inside the volume
        self.outputs[name] = p

    def heartbeat(self) -> None:
        if self._beat:
            self._beat()


class Worker:
    def __init__(self, stage: Stage, settings: Settings | None = None):
        self.stage = stage
        self.settings = settings or Settings()
        self.volume = Volume(self.settings.volume)
        self.worker_name = f"{stage.service}@{socket.gethostname()}:{os.getpid()}"
        self._stopping = asyncio.Event()
        self._inflight: set[asyncio.Task] = set()
        self.nc = None
        self.js = None
        self.abandoned_threads = False

    # ----------------------------------------------------------------- lifecycle
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        self.volume.root.mkdir(parents=True, exist_ok=True)
        self.nc = await bus.connect(self.settings, name=self.worker_name)
        self.js = self.nc.jetstream()
        sub = await self._subscribe()
        if sub is None:  # stopped before the bus was ready
            with contextlib.suppress(Exception):
                await self.nc.close()
            return
        log.info("serving", extra={"worker": self.worker_name, "concurrency": self.settings.concurrency,
                                   "volume": str(self.volume.root)})
        pullers = [asyncio.create_task(self._pull_loop(sub)) for _ in range(self.settings.concurrency)]
        await self._stopping.wait()
        log.info("stopping: no new jobs; waiting for jobs in flight",
                 extra={"in_flight": len(self._inflight), "grace_s": self.settings.shutdown_grace_s})
        # pullers notice the stop after their current fetch (<= 1 s); one fetched meanwhile is nak'ed back
        _, slow = await asyncio.wait(pullers, timeout=1.5)
        for t in slow:
            t.cancel()
        if self._inflight:
            done, pending = await asyncio.wait(self._inflight, timeout=self.settings.shutdown_grace_s)
            for t in pending:
                t.cancel()  # releases (naks) the job, see _process
            if pending:
                await asyncio.wait(pending, timeout=5)
                self.abandoned_threads = True  # handler threads cannot be killed: serve_stage exits hard
        # flush (acks, naks, results are out) and close; not drain(): nats-py's drain waits for late
        # pull-status messages nobody reads and can stall for its whole drain timeout
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=5)
        with contextlib.suppress(Exception):
            await self.nc.close()
        log.info("stopped")

    async def _subscribe(self):
        """The work subscription, once the streams exist (created here if our credentials allow it, else by the
        operator). Waits, retrying every second, while the streams are missing or the bus cannot answer yet (a
        cluster that just formed or lost its meta leader times out JetStream API requests): a worker started with
        its bus must not die of that. ``None`` if stopped meanwhile."""
        waited = 0.0
        while not self._stopping.is_set():
            try:
                await bus.ensure_streams(self.js)
            except Exception as exc:
                if waited == 0.0:
                    log.warning("streams not there yet (created by `diffractflow up` or an admin); waiting",
                                extra={"error": repr(exc)})
            else:
                try:
                    return await bus.work_subscription(self.js, self.stage.service, self.settings)
                except bus.TRANSIENT_ERRORS as exc:
                    log.warning("the bus did not answer the subscription yet; retrying", extra={"error": repr(exc)})
            await asyncio.sleep(1.0)
            waited += 1.0
        return None

    def stop(self) -> None:
        self._stopping.set()

    async def _pull_loop(self, sub) -> None:
        while not self._stopping.is_set():
            try:
                msgs = await sub.fetch(1, timeout=1.0)
            except (asyncio.TimeoutError, bus.NatsTimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # disconnected: the client reconnects on its own
                log.warning("fetch failed, retrying", extra={"error": repr(exc)})
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                if self._stopping.is_set():  # fetched while stopping: give it straight back
                    with contextlib.suppress(Exception):
                        await msg.nak()
                    continue
                # The slot frees as soon as the handler is done: publishing the result and acking run on
                # in the job's task while this loop already fetches the next job (pipelined, never more
                # than `concurrency` handlers at once).
                slot_free = asyncio.Event()
                task = asyncio.create_task(self._process_safely(msg, slot_free))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
                try:
                    await asyncio.shield(slot_free.wait())
                except asyncio.CancelledError:
                    if self._stopping.is_set():
                        return  # the job task itself is awaited (or cancelled) by run()
                    raise

    # ------------------------------------------------------------------ one job
    async def _process_safely(self, msg, slot_free: asyncio.Event | None = None) -> None:
        """Never let one message stop the worker: a bus error mid-job leaves the message un-acked,
        so JetStream redelivers it (and the manifest makes the redelivery cheap)."""
        slot_free = slot_free or asyncio.Event()
        try:
            await self._process(msg, slot_free)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("job processing interrupted; it will be redelivered", extra={"error": repr(exc)})
        finally:
            slot_free.set()

    async def _process(self, msg, slot_free: asyncio.Event) -> None:
        deliveries = msg.metadata.num_delivered if msg.metadata else 1
        try:
            job = JobRequest.from_bytes(msg.data)
        except MessageError as exc:
            await self._reject_raw(msg, "bad_message", str(exc), deliveries)
            return
        job_id_var.set(job.job_id)
        run_id_var.set(job.run_id)
        started = utcnow()
        if job.service != self.stage.service:
            await self._finish_rejected(msg, job, "bad_message",
                                        f"job is for service {job.service!r}, this is {self.stage.service!r}", deliveries, started)
            return
        try:
            params = self.stage.params_model.model_validate(job.params)
        except ValidationError as exc:
            errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
            await self._finish_rejected(msg, job, "bad_params", f"invalid parameters: {errs}", deliveries, started)
            return

        job_dir = self.volume.job_dir(self.stage.service, job.job_id)
        identity = job_identity(self.stage.service, self.stage.version, job.params, job.inputs)
        lock = await self._lock_job_dir(msg, job_dir)
        try:
            await self._process_locked(msg, slot_free, job, params, job_dir, identity, deliveries, started)
        finally:
            os.close(lock)  # releases the lock (a SIGKILLed holder's lock goes with its process)

    async def _lock_job_dir(self, msg, job_dir: Path) -> int:
        """An exclusive lock on the job's directory (``flock`` on the directory itself: no lock file to leave
        behind). A redelivery that arrives while an earlier delivery is still computing (its heartbeats starved,
        e.g. by a native library holding the GIL) waits here, heartbeating, and then finds the manifest, so a
        job is never computed twice at once. (``flock`` is local to one host; on NFS use one volume per host.)"""
        fd = os.open(job_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        except BaseException:
            os.close(fd)
            raise
        log.info("another delivery of this job is computing it; waiting for it to finish")
        beat = asyncio.create_task(self._heartbeat(msg, asyncio.Event()))
        try:
            while True:
                await asyncio.sleep(0.5)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    continue
        except BaseException:
            os.close(fd)
            raise
        finally:
            beat.cancel()

    async def _process_locked(self, msg, slot_free: asyncio.Event, job: JobRequest, params, job_dir: Path,
                              identity: dict, deliveries: int, started) -> None:
        done = load_valid_manifest(self.volume, job_dir, identity)
        if done is not None:
            log.info("outputs already complete; acknowledging without recomputing")
            await self._publish(job, "ok", done["outputs"], done.get("metrics", {}), None, started, reused=True)
            await msg.ack()
            return
        for stale in job_dir.glob(".*"):  # temp files and scratch directories of a killed earlier delivery
            _remove(stale)

        loop = asyncio.get_running_loop()
        beat_now = asyncio.Event()
        ctx = JobContext(job=job, volume=self.volume, out_dir=job_dir, settings=self.settings,
                         _beat=lambda: loop.call_soon_threadsafe(beat_now.set))
        heart = asyncio.create_task(self._heartbeat(msg, beat_now))
        log.info("job started", extra={"attempt": job.attempt, "deliveries": deliveries})
        try:
            handler_future = loop.run_in_executor(None, _run_handler, self.stage.handler, ctx, params)
            try:
                await asyncio.shield(handler_future)
            except asyncio.CancelledError:
                # shutdown grace expired: give the job back to the queue for another replica
                with contextlib.suppress(Exception):
                    await msg.nak()
                log.warning("job released at shutdown")
                raise
        except (BadInput, VolumeError) as exc:
            _clear_dir(job_dir)
            await self._finish_rejected(msg, job, "bad_input", str(exc), deliveries, started)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _clear_dir(job_dir)  # a failed attempt leaves no artifact behind; the next one starts clean
            detail = "".join(traceback.format_exception(exc))[-4000:]
            if deliveries >= self.settings.max_deliver:
                log.error("job failed for the last time", extra={"error": repr(exc)})
                err = JobErrorInfo(kind="failure", message=f"{type(exc).__name__}: {exc}", detail=detail)
                await self._dead_letter(job.job_id, job.run_id, "failure", err.message, msg, deliveries)
                await self._publish(job, "failed", {}, ctx.metrics, err, started)
                await msg.term()
            else:
                delay = self.settings.nak_delay_s * (2 ** (deliveries - 1))
                log.warning("job failed; will be redelivered", extra={"error": repr(exc), "delay_s": delay})
                await msg.nak(delay=delay)
            return
        finally:
            heart.cancel()
            slot_free.set()

        outputs = {name: self.volume.ref(path) for name, path in ctx.outputs.items()}
        write_manifest(job_dir, outputs, ctx.metrics, identity)
        # logged before the result goes out: a lost ack later leads to a reuse from the manifest, never a recompute
        log.info("job computed")
        await self._publish(job, "ok", outputs, ctx.metrics, None, started)
        await msg.ack()
        log.info("job done", extra={"seconds": (utcnow() - started).total_seconds()})

    async def _heartbeat(self, msg, beat_now: asyncio.Event) -> None:
        interval = max(self.settings.ack_wait_s / 3.0, 0.2)
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(beat_now.wait(), timeout=interval)
            beat_now.clear()
            with contextlib.suppress(Exception):
                await msg.in_progress()

    # ------------------------------------------------------------- reporting
    async def _publish(self, job, status, outputs, metrics, error, started, reused=False) -> None:
        result = JobResult(job_id=job.job_id, run_id=job.run_id, service=self.stage.service, attempt=job.attempt,
                           status=status, outputs=outputs, metrics=_jsonable(metrics), error=error,
                           worker=self.worker_name, reused=reused, started_at=started)
        await bus.publish_result(self.js, result)

    async def _finish_rejected(self, msg, job: JobRequest, kind: str, reason: str, deliveries: int, started) -> None:
        log.warning("job rejected", extra={"kind": kind, "reason": reason})
        # the dead letter first: whoever sees the rejected result can already find the letter
        await self._dead_letter(job.job_id, job.run_id, kind, reason, msg, deliveries)
        await self._publish(job, "rejected", {}, {}, JobErrorInfo(kind=kind, message=reason), started)
        await msg.term()

    async def _reject_raw(self, msg, kind: str, reason: str, deliveries: int) -> None:
        job_id, run_id = peek_ids(msg.data)
        log.warning("message rejected", extra={"kind": kind, "reason": reason})
        await self._dead_letter(job_id, run_id, kind, reason, msg, deliveries)
        if job_id:  # let a waiting submitter know at once instead of timing out
            with contextlib.suppress(Exception):
                await bus.publish_result(self.js, JobResult(
                    job_id=job_id, run_id=run_id or "unknown", service=self.stage.service, status="rejected",
                    error=JobErrorInfo(kind=kind, message=reason), worker=self.worker_name))
        await msg.term()

    async def _dead_letter(self, job_id, run_id, kind, reason, msg, deliveries) -> None:
        raw = (msg.data or b"")[:16384].decode("utf-8", errors="replace")
        letter = DeadLetter(service=self.stage.service, reason=reason[:4000], kind=kind, job_id=job_id,
                            run_id=run_id, deliveries=deliveries, raw=raw)
        await bus.publish_dead_letter(self.js, letter)


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _clear_dir(d: Path) -> None:
    for p in d.iterdir():
        _remove(p)


def _run_handler(handler, ctx: JobContext, params: BaseModel) -> None:
    job_id_var.set(ctx.job.job_id)
    run_id_var.set(ctx.job.run_id)
    handler(ctx, params)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def serve_stage(stage: Stage, settings: Settings | None = None) -> None:
    """Entry point of ``<service> serve``: run the worker until SIGTERM/SIGINT."""
    settings = settings or Settings()
    setup_logging(stage.service, settings.log_level)
    if stage.warm_up is not None:
        t0 = time.perf_counter()
        try:
            stage.warm_up()
            logging.getLogger("diffractflow.worker").info("warm-up done in %.2f s", time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - the jobs themselves report real failures
            logging.getLogger("diffractflow.worker").warning("warm-up failed (%s); continuing", exc)
    worker = Worker(stage, settings)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(worker.run())
    finally:
        if worker.abandoned_threads:  # a released job's handler is still running: do not wait for it
            logging.shutdown()
            os._exit(0)
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def run_inline(stage: Stage, job: JobRequest, settings: Settings) -> JobContext:
    """Run one job through a stage without the bus (tests, debugging): same validation and outputs."""
    params = stage.params_model.model_validate(job.params)
    volume = Volume(settings.volume)
    ctx = JobContext(job=job, volume=volume, out_dir=volume.job_dir(stage.service, job.job_id), settings=settings)
    stage.handler(ctx, params)
    outputs = {name: volume.ref(p) for name, p in ctx.outputs.items()}
    write_manifest(ctx.out_dir, outputs, ctx.metrics, job_identity(stage.service, stage.version, job.params, job.inputs))
    return ctx


__all__ = ["BadInput", "JobContext", "Stage", "Worker", "serve_stage", "run_inline", "ArtifactRef"]
