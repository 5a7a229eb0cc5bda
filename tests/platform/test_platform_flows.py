"""Prefect flows over the bus, with Prefect's real local server, a real nats-server and real workers."""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from diffractflow import bus
from diffractflow.messages import JobResult


async def _flow_runs(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async with get_client() as client:
        return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))


async def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_flow_stage_failing_once_succeeds_on_prefect_retry(prefect_server, bus_env, workers, volume):
    from orchestration.flows import echo_file_flow

    workers.start("echo", max_deliver=1)  # no bus-level retry: the failure reaches Prefect
    (volume / "incoming").mkdir()
    (volume / "incoming" / "a.dat").write_text("data")
    result = asyncio.run(echo_file_flow("incoming/a.dat", "retry-run", fail_times=1, timeout=30))
    assert result["status"] == "ok"
    assert result["attempt"] == 2  # the second Prefect attempt re-submitted the same job_id
    counters = list((volume / ".toy-failures").glob("retry-run.echo.incoming_a.dat-*"))  # content-addressed job id
    assert len(counters) == 1 and counters[0].read_text() == "1"
    runs = asyncio.run(_flow_runs("echo-file"))
    mine = [r for r in runs if "retry-run" in r.name]
    assert mine and mine[0].state.is_completed()
    tasks = []
    for _ in range(60):  # task runs reach the server through Prefect's event stream: eventually consistent
        tasks = asyncio.run(_task_runs(mine[0].id))
        if tasks and tasks[0].run_count == 2:
            break
        time.sleep(0.5)
    assert [t.run_count for t in tasks] == [2]


def test_watcher_triggers_a_flow_run(prefect_server, bus_env, workers, volume):
    from orchestration.flows import echo_on_file
    from orchestration.watcher import WatchRule, dispatch, watch

    workers.start("echo")
    incoming = volume / "incoming-w"
    incoming.mkdir()

    async def scenario():
        stop = asyncio.Event()
        rule = WatchRule(incoming, "watch-run", settle_s=0.3, expected=2)
        disp = asyncio.create_task(dispatch(bus_env, echo_on_file, None, stop))
        watcher = asyncio.create_task(watch(rule, bus_env, stop, poll_s=0.1))
        await asyncio.sleep(0.5)
        for name in ("s1.cbf", "s2.cbf"):
            part = incoming / f".{name}.part"
            part.write_bytes(os.urandom(1000))
            part.rename(incoming / name)
            await asyncio.sleep(0.2)
        sent = await asyncio.wait_for(watcher, 30)
        # wait for both flow runs to finish
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = [p for p in (volume / "jobs" / "echo").glob("watch-run.*/manifest.json")] \
                if (volume / "jobs" / "echo").exists() else []
            if len(done) == 2:
                break
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(disp, 30)
        return sent

    assert asyncio.run(scenario()) == 2
    runs = asyncio.run(_flow_runs("echo-file"))
    mine = [r for r in runs if "watch-run" in r.name]
    assert len(mine) == 2 and all(r.state.is_completed() for r in mine)
    assert sorted(p.parent.name.rsplit("-", 1)[0] for p in (volume / "jobs/echo").glob("watch-run.*/echo.json")) == [
        "watch-run.echo.incoming-w_s1.cbf", "watch-run.echo.incoming-w_s2.cbf"]


def test_watcher_end_of_run_rules(tmp_path):
    from orchestration.watcher import DirectoryWatcher, WatchRule

    d = tmp_path / "in"
    d.mkdir()
    w = DirectoryWatcher(WatchRule(d, "r", settle_s=1.0, quiet_timeout_s=5.0))
    (d / "a.cbf").write_bytes(b"1")
    assert w.poll(now=0.0) == ([], False)  # just seen: not settled yet
    ready, ended = w.poll(now=1.5)
    assert [p.name for p in ready] == ["a.cbf"] and not ended
    w.published.add("a.cbf")
    assert w.poll(now=3.0) == ([], False)
    assert w.poll(now=7.0) == ([], True)  # quiet for longer than the timeout
    w2 = DirectoryWatcher(WatchRule(d, "r2", settle_s=0.0))
    w2.published.add("a.cbf")
    (d / "END_OF_RUN").write_text("")
    assert w2.poll(now=0.0) == ([], True)


def test_flows_served_as_prefect_deployments(prefect_server, bus_env, workers, volume, tmp_path):
    """`diffractflow serve-flows` registers the flows as deployments on the Prefect server, and a run of the
    echo-file deployment started through Prefect's API executes in the served process and completes."""
    import subprocess
    import sys
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    env = dict(os.environ, PREFECT_API_URL=prefect_server, DIFFRACTFLOW_HOME=str(tmp_path / "nohome"))
    log = open(tmp_path / "serve-flows.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "diffractflow"), "serve-flows"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    async def deployments():
        async with get_client() as client:
            return {f"{(await client.read_flow(d.flow_id)).name}/{d.name}" for d in await client.read_deployments()}

    try:
        want = {"echo-file/echo-file", "diffuse-still/diffuse-still", "diffuse-merge/diffuse-merge"}
        got: set = set()
        for _ in range(120):
            got = asyncio.run(deployments())
            if want <= got:
                break
            time.sleep(1)
        assert want <= got, (got, (tmp_path / "serve-flows.log").read_text()[-2000:])

        workers.start("echo")
        (volume / "incoming").mkdir()
        (volume / "incoming" / "d.dat").write_text("served")
        fr = run_deployment("echo-file/echo-file", parameters={"path": "incoming/d.dat", "run_id": "served"},
                            timeout=180)
        assert fr.state.is_completed(), (fr.state, (tmp_path / "serve-flows.log").read_text()[-3000:])
        assert len(list((volume / "jobs/echo").glob("served.echo.incoming_d.dat-*/echo.json"))) == 1
    finally:
        proc.terminate()
        proc.wait(30)
