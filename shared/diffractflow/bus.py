"""The NATS JetStream bus: streams, per-service work queues, results, events and dead letters.

Subjects (one stream each):
- ``jobs.<service>``            JOBS     work-queue retention; one durable pull consumer per service,
                                         shared by all its replicas (explicit ack, max_deliver, backoff)
- ``results.<service>.<job_id>`` RESULTS  limits retention; a submitter waits on its job's subject
- ``events.<kind>.<run_id>``    EVENTS   new-data events from the watcher
- ``dlq.<service>``              DLQ      dead letters with the reason; also JetStream's
                                         max-deliveries advisories for the JOBS consumers
Publishing uses ``Nats-Msg-Id`` so JetStream drops duplicates inside its window.

The bus may be one nats-server or a JetStream cluster: ``DIFFRACTFLOW_NATS_URL`` then lists several nodes,
comma-separated; a client connects to one of them and fails over to another when its node dies, and the
streams are kept on three nodes (R3) so that losing one loses no job and no result.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, AsyncIterator

import nats
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.errors import ConnectionReconnectingError, NoRespondersError
from nats.js.errors import NoStreamResponseError, NotFoundError, ServiceUnavailableError

from .config import Settings
from .messages import DataEvent, DeadLetter, JobRequest, JobResult, MessageError

JOBS, RESULTS, EVENTS, DLQ = "JOBS", "RESULTS", "EVENTS", "DLQ"
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES." + JOBS + ".>"
DUPLICATE_WINDOW_S = 120.0
STREAM_RECHECK_S = 3.0
MAX_REPLICAS = 3
PUBLISH_RETRY_S = 20.0  # a publish with a Nats-Msg-Id is retried this long (a cluster electing a new leader)


def job_subject(service: str) -> str:
    return f"jobs.{service}"


def result_subject(service: str, job_id: str) -> str:
    return f"results.{service}.{job_id}"


def dlq_subject(service: str) -> str:
    return f"dlq.{service}"


def event_subject(kind: str, run_id: str) -> str:
    return f"events.{kind}.{run_id}"


def consumer_name(service: str) -> str:
    return service.replace(".", "_")


def server_urls(urls: str | list[str]) -> list[str]:
    """The server URLs in ``nats://a:4222,nats://b:4222`` (or a list of such strings), in order, blanks dropped."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out = [u.strip() for item in items for u in str(item).split(",") if u.strip()]
    if not out:
        raise ValueError(f"no NATS server URL in {urls!r}")
    return out


async def connect(settings: Settings, name: str = "diffractflow", **extra: Any) -> nats.NATS:
    """Connect with the settings' credentials to one of the servers in ``settings.nats_url`` (comma-separated
    for a cluster); on losing it, reconnect forever to any node of the cluster (the listed ones and those the
    cluster announces). A dead peer that does not close the connection is noticed within about a minute
    (pings every 20 s, three unanswered)."""

    async def _quiet(_exc):  # errors are surfaced by the calls that fail; keep logs clean
        return None

    opts = dict(settings.nats_options())
    opts["servers"] = server_urls(opts.get("servers") or settings.nats_url)
    opts.update(
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        ping_interval=20,
        max_outstanding_pings=3,
        error_cb=_quiet,
    )
    opts.update(extra)
    if "servers" in extra:
        opts["servers"] = server_urls(extra["servers"])
    return await nats.connect(**opts)


def cluster_size(nc: nats.NATS) -> int:
    """Nodes of the cluster the client is connected to, as its server announces them (1 for a lone server)."""
    info = getattr(nc, "_server_info", None) or {}
    if not info.get("cluster"):
        return 1
    return max(1, len(info.get("connect_urls") or []))


def stream_configs(replicas: int = 1) -> list[StreamConfig]:
    """The platform's four streams, each kept on ``replicas`` nodes."""
    r = dict(num_replicas=replicas)
    return [
        StreamConfig(name=JOBS, subjects=["jobs.>"], retention=RetentionPolicy.WORK_QUEUE,
                     storage=StorageType.FILE, duplicate_window=DUPLICATE_WINDOW_S, max_msg_size=1 << 20, **r),
        StreamConfig(name=RESULTS, subjects=["results.>"], retention=RetentionPolicy.LIMITS,
                     storage=StorageType.FILE, max_age=7 * 86400.0, duplicate_window=DUPLICATE_WINDOW_S, **r),
        StreamConfig(name=EVENTS, subjects=["events.>"], retention=RetentionPolicy.LIMITS,
                     storage=StorageType.FILE, max_age=7 * 86400.0, duplicate_window=DUPLICATE_WINDOW_S, **r),
        StreamConfig(name=DLQ, subjects=["dlq.>", MAX_DELIVERIES_ADVISORY], retention=RetentionPolicy.LIMITS,
                     storage=StorageType.FILE, max_age=30 * 86400.0, discard=DiscardPolicy.OLD, **r),
    ]


async def ensure_streams(js, replicas: int | None = None) -> None:
    """Create (or leave as they are) the platform's four streams.

    ``replicas``: copies of each stream; by default ``DIFFRACTFLOW_NATS_REPLICAS`` if set (a deployment that
    must not start with fewer), else as many nodes as the cluster has now, at most 3 (1 on a lone server).
    A stream that exists with fewer replicas is scaled up when these credentials may (an admin's); one with
    more is never scaled down. Creating R3 streams fails while fewer than three nodes are up.
    """
    if replicas is None:
        env = os.environ.get("DIFFRACTFLOW_NATS_REPLICAS", "").strip()
        replicas = int(env) if env else min(MAX_REPLICAS, cluster_size(js._nc))
    for cfg in stream_configs(replicas):
        try:
            info = await js.stream_info(cfg.name)
        except NotFoundError:
            with contextlib.suppress(Exception):  # another process may create it at the same moment
                await js.add_stream(cfg)
            info = await js.stream_info(cfg.name)
        if (info.config.num_replicas or 1) < replicas:
            with contextlib.suppress(Exception):  # a service's credentials may not update streams
                info.config.num_replicas = replicas
                await js.update_stream(info.config)


#: what a request meets while a node is down, a client reconnects or a stream (or the cluster's meta layer)
#: elects a leader: worth asking again
TRANSIENT_ERRORS = (NatsTimeoutError, asyncio.TimeoutError, NoRespondersError, NoStreamResponseError,
                    ServiceUnavailableError, ConnectionReconnectingError)


async def _publish_once_only(js, subject: str, data: bytes, msg_id: str, retry_s: float = PUBLISH_RETRY_S):
    """Publish with ``Nats-Msg-Id``; retry while the stream has no leader (a node just died, an election is
    under way) or the client is reconnecting. Safe: the stream stores the same id once."""
    deadline = asyncio.get_running_loop().time() + retry_s
    delay = 0.1
    while True:
        try:
            return await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
        except TRANSIENT_ERRORS:
            if asyncio.get_running_loop().time() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def work_consumer_config(service: str, settings: Settings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=consumer_name(service),
        filter_subject=job_subject(service),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=settings.max_ack_pending,
        deliver_policy=DeliverPolicy.ALL,
    )


async def work_subscription(js, service: str, settings: Settings):
    """The durable pull consumer of one service; replicas bind to the same durable and share the work."""
    return await js.pull_subscribe(job_subject(service), durable=consumer_name(service), stream=JOBS,
                                   config=work_consumer_config(service, settings))


async def publish_job(js, job: JobRequest) -> None:
    """Publish a job; the same job_id and attempt published twice is stored once."""
    await _publish_once_only(js, job_subject(job.service), job.to_bytes(), f"{job.job_id}#{job.attempt}")


async def publish_result(js, result: JobResult) -> None:
    await _publish_once_only(js, result_subject(result.service, result.job_id), result.to_bytes(),
                             f"{result.job_id}#{result.attempt}#{result.status}")


async def publish_dead_letter(js, letter: DeadLetter) -> None:
    await js.publish(dlq_subject(letter.service), letter.to_bytes())


async def publish_event(js, event: DataEvent) -> None:
    await _publish_once_only(js, event_subject(event.kind, event.run_id), event.to_bytes(), event.event_id)


class ResultTimeout(TimeoutError):
    pass


async def await_result(nc, js, service: str, job_id: str, timeout: float, min_attempt: int = 1,
                       check_stream: bool = True) -> JobResult:
    """Wait for the result of ``job_id``; an ``ok`` result of any attempt counts, others only from ``min_attempt`` on.

    Subscribes first, then (``check_stream``) looks at what the RESULTS stream already holds, so a result
    published before we started waiting (a retry after a timeout) is not missed. A first submission that
    subscribed before publishing its job can skip that look-up.
    """
    subject = result_subject(service, job_id)
    sub = await nc.subscribe(subject)

    def acceptable(res: JobResult) -> bool:
        return res.status == "ok" or res.attempt >= min_attempt

    async def from_stream() -> JobResult | None:
        try:
            last = await js.get_last_msg(RESULTS, subject)
            res = JobResult.from_bytes(last.data)
            return res if acceptable(res) else None
        except (NotFoundError, MessageError):
            return None
        except Exception:  # disconnected right now: the subscription or the next look will catch it
            return None

    try:
        if check_stream and (res := await from_stream()):
            return res
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise ResultTimeout(f"no result for {service} job {job_id} within {timeout:.0f} s")
            try:
                msg = await sub.next_msg(timeout=min(remaining, STREAM_RECHECK_S))
            except NatsTimeoutError:
                # a result published while we were disconnected is only in the stream
                if res := await from_stream():
                    return res
                continue
            try:
                res = JobResult.from_bytes(msg.data)
            except MessageError:
                continue
            if acceptable(res):
                return res
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


@dataclass
class QueueStatus:
    service: str
    pending: int
    ack_pending: int
    redelivered: int
    waiting: int


async def queue_status(js, service: str) -> QueueStatus | None:
    try:
        info = await js.consumer_info(JOBS, consumer_name(service))
    except NotFoundError:
        return None
    return QueueStatus(service, info.num_pending or 0, info.num_ack_pending or 0,
                       info.num_redelivered or 0, info.num_waiting or 0)


async def iter_stream(js, stream: str, subject: str | None = None, limit: int = 1000) -> AsyncIterator[tuple[int, str, bytes]]:
    """(sequence, subject, data) of the messages a limits stream holds, oldest first."""
    info = await js.stream_info(stream)
    if not info.state.messages:
        return
    first, last = max(info.state.first_seq, 1), info.state.last_seq
    count = 0
    for seq in range(first, last + 1):
        if count >= limit:
            return
        try:
            msg = await js.get_msg(stream, seq)
        except NotFoundError:
            continue
        if subject and not _subject_matches(subject, msg.subject):
            continue
        count += 1
        yield seq, msg.subject, msg.data or b""


def _subject_matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def describe_dead_letter(subject: str, data: bytes) -> dict[str, Any]:
    """A dead letter or a max-deliveries advisory, as a flat dict for display."""
    if subject.startswith("$JS.EVENT.ADVISORY"):
        adv = json.loads(data)
        return {"service": adv.get("consumer"), "kind": "max_deliveries",
                "reason": f"delivered {adv.get('deliveries')} times without an ack (worker crashed each time?)",
                "stream_seq": adv.get("stream_seq"), "at": adv.get("timestamp")}
    letter = DeadLetter.from_bytes(data)
    return letter.model_dump(mode="json")
