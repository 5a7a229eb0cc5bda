"""`diffractflow up --cluster` (issue 20, item 3 for the embedded topology): the bus as three supervised
nats-server nodes (R3 streams), workers given every node. A node SIGKILLed: jobs still complete (the worker fails
over), the supervisor restarts the node on its own ports and store and it catches up; `status` shows the nodes;
`down` leaves nothing behind."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from diffractflow import bus
from orchestration.embedded import Topology

BIN = Path(sys.executable).parent


def test_up_cluster_survives_a_node_kill_and_down_leaves_nothing(tmp_path, echo_job, processes_under, nats_monitor):
    home = tmp_path / "home"
    env = dict(os.environ, COLUMNS="200")
    env.pop("DIFFRACTFLOW_NATS_PASSWORD", None)
    up = subprocess.run([BIN / "diffractflow", "up", "--home", home, "--cluster", "--service", "echo",
                         "--replicas", "echo=2", "--no-prefect"], capture_output=True, text=True, timeout=240, env=env)
    topo = Topology(home)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = topo.load()
        nodes = state["nats"]["nodes"]
        assert [n["name"] for n in nodes] == ["n1", "n2", "n3"] and all(n["pid"] for n in nodes)
        assert state["nats"]["url"] == ",".join(n["url"] for n in nodes)
        assert all(s["env"]["DIFFRACTFLOW_NATS_URL"] == state["nats"]["url"] for s in state["services"])
        assert echo_job(topo, "before", timeout=90, retry=True).status == "ok"

        async def replicas():
            nc = await bus.connect(topo.settings())
            try:
                js = nc.jetstream()
                return {s: (await js.stream_info(s)).config.num_replicas for s in (bus.JOBS, bus.RESULTS)}
            finally:
                await nc.drain()

        assert asyncio.run(replicas()) == {bus.JOBS: 3, bus.RESULTS: 3}

        st = subprocess.run([BIN / "diffractflow", "status", "--home", home], capture_output=True, text=True,
                            timeout=120, env=env)
        assert st.returncode == 0, st.stdout + st.stderr
        for n in nodes:
            assert f"nats-{n['name']} {n['url']}" in st.stdout, st.stdout

        # SIGKILL the node a worker is connected to (the worker must move to another node)
        victim = nats_monitor.client_node(nodes, "echo") or nodes[0]
        t0 = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        tries: list[str] = []
        assert echo_job(topo, "after-node-kill", timeout=90, retry=True, tries=tries).status == "ok"
        job_after_kill_s = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while True:
            new = next(n for n in topo.load()["nats"]["nodes"] if n["name"] == victim["name"])
            if new["pid"] and new["pid"] != victim["pid"] and psutil.pid_exists(new["pid"]):
                break
            assert time.monotonic() < deadline, topo.supervisor_log.read_text()[-3000:]
            time.sleep(0.1)
        node_back_s = time.monotonic() - t0
        assert new["restarts"] == 1 and new["port"] == victim["port"] and new["store"] == victim["store"]
        # restarted on its own store, it catches up: the two results are in its replica of RESULTS
        deadline = time.monotonic() + 60
        while True:
            try:
                mine = nats_monitor.stream(new, bus.RESULTS)
            except OSError:
                mine = None
            if mine and mine["state"]["messages"] >= 2:
                break
            assert time.monotonic() < deadline, mine
            time.sleep(0.2)
        assert echo_job(topo, "after-node-back", timeout=90, retry=True).status == "ok"
        events = [json.loads(x) for x in topo.supervisor_log.read_text().splitlines()]
        restarted = [e for e in events if e["event"] == "restarted"]
        assert [e["program"] for e in restarted] == [f"nats-{victim['name']}"]
        st = subprocess.run([BIN / "diffractflow", "status", "--home", home], capture_output=True, text=True,
                            timeout=120, env=env)
        row = next(line for line in st.stdout.splitlines() if f"nats-{victim['name']} " in line)
        assert "signal 9" in row and "│ 1 " in row, st.stdout
        print(f"\nup --cluster: killed node {victim['name']}; next job done {job_after_kill_s:.2f} s after the kill, "
              f"node restarted by the supervisor {restarted[0]['down_s']:.2f} s after its death was noticed (seen here "
              f"{node_back_s:.2f} s after the kill, checked after the job); submissions repeated during the election: {tries}")
    finally:
        down = subprocess.run([BIN / "diffractflow", "down", "--home", home], capture_output=True, text=True,
                              timeout=180, env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "1 restarts" in down.stdout, down.stdout
    assert not topo.state_file.exists()
    assert processes_under(home) == []
