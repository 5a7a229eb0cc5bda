"""The dispatcher's events in hand: a long flow is heartbeaten (its event never comes back while it runs), the
events of a dispatcher that was SIGKILLed come back to the next one after the ack wait, and stopping a dispatcher
does not wait for the NATS drain timeout. Real nats-server (JetStream, auth), real dispatcher processes."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from diffractflow import bus
from diffractflow.messages import DataEvent

ACK_WAIT_S = 2.0

CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from diffractflow.config import Settings
    from orchestration.watcher import dispatch

    marker = Path(sys.argv[1])

    async def on_file(ev):  # takes the event and never finishes: the process is killed holding it
        marker.write_text(ev.event_id)
        await asyncio.sleep(3600)

    asyncio.run(dispatch(Settings(), on_file, None, asyncio.Event(), ack_wait_s=float(sys.argv[2])))
""")


async def _publish(settings, *events: DataEvent) -> None:
    nc = await bus.connect(settings)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    for ev in events:
        await bus.publish_event(js, ev)
    await nc.drain()


def test_a_long_flow_is_not_redelivered_and_stop_is_prompt(bus_env):
    from orchestration.watcher import dispatch

    calls: list[str] = []

    async def scenario():
        stop = asyncio.Event()

        async def on_file(ev):
            calls.append(ev.event_id)
            await asyncio.sleep(3.5 * ACK_WAIT_S)  # far beyond the ack wait: only heartbeats keep it ours

        disp = asyncio.create_task(dispatch(bus_env, on_file, None, stop, durable="d-long", ack_wait_s=ACK_WAIT_S))
        await _publish(bus_env, DataEvent(run_id="long", path="incoming/a.cbf"))
        deadline = time.monotonic() + 30
        while len(calls) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(4.5 * ACK_WAIT_S)  # the flow ends at 3.5 ack waits; a redelivery would show by now
        t0 = time.monotonic()
        stop.set()
        await asyncio.wait_for(disp, 60)
        return time.monotonic() - t0

    stop_s = asyncio.run(scenario())
    assert len(calls) == 1, calls
    assert stop_s < 10, f"the dispatcher took {stop_s:.1f} s to stop"


def test_events_of_a_killed_dispatcher_come_back_to_the_next(bus_env, tmp_path):
    from orchestration.watcher import dispatch

    marker = tmp_path / "taken"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), str(ACK_WAIT_S)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ev = DataEvent(run_id="killed", path="incoming/b.cbf")
    try:
        asyncio.run(_publish(bus_env, ev))
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        assert marker.read_text() == ev.event_id
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(10)
    t_kill = time.monotonic()
    got: list[tuple[str, float]] = []

    async def scenario():
        stop = asyncio.Event()

        async def on_file(e):
            got.append((e.event_id, time.monotonic() - t_kill))

        disp = asyncio.create_task(dispatch(bus_env, on_file, None, stop, ack_wait_s=ACK_WAIT_S))
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2 * ACK_WAIT_S)  # and only once
        stop.set()
        await asyncio.wait_for(disp, 60)

    asyncio.run(scenario())
    assert [g[0] for g in got] == [ev.event_id], got
    assert got[0][1] < ACK_WAIT_S + 10, json.dumps(got)


def _api_error(status: int) -> Exception:
    """The error Prefect's client raises when its server answers ``status`` (e.g. 503 under load)."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    req = httpx.Request("POST", "http://127.0.0.1:4200/api/flow_runs/")
    return PrefectHTTPStatusError.from_httpx_error(
        httpx.HTTPStatusError("busy", request=req, response=httpx.Response(status, request=req)))


def test_a_flow_whose_run_the_api_could_not_create_is_tried_again(bus_env, monkeypatch):
    """A 503 from the orchestrator's API (its server busy) must not lose the file: the flow is tried again; a flow
    that fails for another reason (here bad input) is tried once and its event acknowledged."""
    from orchestration import watcher
    from orchestration.watcher import dispatch

    monkeypatch.setattr(watcher, "DISPATCH_API_RETRY_WAITS_S", (0.2, 0.2, 0.2))
    busy, gone = _api_error(503), _api_error(404)  # made here: importing Prefect would block the event loop
    tries: dict[str, int] = {}

    async def on_file(ev):
        name = Path(ev.path).name
        tries[name] = tries.get(name, 0) + 1
        if name == "busy.cbf" and tries[name] <= 2:
            raise busy
        if name == "bad.cbf":
            raise ValueError("not an image")
        if name == "gone.cbf":
            raise gone  # a client error is not transient

    async def scenario():
        stop = asyncio.Event()
        disp = asyncio.create_task(dispatch(bus_env, on_file, None, stop, durable="d-api", ack_wait_s=2 * ACK_WAIT_S))
        await _publish(bus_env, *(DataEvent(run_id="api", path=f"incoming/{n}")
                                  for n in ("busy.cbf", "bad.cbf", "gone.cbf")))
        deadline = time.monotonic() + 30
        while (tries.get("busy.cbf", 0) < 3 or "bad.cbf" not in tries or "gone.cbf" not in tries) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(5 * ACK_WAIT_S)  # an unacknowledged event would come back by now
        stop.set()
        await asyncio.wait_for(disp, 60)

    asyncio.run(scenario())
    assert tries == {"busy.cbf": 3, "bad.cbf": 1, "gone.cbf": 1}, tries


def test_stop_ends_a_pending_pull_and_loses_no_event(bus_env, monkeypatch):
    """A stop does not wait for the dispatcher's pull of the next event to expire (here 10 s), and an event that
    arrives just after the stop, while the abandoned pull may still be open on the server, reaches the next
    dispatcher."""
    from orchestration import watcher
    from orchestration.watcher import dispatch

    monkeypatch.setattr(watcher, "DISPATCH_FETCH_WAIT_S", 10.0)
    got: list[str] = []

    async def on_file(e):
        got.append(e.event_id)

    async def scenario():
        stop = asyncio.Event()
        disp = asyncio.create_task(dispatch(bus_env, on_file, None, stop, durable="d-stop", ack_wait_s=ACK_WAIT_S))
        await asyncio.sleep(1.5)  # idle: waiting in a pull
        t0 = time.monotonic()
        stop.set()
        await asyncio.wait_for(disp, 60)
        stop_s = time.monotonic() - t0
        ev = DataEvent(run_id="after-stop", path="incoming/c.cbf")
        await _publish(bus_env, ev)
        stop = asyncio.Event()
        disp = asyncio.create_task(dispatch(bus_env, on_file, None, stop, durable="d-stop", ack_wait_s=ACK_WAIT_S))
        deadline = time.monotonic() + 2 * ACK_WAIT_S + 20
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(disp, 60)
        return stop_s, ev.event_id

    stop_s, event_id = asyncio.run(scenario())
    assert stop_s < 5, f"the stop waited {stop_s:.1f} s for the pull to expire"
    assert got == [event_id], got
