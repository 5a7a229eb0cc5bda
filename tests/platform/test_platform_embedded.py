"""`diffractflow up` starts the whole embedded topology for real; `down` leaves no process behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from diffractflow.natsserver import SERVICES

BIN = Path(sys.executable).parent


def test_up_status_down_leaves_nothing(tmp_path, processes_under):
    home = tmp_path / "df"
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    up = subprocess.run([BIN / "diffractflow", "up", "--home", home, "--replicas", "stills-processor=2"],
                        capture_output=True, text=True, env=env, timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((home / "state.json").read_text())
        started = {s["service"] for s in state["services"]}
        assert started == set(SERVICES)
        assert sum(s["service"] == "stills-processor" for s in state["services"]) == 2
        # `up` returns once every replica pulls jobs, i.e. after its warm-up (DIALS imports), not when the first
        # replica of each service is ready
        for i in (0, 1):
            assert "warm-up done" in (home / "logs" / f"stills-processor-{i}.log").read_text(), i
        st = subprocess.run([BIN / "diffractflow", "status", "--home", home], capture_output=True, text=True,
                            env=env, timeout=300)
        assert st.returncode == 0, st.stdout + st.stderr
        for s in SERVICES:
            assert s in st.stdout
        assert "dead letters: 0" in st.stdout
        ui = state["prefect"]["api_url"].rsplit("/api", 1)[0]
        assert f"Prefect UI (run history, flow and task runs, logs): {ui}" in " ".join(st.stdout.split())
        import urllib.request

        with urllib.request.urlopen(ui, timeout=60) as r:  # the UI page itself is served there
            assert r.status == 200 and b"<html" in r.read(4096).lower()
        assert st.stdout.count("yes") == len(SERVICES) + 1 + 2  # 7 worker processes, nats-server, prefect
        alive = [p for p in processes_under(home)]
        assert len(alive) >= len(SERVICES) + 2  # services, nats-server, prefect server
    finally:
        down = subprocess.run([BIN / "diffractflow", "down", "--home", home], capture_output=True, text=True,
                              env=env, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert processes_under(home) == []
    assert not (home / "state.json").exists()


def test_up_waits_for_every_replica_to_pull(settings):
    """`up`'s readiness wait counts the replicas pulling from a service's queue, not only that its consumer exists:
    with one of two replicas pulling it times out, with both it returns."""
    import asyncio

    from diffractflow import bus
    from orchestration.embedded import _wait_consumers

    async def puller(stop: asyncio.Event) -> None:  # what a worker does once its warm-up is over
        nc = await bus.connect(settings)
        sub = await bus.work_subscription(nc.jetstream(), "echo", settings)
        while not stop.is_set():
            try:
                await sub.fetch(1, timeout=1.0)
            except (asyncio.TimeoutError, bus.NatsTimeoutError):
                pass
        await nc.close()

    async def scenario():
        nc = await bus.connect(settings)
        await bus.ensure_streams(nc.jetstream())
        await nc.close()
        stop = asyncio.Event()
        first = asyncio.create_task(puller(stop))
        try:
            await _wait_consumers(settings, ["echo"], timeout=10, replicas={"echo": 1})  # one replica: ready
            try:
                await _wait_consumers(settings, ["echo"], timeout=3, replicas={"echo": 2})
                one_of_two = "returned"
            except TimeoutError as exc:
                one_of_two = str(exc)
            second = asyncio.create_task(puller(stop))
            await _wait_consumers(settings, ["echo"], timeout=10, replicas={"echo": 2})
        finally:
            stop.set()
        await asyncio.gather(first, second, return_exceptions=True)
        return one_of_two

    one_of_two = asyncio.run(scenario())
    assert "echo (of 2 replicas)" in one_of_two


def test_prefect_server_runs_without_the_services_the_platform_does_not_use(tmp_path, monkeypatch):
    """Automations and the live event stream read every event the flows emit: off in the embedded server unless
    the environment of `up` turns them on."""
    from orchestration.embedded import PREFECT_SERVER_SERVICES_OFF, prefect_env

    monkeypatch.delenv("PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED", raising=False)
    monkeypatch.delenv("PREFECT_API_EVENTS_STREAM_OUT_ENABLED", raising=False)
    env = prefect_env(tmp_path)
    assert env["PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"] == "false"
    assert env["PREFECT_API_EVENTS_STREAM_OUT_ENABLED"] == "false"
    assert set(PREFECT_SERVER_SERVICES_OFF) == {"PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED",
                                                "PREFECT_API_EVENTS_STREAM_OUT_ENABLED"}
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED", "true")  # a user who wants automations
    assert prefect_env(tmp_path)["PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"] == "true"
    # the names are Prefect's own: its settings read them (a renamed setting would silently stop working)
    from prefect.settings import Settings as PrefectSettings

    monkeypatch.setenv("PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED", "false")
    monkeypatch.setenv("PREFECT_API_EVENTS_STREAM_OUT_ENABLED", "false")
    s = PrefectSettings()
    assert s.server.services.triggers.enabled is False and s.server.events.stream_out_enabled is False
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED", "true")
    monkeypatch.setenv("PREFECT_API_EVENTS_STREAM_OUT_ENABLED", "true")
    s = PrefectSettings()
    assert s.server.services.triggers.enabled is True and s.server.events.stream_out_enabled is True


def test_prefect_server_starts_on_a_migrated_template(tmp_path, monkeypatch, processes_under):
    """A new topology's Prefect server starts on a copy of a database migrated once per machine and Prefect
    version (a fresh database costs ~6 s of migrations while the workers import DIALS); the copy is only made for
    a home without a database, and a missing or unmigrated template leaves the server to migrate its own."""
    import sqlite3
    import urllib.request

    from orchestration import embedded

    monkeypatch.setenv("DIFFRACTFLOW_CACHE", str(tmp_path / "cache"))
    template = embedded.prefect_db_template()
    assert str(template).startswith(str(tmp_path / "cache"))
    assert not embedded.seed_prefect_database(tmp_path / "a" / "prefect.db")  # no template yet: nothing made
    assert not (tmp_path / "a" / "prefect.db").exists()
    template.parent.mkdir(parents=True)
    template.write_bytes(b"not a database")  # an unusable template is neither used nor kept as the template
    assert not embedded.seed_prefect_database(tmp_path / "a" / "prefect.db")

    assert embedded.build_prefect_db_template() == template
    with sqlite3.connect(template) as c:  # Prefect's own migrations made it: its revision and its tables
        assert len(c.execute("select version_num from alembic_version").fetchall()) == 1
        tables = {r[0] for r in c.execute("select name from sqlite_master where type = 'table'")}
    assert {"flow", "flow_run", "task_run", "log"} <= tables
    mtime = template.stat().st_mtime_ns
    assert embedded.build_prefect_db_template() == template and template.stat().st_mtime_ns == mtime  # kept

    existing = tmp_path / "b" / "prefect.db"
    existing.parent.mkdir()
    existing.write_bytes(b"a user's database")
    assert not embedded.seed_prefect_database(existing) and existing.read_bytes() == b"a user's database"

    home = tmp_path / "df"
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    up = subprocess.run([BIN / "diffractflow", "up", "--home", home, "--service", "echo"], capture_output=True,
                        text=True, env=env, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        events = [json.loads(x) for x in (home / "logs" / "supervisor.log").read_text().splitlines()]
        seeded = [e for e in events if e["event"] == "prefect database from template"]
        assert [e["template"] for e in seeded] == [str(template)]
        api = json.loads((home / "state.json").read_text())["prefect"]["api_url"]
        req = urllib.request.Request(api + "/flows/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:  # the server queries its database: none yet
            assert r.status == 200 and json.loads(r.read()) == []
    finally:
        down = subprocess.run([BIN / "diffractflow", "down", "--home", home], capture_output=True, text=True,
                              env=env, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert processes_under(home) == []
