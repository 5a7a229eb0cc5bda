"""The bus as a three-node JetStream cluster (real nats-server processes on loopback, R3 streams): a node
SIGKILLed mid-run loses no job and no result, duplicates none, the worker fails over to another node, and the
node, restarted on its store, catches up.

``nats_server`` is overridden here by a :class:`NatsCluster`, so the suite's ``settings``, ``workers`` and
``probe`` fixtures point at the whole cluster (``DIFFRACTFLOW_NATS_URL`` lists the three nodes).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import subprocess
import time
from pathlib import Path

import nats.errors
import pytest

from diffractflow import bus
from diffractflow.artifacts import Volume
from diffractflow.config import Settings
from diffractflow.messages import JobRequest, JobResult
from diffractflow.natsserver import (SERVICES, NatsCluster, container_nats_cluster_conf, env_var_for,
                                     nats_server_binary)


@pytest.fixture
def nats_server(tmp_path_factory):
    cluster = NatsCluster(tmp_path_factory.mktemp("cluster"), size=3, extra_services=["echo"]).start()
    yield cluster
    cluster.stop()


def _input(volume: Path) -> dict:
    p = volume / "incoming" / "x.dat"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("x")
    return {"data": Volume(volume).ref(p)}


def _client_node_name(monitor, cluster: NatsCluster) -> str | None:
    """The node the echo worker is connected to, as the nodes' own /connz report it."""
    node = monitor.client_node(cluster.nodes, "echo@")
    return None if node is None else node.name


async def _leader(js, stream: str) -> str:
    return (await js.stream_info(stream)).cluster.leader


async def _move_leaders(nc, js, node: str, consumer: str = "echo", timeout: float = 20) -> None:
    """Make ``node`` the leader of the JOBS stream and of the service's work consumer (JetStream's own
    step-down with a preferred placement), so that the test kills the node it means to."""
    api = {"stream": f"$JS.API.STREAM.LEADER.STEPDOWN.{bus.JOBS}",
           "consumer": f"$JS.API.CONSUMER.LEADER.STEPDOWN.{bus.JOBS}.{consumer}"}
    deadline = time.monotonic() + timeout
    for kind, subject in api.items():
        while True:
            info = await (js.stream_info(bus.JOBS) if kind == "stream" else js.consumer_info(bus.JOBS, consumer))
            if info.cluster.leader == node:
                break
            assert time.monotonic() < deadline, f"{kind} leader stays on {info.cluster.leader}, wanted {node}"
            with contextlib.suppress(Exception):
                await nc.request(subject, json.dumps({"placement": {"preferred": node}}).encode(), timeout=5)
            await asyncio.sleep(0.3)


def test_streams_are_replicated_on_three_nodes(nats_server, settings):
    """ensure_streams through the cluster makes R3 streams, and scales up one made with a single replica."""
    cluster = nats_server

    async def scenario():
        nc = await bus.connect(settings)
        js = nc.jetstream()
        await js.add_stream(bus.stream_configs(1)[2])  # EVENTS as an older single-node set-up left it
        assert (await js.stream_info(bus.EVENTS)).config.num_replicas == 1
        await bus.ensure_streams(js)
        deadline = time.monotonic() + 20  # a scaled-up stream takes a moment to place its new replicas
        while True:
            infos = {name: await js.stream_info(name) for name in (bus.JOBS, bus.RESULTS, bus.EVENTS, bus.DLQ)}
            peers = {name: {i.cluster.leader, *(r.name for r in i.cluster.replicas or [] if r.current)}
                     for name, i in infos.items()}
            if all(p == all_nodes for p in peers.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        await nc.drain()
        return infos, peers

    all_nodes = {n.name for n in cluster.nodes}
    infos, peers = asyncio.run(scenario())
    for name, info in infos.items():
        assert info.config.num_replicas == 3, name
        assert peers[name] == all_nodes, (name, peers[name])


def test_client_connects_past_a_dead_node(nats_server, settings, volume):
    """With the first listed node down, connect() reaches another one; a lone dead URL is refused."""
    cluster = nats_server
    first = cluster.nodes[0]
    first.kill()
    only_dead = Settings(nats_url=first.url, nats_user="admin", nats_password=settings.nats_password, volume=volume)
    dead_first = Settings(nats_url=cluster.url, nats_user="admin", nats_password=settings.nats_password,
                          volume=volume)

    async def where(s, **kw):
        nc = await bus.connect(s, **kw)
        try:
            return nc.connected_url.port
        finally:
            await nc.close()

    port = asyncio.run(where(dead_first, dont_randomize=True))
    assert port in {n.port for n in cluster.nodes[1:]}
    with pytest.raises(Exception):
        asyncio.run(where(only_dead, max_reconnect_attempts=1, connect_timeout=1))


async def _queue_made(js, service: str) -> bool:
    """Whether the worker has made its queue; a JetStream API request that times out (a cluster that has just
    formed, on a loaded host: seen in CI) is asked again rather than failing the wait."""
    try:
        return await bus.queue_status(js, service) is not None
    except nats.errors.TimeoutError:
        return False


@pytest.mark.parametrize("target", ["worker's node, JOBS leader", "JOBS leader, not the worker's node"])
def test_node_sigkilled_mid_run_loses_and_duplicates_nothing(nats_server, settings, workers, volume, target,
                                                            nats_monitor):
    cluster = nats_server
    n_jobs, kill_after = 60, 20
    inputs = _input(volume)
    worker = workers.start("echo", ack_wait_s=4)

    async def scenario():
        nc = await bus.connect(settings, name="producer")
        js = nc.jetstream()
        await bus.ensure_streams(js)
        deadline = time.monotonic() + 60
        while _client_node_name(nats_monitor, cluster) is None or not await _queue_made(js, "echo"):
            assert time.monotonic() < deadline and worker.poll() is None, workers.log_text()[-3000:]
            await asyncio.sleep(0.1)
        worker_node = _client_node_name(nats_monitor, cluster)
        victim = worker_node if target.startswith("worker's") else \
            next(n.name for n in cluster.nodes if n.name != worker_node)
        await _move_leaders(nc, js, victim)

        arrivals: dict[str, float] = {}

        async def on_result(msg):
            r = JobResult.from_bytes(msg.data)
            if r.status == "ok":
                arrivals.setdefault(r.job_id, time.monotonic())

        await nc.subscribe("results.echo.>", cb=on_result)
        published: list[str] = []

        async def produce():  # a steady stream of jobs, before, across and after the kill
            for i in range(n_jobs):
                job = JobRequest(job_id=f"c-{i:03d}", run_id="cluster", service="echo", inputs=inputs,
                                 params={"sleep_s": 0.05, "message": str(i)})
                await bus.publish_job(js, job)
                published.append(job.job_id)
                await asyncio.sleep(0.05)

        producer = asyncio.create_task(produce())
        while len(arrivals) < kill_after:
            assert time.monotonic() < deadline, workers.log_text()[-3000:]
            await asyncio.sleep(0.02)
        assert _client_node_name(nats_monitor, cluster) == worker_node and await _leader(js, bus.JOBS) == victim
        results_before = len(arrivals)
        cluster.node(victim).kill()
        t_kill = time.monotonic()

        survivors = [n for n in cluster.nodes if n.name != victim]

        async def new_leader_elected():  # as the surviving nodes' own /jsz reports tell
            while True:
                for n in survivors:
                    with contextlib.suppress(Exception):
                        if await asyncio.to_thread(nats_monitor.leader, n, bus.JOBS) not in (None, victim):
                            return time.monotonic()
                await asyncio.sleep(0.05)

        election = asyncio.create_task(new_leader_elected())

        # the worker shows up on a surviving node
        t_worker_back = None
        while t_worker_back is None and time.monotonic() - t_kill < 60:
            node = _client_node_name(nats_monitor, cluster)
            if node is not None and node != victim:
                t_worker_back = time.monotonic()
            else:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(producer, 60)
        while len(arrivals) < n_jobs and time.monotonic() - t_kill < 60:
            await asyncio.sleep(0.05)
        times = sorted(arrivals.values())
        before = [t for t in times if t <= t_kill]
        after = [t for t in times if t > t_kill]
        # the longest pause in results from just before the kill on, and the usual spacing before it
        span = before[-1:] + after
        pause = max((b - a for a, b in zip(span, span[1:])), default=float("nan"))
        usual = sorted(b - a for a, b in zip(before, before[1:]))[len(before) // 2 - 1] if len(before) > 2 else 0
        t_elected = await asyncio.wait_for(election, 30)
        new_leader = await _leader(js, bus.JOBS)
        await nc.drain()
        return dict(victim=victim, worker_node=worker_node, t_kill=t_kill, t_worker_back=t_worker_back,
                    first_result_after=after[0] if after else None, published=published, pause=pause, usual=usual,
                    t_elected=t_elected,
                    results_before=results_before, new_leader=new_leader)

    out = asyncio.run(scenario())
    victim = out["victim"]
    assert out["published"] == [f"c-{i:03d}" for i in range(n_jobs)]
    assert out["t_worker_back"] is not None, f"the worker did not reconnect\n{workers.log_text()[-3000:]}"
    assert out["new_leader"] != victim
    assert worker.poll() is None, workers.log_text()[-3000:]  # reconnected, not restarted

    # every job's result is in the RESULTS stream exactly once (read back through the surviving nodes)
    stored = collections.Counter()

    async def read_results():
        nc = await bus.connect(settings)
        js = nc.jetstream()
        async for _seq, _subj, data in bus.iter_stream(js, bus.RESULTS, subject="results.echo.>", limit=10 ** 5):
            r = JobResult.from_bytes(data)
            stored[(r.job_id, r.status)] += 1
        left = (await js.stream_info(bus.JOBS)).state.messages
        await nc.drain()
        return left

    deadline = time.monotonic() + 30
    while True:
        stored.clear()
        jobs_left = asyncio.run(read_results())
        if len(stored) >= n_jobs or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    expected = {(f"c-{i:03d}", "ok") for i in range(n_jobs)}
    assert set(stored) == expected, f"missing {sorted(expected - set(stored))}, extra {sorted(set(stored) - expected)}"
    assert max(stored.values()) == 1, [k for k, v in stored.items() if v > 1]
    assert jobs_left == 0  # the work queue is empty: every job acknowledged

    # each job computed once (a redelivery after a lost ack is answered from the manifest, not recomputed)
    done = collections.Counter()
    for line in workers.log_text().splitlines():
        if line.startswith("{") and '"job computed"' in line:
            done[json.loads(line)["job_id"]] += 1
    assert set(done) == {f"c-{i:03d}" for i in range(n_jobs)} and max(done.values()) == 1, done
    for i in range(n_jobs):
        assert json.loads((volume / f"jobs/echo/c-{i:03d}/echo.json").read_text())["message"] == str(i)

    # the killed node comes back on its own store and catches up with the others
    t0 = time.monotonic()
    node = cluster.restart_node(victim, timeout=60)
    healthy_s = time.monotonic() - t0
    others = [n for n in cluster.nodes if n.name != victim]
    want = nats_monitor.messages(others[0], bus.RESULTS)
    # the rejoined node replays what it missed: the results, and the work queue's acknowledged (deleted) jobs
    while (nats_monitor.messages(node, bus.RESULTS) != want or nats_monitor.messages(node, bus.JOBS) != 0) \
            and time.monotonic() - t0 < 30:
        time.sleep(0.2)
    caught_up_s = time.monotonic() - t0
    assert nats_monitor.messages(node, bus.RESULTS) == want == n_jobs
    assert nats_monitor.messages(node, bus.JOBS) == 0

    print(f"\ncluster, killed {victim} ({target}; worker was on {out['worker_node']}) after "
          f"{out['results_before']} of {n_jobs} results: worker on another node after "
          f"{out['t_worker_back'] - out['t_kill']:.2f} s, first result after the kill at "
          f"{out['first_result_after'] - out['t_kill']:.2f} s, longest pause in results {out['pause']:.2f} s "
          f"(new JOBS leader elected {out['t_elected'] - out['t_kill']:.2f} s after the kill) "
          f"(usually {out['usual']:.2f} s); restarted node healthy in {healthy_s:.2f} s, "
          f"its RESULTS replica complete in {caught_up_s:.2f} s")


def test_container_cluster_conf_is_valid(tmp_path):
    """The compose profile's node configuration passes nats-server's own check, for each of the three nodes."""
    conf = container_nats_cluster_conf()
    local = conf.replace("/data/jetstream", str(tmp_path / "js")).replace("0.0.0.0", "127.0.0.1")
    (tmp_path / "t.conf").write_text(local)
    users = ["admin", *[f"svc-{s}" for s in SERVICES]]
    for name in ("nats", "nats-2", "nats-3"):
        env = {env_var_for(u): "pw" for u in users} | {"NATS_SERVER_NAME": name, "NATS_ROUTE_PASSWORD": "rpw"}
        env |= {f"NATS_ROUTE_{i}": f"nats-route://route:rpw@127.0.0.1:{6222 + i}" for i in (1, 2, 3)}
        out = subprocess.run([nats_server_binary(), "-c", str(tmp_path / "t.conf"), "-t"], capture_output=True,
                             text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr + out.stdout
    assert "$NATS_ROUTE_PASSWORD" in conf and "rpw" not in conf


def test_replicas_can_be_set_by_the_deployment(nats_server, settings, monkeypatch):
    """DIFFRACTFLOW_NATS_REPLICAS overrides the count taken from the cluster's size."""
    monkeypatch.setenv("DIFFRACTFLOW_NATS_REPLICAS", "2")

    async def scenario():
        nc = await bus.connect(settings)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        info = await js.stream_info(bus.RESULTS)
        await nc.drain()
        return info

    info = asyncio.run(scenario())
    assert info.config.num_replicas == 2 and len(info.cluster.replicas or []) == 1


def test_worker_started_without_a_quorum_waits_and_then_serves(nats_server, settings, workers, volume):
    """A worker started while the cluster's JetStream cannot answer (two of three nodes down: no meta leader, so
    API requests time out or are refused) waits for it instead of exiting, and serves once the nodes are back.
    Seen in CI: an echo worker whose subscription request timed out on a cluster that had just formed exited."""
    cluster = nats_server

    async def make_streams():
        nc = await bus.connect(settings)
        try:
            await bus.ensure_streams(nc.jetstream())
        finally:
            await nc.close()

    asyncio.run(make_streams())  # as `up` does, before the workers start
    down = cluster.nodes[1:]
    for n in down:
        n.kill()
    worker = workers.start("echo")
    deadline = time.monotonic() + 60
    while "retrying" not in workers.log_text() and "waiting" not in workers.log_text():
        assert worker.poll() is None, workers.log_text()[-3000:]
        assert time.monotonic() < deadline, workers.log_text()[-3000:]
        time.sleep(0.2)
    time.sleep(3)  # several more tries, each refused or timed out
    assert worker.poll() is None, workers.log_text()[-3000:]
    assert "serving" not in workers.log_text()
    for n in down:  # both back at once, as after an outage (one at a time, the first may wait on the second)
        n.launch()
    cluster.wait_healthy(120, nodes=down)

    from orchestration.tasks import submit_and_wait  # the flows' own submit (imports Prefect: only here)

    async def one_job():
        return await submit_and_wait("echo", _input(volume), {"message": "after quorum"}, run_id="quorum",
                                     job_id="q-1", timeout=90, settings=settings)

    result = asyncio.run(one_job())
    assert result.status == "ok" and worker.poll() is None
    assert "serving" in workers.log_text()
