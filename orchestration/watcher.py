"""New data on disk -> events on the bus -> flow runs.

The watcher polls an incoming directory (polling works on every shared filesystem) and publishes a
``DataEvent`` for each file once it has stopped growing (size and mtime unchanged for ``settle_s``).
It also announces the end of a run: an end-of-run marker file, all ``expected`` files seen, or no new
file for ``quiet_timeout_s``. Like Zocalo's file watcher it limits bursts (``max_events_per_s``).

The dispatcher consumes events with a durable consumer and turns them into flow runs: a per-file flow
as each file lands, and an end-of-run flow once the run is complete. Given a
:class:`orchestration.bluesky.BlueskyTranslator` it also takes a RunEngine's documents
(``events.bluesky.<source>.<name>``, published with ``bluesky-nats``) and turns them into the same file and
end-of-run events (see :mod:`orchestration.bluesky` for the mapping).
"""
from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from diffractflow import bus
from diffractflow.artifacts import Volume, atomic_write_json
from diffractflow.config import Settings
from diffractflow.messages import DataEvent, MessageError

from .bluesky import SUBJECT_PREFIX, BlueskyError, BlueskyTranslator, decode, parse_subject

log = logging.getLogger("diffractflow.watcher")
END_MARKERS = ("END_OF_RUN", "end_of_run", "*.end")


@dataclass
class WatchRule:
    directory: Path
    run_id: str
    pattern: str = "*"
    settle_s: float = 1.0
    expected: int | None = None
    quiet_timeout_s: float | None = None
    max_events_per_s: float = 50.0
    #: a re-processing of the run (``process diffuse --rerun``): its events get their own ids, so the bus's
    #: duplicate window does not drop them as repeats of the first processing
    generation: int = 0


@dataclass
class _Seen:
    size: int
    mtime: float
    since: float


@dataclass
class DirectoryWatcher:
    """Polls one directory; yields files once they are complete."""

    rule: WatchRule
    published: set[str] = field(default_factory=set)
    _pending: dict[str, _Seen] = field(default_factory=dict)
    last_new: float = field(default_factory=time.monotonic)
    ended: bool = False

    def state_file(self) -> Path:
        gen = f"-{self.rule.generation}" if self.rule.generation else ""
        return self.rule.directory / f".diffractflow-watch-{self.rule.run_id}{gen}.json"

    def load_state(self) -> None:
        f = self.state_file()
        if f.exists():
            data = json.loads(f.read_text())
            self.published = set(data.get("published", []))
            self.ended = bool(data.get("ended", False))

    def save_state(self) -> None:
        atomic_write_json(self.state_file(), {"published": sorted(self.published), "ended": self.ended})

    def poll(self, now: float | None = None) -> tuple[list[Path], bool]:
        """(files that became ready, whether the run just ended)."""
        now = time.monotonic() if now is None else now
        ready, marker = [], False
        for p in sorted(self.rule.directory.iterdir()):
            name = p.name
            if name.startswith(".") or name.endswith(".part") or not p.is_file():
                continue
            if any(fnmatch.fnmatch(name, m) for m in END_MARKERS):
                marker = True
                continue
            if name in self.published or not fnmatch.fnmatch(name, self.rule.pattern):
                continue
            st = p.stat()
            seen = self._pending.get(name)
            if seen is None or seen.size != st.st_size or seen.mtime != st.st_mtime:
                self._pending[name] = _Seen(st.st_size, st.st_mtime, now)
                self.last_new = now
            elif now - seen.since >= self.rule.settle_s:
                ready.append(p)
        for p in ready:
            self._pending.pop(p.name, None)
        ended = False
        if not self.ended and not self._pending:
            complete = self.rule.expected is not None and len(self.published) + len(ready) >= self.rule.expected
            quiet = (self.rule.quiet_timeout_s is not None and (self.published or ready)
                     and now - self.last_new >= self.rule.quiet_timeout_s)
            if marker or complete or quiet:
                ended = True
        return ready, ended


async def watch(rule: WatchRule, settings: Settings, stop: asyncio.Event, poll_s: float = 0.5) -> int:
    """Publish DataEvents for ``rule.directory`` until ``stop`` is set or the run ends. Returns events sent."""
    volume = Volume(settings.volume)
    volume.relative(rule.directory)  # the incoming directory must be on the volume
    w = DirectoryWatcher(rule)
    w.load_state()
    nc = await bus.connect(settings, name=f"watch-{rule.run_id}")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    sent = 0
    try:
        while not stop.is_set() and not w.ended:
            ready, ended = w.poll()
            for p in ready:
                gen = f"{rule.generation}:" if rule.generation else ""
                ev = DataEvent(run_id=rule.run_id, kind="file", path=volume.relative(p), size=p.stat().st_size,
                               event_id=f"{rule.run_id}:{gen}{p.name}")
                await bus.publish_event(js, ev)
                w.published.add(p.name)
                sent += 1
                log.info("new file", extra={"path": ev.path, "run_id": rule.run_id})
                await asyncio.sleep(1.0 / rule.max_events_per_s)
            if ready:
                w.save_state()
            if ended:
                await bus.publish_event(js, DataEvent(run_id=rule.run_id, kind="end_of_run",
                                                      path=volume.relative(rule.directory),
                                                      event_id=f"{rule.run_id}:{rule.generation or ''}END"))
                w.ended = True
                w.save_state()
                log.info("end of run", extra={"run_id": rule.run_id, "files": len(w.published)})
                break
            try:
                await asyncio.wait_for(stop.wait(), timeout=poll_s)
            except asyncio.TimeoutError:
                pass
    finally:
        await nc.drain()
    return sent


FileHandler = Callable[[DataEvent], Awaitable[object]]


#: seconds before JetStream gives an unacknowledged event to another dispatcher: a dispatcher heartbeats the events
#: whose flows it is running, so this bounds only the recovery time after a dispatcher dies
DISPATCH_ACK_WAIT_S = 60.0

#: waits (s) before the retries of a flow whose run the Prefect API could not create or track (HTTP 5xx/429,
#: connection errors: a server busy under load); the flow's stages are idempotent, so a retry redoes nothing done
DISPATCH_API_RETRY_WAITS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)

#: longest wait (s) of one pull for the next event; a stop request ends the wait at once
DISPATCH_FETCH_WAIT_S = 0.5


def transient_api_error(exc: BaseException) -> bool:
    """True for an error of the orchestrator's HTTP API that a later try may not meet (server busy or restarting,
    connection refused or reset), False for everything else (a failed stage, bad input, a bug)."""
    # httpx (prefect's HTTP client, ~70 ms) only when a flow call failed
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, httpx.TransportError)


async def run_with_api_retries(handler: "FileHandler", ev: DataEvent, waits_s: tuple[float, ...] | None = None):
    """``await handler(ev)``, tried again after each of ``waits_s`` (default ``DISPATCH_API_RETRY_WAITS_S``) while it
    fails with a transient API error (:func:`transient_api_error`); any other error, or the last transient one, is
    raised."""
    waits_s = DISPATCH_API_RETRY_WAITS_S if waits_s is None else waits_s
    for attempt in range(len(waits_s) + 1):
        try:
            return await handler(ev)
        except Exception as exc:
            if attempt == len(waits_s) or not transient_api_error(exc):
                raise
            log.warning("flow run not created or tracked (orchestrator API busy); trying again",
                        extra={"path": ev.path, "run_id": ev.run_id, "error": repr(exc)[:300],
                               "wait_s": waits_s[attempt], "attempt": attempt + 1})
            await asyncio.sleep(waits_s[attempt])


@contextlib.asynccontextmanager
async def shared_prefect_clients():
    """One Prefect API client pair (sync and async) for every flow run started inside, when an API is configured.

    Without it each flow run builds its own clients, and each client a TLS context from the CA bundle even for a
    plain-http API (~25-50 ms of CPU each, three per flow run: ~2-3 CPU-s on a 20-still run, on the cores DIALS
    is using). The flow and task engines take the clients from these contexts (``get_or_create``)."""
    # prefect (~1 s): only a dispatcher that starts flow runs needs it, not the watcher or the CLI's --help
    from prefect.context import AsyncClientContext, SyncClientContext
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # no server configured: leave Prefect's own choice (ephemeral API) alone
        yield
        return
    with SyncClientContext.get_or_create():
        async with AsyncClientContext.get_or_create():
            yield


async def dispatch(settings: Settings, on_file: FileHandler, on_end: FileHandler | None, stop: asyncio.Event,
                   durable: str = "dispatcher", max_concurrent: int = 8,
                   bluesky: "BlueskyTranslator | None" = None, ack_wait_s: float = DISPATCH_ACK_WAIT_S) -> None:
    """Consume events and start a flow run per event (at most ``max_concurrent`` at once), all through one
    pair of Prefect API clients (:func:`shared_prefect_clients`).

    ``on_end`` runs only after every file flow of that run has finished. With ``bluesky``, Bluesky documents
    are translated into file and end-of-run events on the bus (each document acknowledged once its work is
    done); without it they are acknowledged and left alone. The events in hand are heartbeaten: those of a
    dispatcher that died come back to the next one after ``ack_wait_s`` (the durable consumer keeps the value it was
    created with).
    """
    async with shared_prefect_clients():
        await _dispatch(settings, on_file, on_end, stop, durable, max_concurrent, bluesky, ack_wait_s)


async def _dispatch(settings: Settings, on_file: FileHandler, on_end: FileHandler | None, stop: asyncio.Event,
                    durable: str, max_concurrent: int, bluesky: "BlueskyTranslator | None", ack_wait_s: float) -> None:
    nc = await bus.connect(settings, name=durable)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    if bluesky is not None:
        bluesky.publish = lambda ev: bus.publish_event(js, ev)
        try:  # the index of runs an earlier dispatcher left open
            info = await js.consumer_info(bus.EVENTS, durable)
            if info.delivered.stream_seq:
                n = await bluesky.recover(js, bus.EVENTS, info.delivered.stream_seq)
                log.info("bluesky runs recovered", extra={"documents": n, "open_runs": len(bluesky.runs)})
        except bus.NotFoundError:
            pass
    sub = await js.pull_subscribe("events.>", durable=durable, stream=bus.EVENTS,
                                  config=ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                                        ack_wait=ack_wait_s, deliver_policy=DeliverPolicy.ALL,
                                                        max_deliver=3))
    slots = asyncio.Semaphore(max_concurrent)
    per_run: dict[str, set[asyncio.Task]] = {}

    async def _run(handler, ev, msg):
        beat = asyncio.create_task(_keep_in_progress(msg, ack_wait_s))
        try:
            await run_with_api_retries(handler, ev)
        except Exception:
            log.exception("flow for event failed", extra={"path": ev.path, "run_id": ev.run_id})
        finally:
            beat.cancel()
            slots.release()
            await msg.ack()

    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            msgs = await _next_events(sub, stopping)
            if msgs is None:
                break
            for msg in msgs:
                if msg.subject.startswith("events.bluesky."):
                    await _bluesky_document(bluesky, msg, ack_wait_s)
                    continue
                try:
                    ev = DataEvent.from_bytes(msg.data)
                except MessageError as exc:
                    log.warning("bad event dropped", extra={"error": str(exc)})
                    await msg.term()
                    continue
                if ev.kind == "end_of_run":
                    waiting = per_run.pop(ev.run_id, set())
                    if waiting:
                        await asyncio.gather(*waiting, return_exceptions=True)
                    if on_end:
                        await slots.acquire()
                        await _run(on_end, ev, msg)
                    else:
                        await msg.ack()
                    continue
                await slots.acquire()
                t = asyncio.create_task(_run(on_file, ev, msg))
                per_run.setdefault(ev.run_id, set()).add(t)
                t.add_done_callback(lambda t, r=ev.run_id: per_run.get(r, set()).discard(t))
    finally:
        stopping.cancel()
        if bluesky is not None:
            await bluesky.close()
        pending = [t for ts in per_run.values() for t in ts]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(Exception):  # an open pull subscription would hold drain() for its full timeout
            await sub.unsubscribe()
        await nc.drain()


async def _next_events(sub, stopping: asyncio.Future) -> list | None:
    """The next event (a list of at most one message; empty when none came within ``DISPATCH_FETCH_WAIT_S``), or
    None once ``stopping`` is done: a stop does not wait for the pull to expire (at the end of `process diffuse`
    that wait was on the run's critical path). An event the cancelled pull still receives is never acknowledged, so
    JetStream gives it to the next dispatcher after the ack wait."""
    fetch = asyncio.ensure_future(sub.fetch(1, timeout=DISPATCH_FETCH_WAIT_S))
    await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not fetch.done():
        fetch.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await fetch
        return None
    try:
        return fetch.result()
    except (asyncio.TimeoutError, bus.NatsTimeoutError):
        return []


async def _keep_in_progress(msg, ack_wait_s: float = DISPATCH_ACK_WAIT_S) -> None:
    """Tell JetStream every third of the ack wait that the event's flow is still running, so that only the events
    of a dispatcher that died come back (after the ack wait), never those of a long flow."""
    while True:
        await asyncio.sleep(ack_wait_s / 3)
        with contextlib.suppress(Exception):
            await msg.in_progress()


async def _bluesky_document(translator: "BlueskyTranslator | None", msg,
                            ack_wait_s: float = DISPATCH_ACK_WAIT_S) -> None:
    """Hand one Bluesky document to the translator; acknowledge it when its work is done."""
    parsed = parse_subject(msg.subject)
    if translator is None or parsed is None:
        await msg.ack()
        return
    try:
        task = await translator.handle(parsed[1], decode(msg.data), parsed[0])
    except (BlueskyError, KeyError, TypeError, ValueError) as exc:
        log.warning("bad Bluesky document dropped", extra={"subject": msg.subject, "error": repr(exc)})
        await msg.term()
        return
    if task is None:
        await msg.ack()
        return

    beat = asyncio.create_task(_keep_in_progress(msg, ack_wait_s))

    def _ack(t: asyncio.Task) -> None:
        beat.cancel()
        if not t.cancelled():  # cancelled: the dispatcher is stopping; the document comes back
            asyncio.ensure_future(msg.ack())

    task.add_done_callback(_ack)
