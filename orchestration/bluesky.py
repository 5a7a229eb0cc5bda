"""Bluesky runs as an event source: a RunEngine's documents on NATS JetStream start processing.

At the beamline the RunEngine publishes its documents with ``bluesky-nats`` (:func:`connect_publisher`) to
``events.bluesky.<source>.<document name>`` (msgpack, in the platform's ``EVENTS`` stream). The dispatcher
(:func:`orchestration.watcher.dispatch` with a :class:`BlueskyTranslator`, or :func:`serve`) consumes them beside
the file events, and the translator turns them into the same ``DataEvent`` s the directory watcher publishes, so a
run from Bluesky goes through the same flows, retries and end-of-run logic as files landing in a directory.

The mapping, document by document:

``start``
    Opens a run when its metadata has a ``diffractflow`` mapping (``RE(plan, diffractflow={...})``); a run
    without it (an alignment scan) is ignored unless the translator was made with ``require_md=False``. Keys:
    ``run_id`` (default ``bluesky-<first 8 characters of the start uid>``; letters, digits, ``_`` and ``-``),
    ``config`` (the run configuration, a :class:`orchestration.diffuse.DiffuseRunConfig` mapping: validated and
    written to ``runs/<run_id>/config.json`` where the flows read it; ``expected_stills`` defaults to the plan's
    ``num_points``; a configuration that does not validate refuses the run, with the reason in the run record),
    ``stream`` (the event stream whose frames are processed, default ``primary``), ``fields`` (the data keys
    that hold frames, default every external one). A run whose configuration names ``background_frames`` gets its
    smoothed background made (flow ``diffuse-background``) before any still is dispatched.
``descriptor``
    Of the chosen stream: remembers which data keys are external (``external: "FILESTORE:..."``).
``resource``, ``datum`` (and ``datum_page``)
    Name the files. The file of a datum is ``root/resource_path`` (``root`` translated by ``root_map``, the
    detector host's mount point to this host's), or, for AreaDetector-style resources that carry ``template`` and
    ``filename`` in ``resource_kwargs`` (``AD_CBF``, ``AD_TIFF``, ...), ``template % (root/resource_path/,
    filename, point_number)`` with ``point_number`` from the datum. One file is one frame for the flows; a file
    named by several datums is dispatched once. The file must lie on the shared volume.
``event`` (and ``event_page``)
    Each external field's datum is resolved to its file; once the file exists and its size and modification time
    have been stable for ``settle_s`` (a detector still writing it is waited for, up to ``frame_timeout_s``), a
    ``DataEvent`` (``kind="file"``, ``event_id = <run_id>:<file name>``) is published and the dispatcher starts
    the run's per-file flow. A frame that never completes is recorded as missing.
``stop``
    Once every frame of the run has been dispatched (or given up on), an ``end_of_run`` ``DataEvent`` is published:
    the dispatcher runs the end-of-run flow after every per-file flow of the run has finished. Runs that stop with
    ``exit_status`` ``abort`` or ``fail`` are processed with the frames they collected. A run with no frame ends
    without an end-of-run flow.

``runs/<run_id>/bluesky.json`` records the run as the documents described it: start uid, plan, scan id, the
frames dispatched and missing, the exit status, and why a run was refused.

A document message is acknowledged once its work is done (for an event: after its frames are dispatched). The
translator's index of open runs (descriptors, resources, datums) lives in memory; when a dispatcher starts,
:meth:`BlueskyTranslator.recover` rebuilds it from the stream and takes over what the previous dispatcher left
(stopped, or SIGKILLed mid-run): frames it was waiting for are dispatched, frames whose flows it may have had in hand
are dispatched again (content-addressed jobs make that a reuse, not a second computation), a run whose stop it had
received is ended; every frame is processed once and the end of the run comes once, after all its frames. Recovery
reads the whole ``EVENTS`` stream (kept 7 days) once per dispatcher start (0.14 ms per message on loopback). Documents are limited to the server's
``max_payload`` (1 MiB): detectors must write their images to files (external data), not into events.
``stream_resource``/``stream_datum`` (ophyd-async's multi-frame HDF5 streams) are not translated.

NATS permissions: a RunEngine host needs only :func:`publisher_permissions` (publish its documents), never the
admin user.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import nats
import ormsgpack
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import DeliverPolicy

from diffractflow import bus
from diffractflow.artifacts import Volume, atomic_write_json
from diffractflow.config import Settings
from diffractflow.messages import DataEvent, MessageError

log = logging.getLogger("diffractflow.bluesky")

SUBJECT_PREFIX = "events.bluesky"
RUN_RECORD = "bluesky.json"
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


class BlueskyError(ValueError):
    """A run or document the translator refuses; the message says why."""


def documents_subject(source: str = "beamline") -> str:
    """The subject prefix a RunEngine named ``source`` publishes to (documents go to ``<prefix>.<name>``)."""
    if not _TOKEN.fullmatch(source):
        raise BlueskyError(f"bad Bluesky source name {source!r}: letters, digits, '_' and '-' only")
    return f"{SUBJECT_PREFIX}.{source}"


def publisher_permissions(source: str = "*") -> dict:
    """NATS permissions of a RunEngine's user: publish its documents and receive JetStream's acks, nothing else."""
    return {"publish": {"allow": [f"{SUBJECT_PREFIX}.{source}.*"]}, "subscribe": {"allow": ["_INBOX.>"]}}


def parse_subject(subject: str) -> tuple[str, str] | None:
    """(source, document name) of a Bluesky document subject, None for any other subject."""
    parts = subject.split(".")
    if len(parts) != 4 or ".".join(parts[:2]) != SUBJECT_PREFIX:
        return None
    return parts[2], parts[3]


def decode(data: bytes) -> dict:
    """A document as ``bluesky-nats`` packs it (msgpack)."""
    try:
        doc = ormsgpack.unpackb(data)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad message
        raise BlueskyError(f"not a msgpack document ({exc})") from exc
    if not isinstance(doc, dict):
        raise BlueskyError(f"a document must be a mapping, got {type(doc).__name__}")
    return doc


# ----------------------------------------------------------------------------------------- the RunEngine side
class BlueskyPublisher:
    """A RunEngine callback publishing every document to NATS JetStream through ``bluesky-nats``
    (``RE.subscribe(pub)``; ``pub.close()`` at the end). Delivery is CRITICAL: a document JetStream did not
    acknowledge raises in the RunEngine instead of being lost."""

    def __init__(self, url: str, user: str, password: str, source: str = "beamline", timeout: float = 10.0):
        # bluesky-nats only on the beamline side (a RunEngine's process), not in the dispatcher
        from bluesky_nats.nats_publisher import NATSPublisher
        from bluesky_nats.nats_runtime import NatsRuntime
        from bluesky_nats.outbox import Delivery, Outbox

        self.subject = documents_subject(source)
        self.runtime = NatsRuntime(f"bluesky-nats-{source}")
        try:
            client = self.runtime.connect(nats.connect(servers=bus.server_urls(url), user=user, password=password,
                                                       name=f"bluesky-{source}", max_reconnect_attempts=-1),
                                          timeout=timeout)
            self.publisher = NATSPublisher(Outbox(self.runtime, client, delivery=Delivery.CRITICAL),
                                           client.jetstream(), subject_factory=self.subject)
        except BaseException:
            self.runtime.close()
            raise

    def __call__(self, name: str, doc: dict) -> None:
        self.publisher(name, doc)

    def close(self) -> bool:
        """Wait for every pending publish, then disconnect. True if everything was delivered."""
        flushed = self.publisher.close()
        return self.runtime.close() and flushed


def connect_publisher(url: str, user: str, password: str | None = None, password_file: Path | None = None,
                      source: str = "beamline") -> BlueskyPublisher:
    """A :class:`BlueskyPublisher` for ``url`` with a user's password (given, or read from ``password_file``)."""
    if password is None:
        if password_file is None:
            raise BlueskyError("a password or a password file is needed: NATS authentication is always on")
        password = Path(password_file).read_text().strip()
    return BlueskyPublisher(url, user, password, source=source)


# ----------------------------------------------------------------------------------------- the dispatcher side
async def wait_complete(path: Path, settle_s: float, timeout_s: float, poll_s: float = 0.1) -> bool:
    """True once ``path`` exists, is not empty, and its size and mtime have not changed for ``settle_s`` seconds;
    False if that has not happened within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last, since = None, 0.0
    while True:
        now = time.monotonic()
        try:
            st = os.stat(path)
            key = (st.st_size, st.st_mtime_ns) if st.st_size > 0 else None
        except FileNotFoundError:
            key = None
        if key is None or key != last:
            last, since = key, now
        elif now - since >= settle_s:
            return True
        if now >= deadline:
            return False
        await asyncio.sleep(poll_s)


@dataclass
class _Run:
    run_id: str
    start_uid: str
    stream: str
    fields: list[str] | None
    record: dict
    descriptors: dict[str, list[str]] = field(default_factory=dict)  # uid -> external fields to process
    resources: dict[str, dict] = field(default_factory=dict)
    datums: dict[str, tuple[str, dict]] = field(default_factory=dict)  # datum_id -> (resource uid, kwargs)
    files: set[str] = field(default_factory=set)  # volume-relative paths already taken
    tasks: set[asyncio.Task] = field(default_factory=set)
    ready: asyncio.Task | None = None  # the run's start hook (background); frames wait for it
    saved_at: float = 0.0
    replayed: list[tuple[str, Path]] = field(default_factory=list)  # recovery: frames the run's events named
    stopped: bool = False  # recovery: its stop document was delivered to an earlier dispatcher
    ending: asyncio.Task | None = None  # recovery: the end a stopped run was waiting for


StartHook = Callable[[str], Awaitable[Any]]


async def diffuse_background_if_configured(run_id: str) -> Any:
    """Start hook of the diffuse pipeline: make the run's smoothed background first if its config names frames."""
    # diffuse imports prefect (~1 s): only when a run starts
    from .diffuse import diffuse_background_flow, load_config

    if load_config(Volume(Settings().volume), run_id).background_frames:
        return await diffuse_background_flow(run_id)
    return None


#: flow name -> what to run when a run starts (before any of its frames is dispatched)
START_HOOKS: dict[str, StartHook] = {"diffuse-pipeline": diffuse_background_if_configured}


class BlueskyTranslator:
    """Bluesky documents -> ``DataEvent`` s on the bus (see the module docstring for the mapping).

    ``publish`` sends one DataEvent (the dispatcher binds it to its JetStream context); ``source`` limits the
    translator to one RunEngine's documents (None: every source); ``root_map`` maps a resource ``root`` as the
    detector host wrote it to the path on this host; ``settle_s``/``frame_timeout_s`` (seconds) decide when a frame
    is complete or missing; ``on_start`` runs once per run before its frames are dispatched; ``durable``: the
    dispatcher's consumer name (what :meth:`recover` asks about acknowledgements).
    """

    def __init__(self, volume: Volume, *, publish: Callable[[DataEvent], Awaitable[Any]] | None = None,
                 source: str | None = None, require_md: bool = True, settle_s: float = 1.0,
                 frame_timeout_s: float = 300.0, root_map: dict[str, str] | None = None,
                 on_start: StartHook | None = None, validate_config: bool = True, durable: str = "dispatcher"):
        self.volume = volume
        self.durable = durable  # the dispatcher's consumer: its acknowledgement floor tells recovery what was done
        self.publish = publish
        self.source = source
        self.require_md = require_md
        self.settle_s = settle_s
        self.frame_timeout_s = frame_timeout_s
        self.root_map = dict(root_map or {})
        self.on_start = on_start
        self.validate_config = validate_config
        self.runs: dict[str, _Run] = {}  # start uid -> open run
        self.ignored: set[str] = set()  # start uids of runs not processed
        self.descriptor_run: dict[str, str] = {}  # descriptor uid -> start uid
        self.resource_run: dict[str, str] = {}  # resource uid -> start uid

    # ------------------------------------------------------------------ entry point
    async def handle(self, name: str, doc: dict, source: str | None = None,
                     replay: bool = False) -> asyncio.Task | None:
        """Take one document. Returns a task whose end means the document's work is done (its frames published),
        or None when it is done already. ``replay``: rebuild state only, publish nothing."""
        if self.source is not None and source is not None and source != self.source:
            return None
        if name == "event_page":
            # event_model (~0.1 s) only for paged documents
            import event_model

            tasks = [await self.handle("event", ev, source, replay) for ev in event_model.unpack_event_page(doc)]
            tasks = [t for t in tasks if t is not None]
            return asyncio.ensure_future(asyncio.gather(*tasks)) if tasks else None
        if name == "datum_page":
            # event_model (see above)
            import event_model

            for d in event_model.unpack_datum_page(doc):
                await self.handle("datum", d, source, replay)
            return None
        fn = getattr(self, f"_on_{name}", None)
        if fn is None:
            return None
        return await fn(doc, replay)

    def _run_of(self, start_uid: str | None) -> _Run | None:
        return self.runs.get(start_uid) if start_uid else None

    def _save(self, run: _Run) -> None:
        rdir = self.volume.resolve(f"runs/{run.run_id}")
        rdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rdir / RUN_RECORD, run.record)
        run.saved_at = time.monotonic()

    # ------------------------------------------------------------------ documents
    async def _on_start(self, doc: dict, replay: bool) -> None:
        uid = doc["uid"]
        md = doc.get("diffractflow")
        if md is None and self.require_md:
            self.ignored.add(uid)
            log.info("bluesky run without diffractflow metadata ignored", extra={"start_uid": uid})
            return None
        md = dict(md or {})
        run_id = str(md.get("run_id") or f"bluesky-{uid[:8]}")
        record = {"start_uid": uid, "run_id": run_id, "plan_name": doc.get("plan_name"),
                  "scan_id": doc.get("scan_id"), "num_points": doc.get("num_points"), "status": "open",
                  "frames": [], "missing": [], "refused": None, "exit_status": None, "time_start": doc.get("time")}
        try:
            if not _TOKEN.fullmatch(run_id):
                raise BlueskyError(f"run_id {run_id!r}: letters, digits, '_' and '-' only (at most 100)")
            cfg = md.get("config")
            if cfg is not None and not isinstance(cfg, dict):
                raise BlueskyError(f"diffractflow.config must be a mapping, got {type(cfg).__name__}")
            if not replay:
                self._write_config(run_id, None if cfg is None else dict(cfg), doc.get("num_points"))
        except Exception as exc:  # noqa: BLE001 - the run is refused, with the reason on record
            self.ignored.add(uid)
            record.update(status="refused", refused=str(exc))
            log.error("bluesky run refused", extra={"start_uid": uid, "error": str(exc)})
            if _TOKEN.fullmatch(run_id) and not replay:
                self._save(_Run(run_id, uid, "", None, record))
            return None
        fields = md.get("fields")
        run = _Run(run_id, uid, str(md.get("stream", "primary")), list(fields) if fields else None, record)
        self.runs[uid] = run
        if replay:  # what an earlier dispatcher recorded
            f = self.volume.resolve(f"runs/{run_id}") / RUN_RECORD
            if f.exists():
                run.record = json.loads(f.read_text())
        else:
            self._save(run)
            if self.on_start is not None:
                run.ready = asyncio.ensure_future(self._start_hook(run))
        log.info("bluesky run opened", extra={"run_id": run_id, "start_uid": uid})
        return None

    def _write_config(self, run_id: str, cfg: dict | None, num_points: Any) -> None:
        """``runs/<run_id>/config.json`` from the start document's configuration (validated as a diffuse run
        configuration when the translator validates); without one, a configuration already there is kept."""
        # diffuse imports prefect (see diffuse_background_if_configured)
        from .diffuse import DiffuseRunConfig

        rdir = self.volume.resolve(f"runs/{run_id}")
        if cfg is None and (not self.validate_config or (rdir / "config.json").exists()):
            return
        cfg = dict(cfg or {})
        if num_points and "expected_stills" not in cfg and self.validate_config:
            cfg["expected_stills"] = int(num_points)
        if self.validate_config:
            try:
                cfg = DiffuseRunConfig.model_validate(cfg).model_dump()
            except Exception as exc:
                raise BlueskyError(f"diffractflow.config of run {run_id} is not a valid run configuration: "
                                   f"{exc}") from exc
        rdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rdir / "config.json", cfg)

    async def _start_hook(self, run: _Run) -> None:
        try:
            await self.on_start(run.run_id)
        except Exception as exc:  # noqa: BLE001 - the run goes on without what the hook makes
            run.record["start_hook_error"] = str(exc)
            log.exception("start hook failed", extra={"run_id": run.run_id})

    async def _on_descriptor(self, doc: dict, replay: bool) -> None:
        run = self._run_of(doc.get("run_start"))
        if run is None or doc.get("name", "primary") != run.stream:
            return None
        keys = doc.get("data_keys", {})
        external = [k for k, v in keys.items() if v.get("external")]
        if run.fields is not None:
            external = [k for k in run.fields if k in keys]
        run.descriptors[doc["uid"]] = external
        self.descriptor_run[doc["uid"]] = run.start_uid
        return None

    async def _on_resource(self, doc: dict, replay: bool) -> None:
        run = self._run_of(doc.get("run_start"))
        if run is None:
            return None
        run.resources[doc["uid"]] = doc
        self.resource_run[doc["uid"]] = run.start_uid
        return None

    async def _on_datum(self, doc: dict, replay: bool) -> None:
        res_uid = doc.get("resource")
        run = self._run_of(self.resource_run.get(res_uid))
        if run is not None:
            run.datums[doc["datum_id"]] = (res_uid, doc.get("datum_kwargs") or {})
        return None

    def file_of(self, run: _Run, datum_id: str) -> Path:
        """The file a datum names (see the module docstring), on this host."""
        if datum_id not in run.datums:
            raise BlueskyError(f"run {run.run_id}: no datum {datum_id!r} was published before its event")
        res_uid, kwargs = run.datums[datum_id]
        res = run.resources[res_uid]
        root = str(res.get("root") or "")
        for remote, local in self.root_map.items():
            if root == remote or root.startswith(remote.rstrip("/") + "/"):
                root = local + root[len(remote.rstrip("/")):]
                break
        base = Path(root) / str(res.get("resource_path") or "")
        rk = res.get("resource_kwargs") or {}
        if "template" in rk and "filename" in rk:
            point = kwargs.get("point_number", kwargs.get("index"))
            if point is None:
                raise BlueskyError(f"run {run.run_id}: datum {datum_id!r} of a templated resource has no "
                                   "point_number")
            return Path(rk["template"] % (str(base) + os.sep, rk["filename"], int(point)))
        return base

    async def _on_event(self, doc: dict, replay: bool) -> asyncio.Task | None:
        start_uid = self.descriptor_run.get(doc.get("descriptor"))
        run = self._run_of(start_uid)
        if run is None:
            return None
        new = []
        for key in run.descriptors.get(doc["descriptor"], []):
            value = (doc.get("data") or {}).get(key)
            if value is None:
                continue
            try:
                path = self.file_of(run, str(value))
                rel = self.volume.relative(path)
            except Exception as exc:  # noqa: BLE001 - a frame we cannot place is reported, not fatal
                if replay:
                    continue
                run.record["missing"].append({"datum": str(value), "reason": str(exc)})
                log.error("frame not resolved", extra={"run_id": run.run_id, "error": str(exc)})
                continue
            if replay:  # recovery decides which of them were dispatched (see recover)
                run.replayed.append((rel, path))
                continue
            if rel in run.files:
                continue
            run.files.add(rel)
            new.append((rel, path))
        if not new:
            return None
        return self._start_dispatch(run, new)

    def _start_dispatch(self, run: _Run, new: list[tuple[str, Path]]) -> asyncio.Task:
        task = asyncio.ensure_future(self._dispatch_frames(run, new))
        run.tasks.add(task)
        task.add_done_callback(run.tasks.discard)
        return task

    async def _dispatch_frames(self, run: _Run, frames: list[tuple[str, Path]]) -> None:
        if run.ready is not None:
            await asyncio.shield(run.ready)
        for rel, path in frames:
            if not await wait_complete(path, self.settle_s, self.frame_timeout_s):
                run.record["missing"].append({"path": rel, "reason": f"not complete within {self.frame_timeout_s} s "
                                              f"(absent, empty or still growing)"})
                log.error("frame missing", extra={"run_id": run.run_id, "path": rel})
                continue
            ev = DataEvent(run_id=run.run_id, kind="file", path=rel, size=path.stat().st_size,
                           event_id=f"{run.run_id}:{path.name}")
            await self.publish(ev)
            run.record["frames"].append(rel)
            log.info("bluesky frame", extra={"run_id": run.run_id, "path": rel})
            if time.monotonic() - run.saved_at >= 1.0:  # the record on disk follows the run (at most 1/s)
                self._save(run)

    async def _on_stop(self, doc: dict, replay: bool) -> asyncio.Task | None:
        uid = doc.get("run_start")
        self.ignored.discard(uid)
        run = self.runs.get(uid)
        if run is None:
            return None
        run.record.update(exit_status=doc.get("exit_status"), reason=doc.get("reason") or "",
                          num_events=doc.get("num_events"), time_stop=doc.get("time"))
        if replay:  # recovery ends it unless an earlier dispatcher did
            run.stopped = True
            return None
        return asyncio.ensure_future(self._end(run))

    async def _end(self, run: _Run) -> None:
        if run.tasks:
            await asyncio.gather(*list(run.tasks), return_exceptions=True)
        if run.ready is not None:
            await asyncio.gather(run.ready, return_exceptions=True)
        if run.record["frames"]:
            await self.publish(DataEvent(run_id=run.run_id, kind="end_of_run",
                                         path=f"runs/{run.run_id}", event_id=f"{run.run_id}:END"))
            run.record["status"] = "ended"
        else:
            run.record["status"] = "ended without frames"
        self._save(run)
        self._forget(run)
        log.info("bluesky run ended", extra={"run_id": run.run_id, "frames": len(run.record["frames"]),
                                             "missing": len(run.record["missing"])})

    def _forget(self, run: _Run) -> None:
        self.runs.pop(run.start_uid, None)
        for d in list(run.descriptors):
            self.descriptor_run.pop(d, None)
        for r in list(run.resources):
            self.resource_run.pop(r, None)

    # ------------------------------------------------------------------ dispatcher support
    async def recover(self, js, stream: str, until_seq: int) -> int:
        """Take over the runs an earlier dispatcher left open (it stopped or was killed). Returns the documents read.

        ``until_seq``: the last stream sequence that dispatcher was delivered. Its documents up to there rebuild the
        index of open runs (start, descriptors, resources, datums); the stream's own ``DataEvent`` s say which frames
        were dispatched and which runs ended (the run record on disk may lag behind). Then, per open run:

        - frames its delivered events named but no ``DataEvent`` carries (the dispatcher died waiting for them) are
          dispatched now;
        - frames whose ``DataEvent`` the dispatcher may have had in hand (beyond its consumer's acknowledgement floor)
          are dispatched again under a new event id, so the new dispatcher runs their flows (content-addressed jobs:
          a finished job is reused, not recomputed) and the end of the run waits for them;
        - a run whose stop was delivered is ended (its end-of-run event after those frames).

        Documents after ``until_seq`` come to the new dispatcher as usual; those it had unacknowledged come back
        with JetStream's redelivery and then find their frames dispatched (or their run ended) and do nothing.
        """
        try:
            floor = (await js.consumer_info(stream, self.durable)).ack_floor.stream_seq or 0
        except Exception:  # noqa: BLE001 - no consumer state: every delivered frame may be unfinished
            floor = 0
        # run id -> {frame path: [stream seq of its first DataEvent, of its latest (a dispatch again)]}
        published: dict[str, dict[str, list[int]]] = {}
        ended: set[str] = set()
        n = 0
        async for seq, subject, data in _stream_history(js, stream, "events.>"):
            if subject.startswith("events.file.") or subject.startswith("events.end_of_run."):
                try:
                    ev = DataEvent.from_bytes(data)
                except MessageError:
                    continue
                if ev.kind == "end_of_run":
                    ended.add(ev.run_id)
                else:
                    published.setdefault(ev.run_id, {}).setdefault(ev.path, [seq, seq])[1] = seq
                continue
            parsed = parse_subject(subject)
            if parsed is None or seq > until_seq:
                continue
            try:
                await self.handle(parsed[1], decode(data), parsed[0], replay=True)
                n += 1
            except Exception:  # noqa: BLE001 - a bad old document must not stop the recovery
                log.warning("unreadable document skipped in recovery", extra={"seq": seq})
        for run in list(self.runs.values()):
            await self._take_over(run, published.get(run.run_id, {}), run.run_id in ended, floor, until_seq)
        return n

    async def _take_over(self, run: _Run, published: dict[str, list[int]], ended: bool, floor: int,
                         until_seq: int) -> None:
        """Recovery of one open run (see :meth:`recover`)."""
        replayed, run.replayed = run.replayed, []
        if ended or str(run.record.get("status", "")).startswith("ended"):
            self._forget(run)
            return
        run.files = set(published)
        done = sorted(published, key=lambda rel: published[rel][0])
        run.record["frames"] = done + [f for f in run.record.get("frames", []) if f not in published]
        # DataEvents that may have been in hand: dispatched again, under a new id (the old one is deduplicated)
        again = [rel for rel in done if floor < published[rel][1] <= until_seq]
        for rel in again:
            path = self.volume.resolve(rel)
            await self.publish(DataEvent(run_id=run.run_id, kind="file", path=rel, size=path.stat().st_size,
                                         event_id=f"{run.run_id}:{path.name}:again-{published[rel][1]}"))
        new = []
        for rel, path in replayed:
            if rel not in run.files:
                run.files.add(rel)
                new.append((rel, path))
        if new:
            self._start_dispatch(run, new)
        log.info("bluesky run taken over", extra={"run_id": run.run_id, "dispatched": len(done),
                                                  "dispatched_again": len(again), "waiting": len(new),
                                                  "stopped": run.stopped})
        self._save(run)
        if run.stopped:  # close() cancels it with the rest; the stop document comes back then
            run.ending = asyncio.ensure_future(self._end(run))

    async def close(self) -> None:
        """Cancel what is still waiting for frames (their documents stay unacknowledged and come back)."""
        pending = [t for r in self.runs.values() for t in (*r.tasks, *(filter(None, [r.ready, r.ending])))]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _stream_history(js, stream: str, subject: str):
    """(sequence, subject, data) of the messages ``stream`` holds under ``subject`` now, oldest first, through one
    ordered push consumer: 0.14 ms per message on loopback, 4 x faster than a request per message
    (``bus.iter_stream``, 0.55 ms)."""
    state = (await js.stream_info(stream)).state
    if not state.messages:
        return
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL,
                             inactive_threshold=60.0)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=5.0)
            except NatsTimeout:  # nothing more under the filter
                return
            seq = msg.metadata.sequence.stream
            if seq > state.last_seq:
                return
            yield seq, msg.subject, msg.data or b""
            if seq == state.last_seq:
                return
    finally:
        await sub.unsubscribe()


async def serve(settings, flow: str, stop: asyncio.Event, *, source: str | None = None, require_md: bool = True,
                settle_s: float = 1.0, frame_timeout_s: float = 300.0, root_map: dict[str, str] | None = None,
                durable: str = "dispatcher", max_concurrent: int = 8) -> None:
    """Run the dispatcher with Bluesky documents as an event source until ``stop`` is set: every opted-in run
    of ``source`` (None: any) goes through ``flow`` (a name of :data:`orchestration.flows.FLOWS`). File events
    keep working through the same dispatcher."""
    # flows import prefect (~1 s); watcher imports this module at its top (a cycle)
    from .flows import FLOWS
    from .watcher import dispatch

    if flow not in FLOWS:
        raise BlueskyError(f"unknown flow {flow!r}; known: {', '.join(FLOWS)}")
    on_file, on_end = FLOWS[flow]
    translator = BlueskyTranslator(Volume(settings.volume), source=source, require_md=require_md,
                                   settle_s=settle_s, frame_timeout_s=frame_timeout_s, root_map=root_map,
                                   on_start=START_HOOKS.get(flow), validate_config=flow != "echo", durable=durable)
    await dispatch(settings, on_file, on_end, stop, durable=durable, max_concurrent=max_concurrent,
                   bluesky=translator)


# ----------------------------------------------------------------------------------------- a simulated detector
def frame_file_detector(name: str, frames: list[Path], write_dir: Path, *, prefix: str = "frame",
                        reported_root: str | None = None, lag_s: float = 0.0):
    """An ophyd detector for demos and tests that writes one file per trigger, as AreaDetector's file plugins do:
    trigger n copies ``frames[n % len(frames)]`` (e.g. rendered CBFs) to ``write_dir/<prefix>_<n:06d><suffix>``,
    announces it with an ``AD_CBF``-style resource (template, filename) and a datum (point_number), and reads back
    the datum id as its external ``image`` field. ``reported_root``: the ``root`` the resource names (a detector
    host's mount point, translated by the consumer's ``root_map``); ``lag_s``: the file writer starts this long
    after the acquisition and writes the file in two halves (a detector whose files land after its events)."""
    return _detector_class()(name=name, frames=[Path(f) for f in frames], write_dir=Path(write_dir), prefix=prefix,
                             reported_root=reported_root, lag_s=lag_s)


_DETECTOR_CLASS = None


def _detector_class():
    global _DETECTOR_CLASS
    if _DETECTOR_CLASS is not None:
        return _DETECTOR_CLASS

    # ophyd (~1 s) only when a simulated detector is made (demos and tests)
    from ophyd import Component, Device, Signal
    from ophyd.status import Status

    class FrameFileDetector(Device):
        image = Component(Signal, value="", kind="normal")

        def __init__(self, *args, frames, write_dir, prefix, reported_root, lag_s, **kwargs):
            super().__init__(*args, **kwargs)
            self.frames, self.write_dir, self.prefix = frames, write_dir, prefix
            self.reported_root, self.lag_s = reported_root, lag_s
            self.written: list[Path] = []
            self.writers: list[threading.Thread] = []
            self._assets: list[tuple[str, dict]] = []
            self._resource: str | None = None
            self._n = 0

        def stage(self):
            staged = super().stage()
            self.write_dir.mkdir(parents=True, exist_ok=True)
            root = self.reported_root if self.reported_root is not None else str(self.write_dir.anchor)
            rel = str(self.write_dir.relative_to(self.write_dir.anchor)) if self.reported_root is None else ""
            self._resource = str(uuid.uuid4())
            self._assets.append(("resource", {
                "uid": self._resource, "spec": "AD_CBF", "root": root, "resource_path": rel,
                "resource_kwargs": {"template": "%s%s_%6.6d" + self.frames[0].suffix, "filename": self.prefix,
                                    "frame_per_point": 1},
                "path_semantics": "posix"}))
            return staged

        def trigger(self):
            n = self._n
            self._n += 1
            src = self.frames[n % len(self.frames)]
            target = self.write_dir / f"{self.prefix}_{n:06d}{src.suffix}"
            datum_id = f"{self._resource}/{n}"
            self._assets.append(("datum", {"datum_id": datum_id, "resource": self._resource,
                                           "datum_kwargs": {"point_number": n}}))
            self.image.put(datum_id)
            self.written.append(target)
            if self.lag_s:
                t = threading.Thread(target=_lagging_write, args=(src, target, self.lag_s), daemon=True)
                t.start()
                self.writers.append(t)
            else:
                tmp = target.with_name(f".{target.name}.part")
                tmp.write_bytes(src.read_bytes())
                os.replace(tmp, target)
            st = Status(obj=self)
            st.set_finished()
            return st

        def describe(self):
            d = super().describe()
            d[self.image.name].update(external="FILESTORE:", dtype="array", shape=[])
            d[self.image.name].pop("dtype_numpy", None)
            return d

        def collect_asset_docs(self):
            items, self._assets = self._assets, []
            yield from items

    _DETECTOR_CLASS = FrameFileDetector
    return FrameFileDetector


def _lagging_write(src: Path, target: Path, lag_s: float) -> None:
    data = src.read_bytes()
    time.sleep(lag_s)
    with open(target, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(lag_s)
        f.write(data[len(data) // 2:])
