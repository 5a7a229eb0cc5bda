"""Bluesky runs trigger processing: a real RunEngine with an ophyd detector writing files, its documents through
bluesky-nats into a real nats-server (authentication on, a RunEngine user that may only publish documents), the
dispatcher translating them into flow runs of the echo stage.

The first tests feed the RunEngine's documents to the translator directly (no bus) to pin down the mapping; the
last ones go over the bus end to end."""
from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from diffractflow.artifacts import Volume
from orchestration.bluesky import BlueskyTranslator, frame_file_detector


def _sources(tmp_path: Path, n: int = 3) -> list[Path]:
    """n distinct frame files of different sizes (what the detector 'acquires')."""
    out = []
    for i in range(n):
        p = tmp_path / "sources" / f"src{i}.cbf"
        p.parent.mkdir(exist_ok=True, parents=True)
        p.write_bytes(hashlib.sha256(bytes([i])).digest() * (4000 + 1000 * i))
        out.append(p)
    return out


def _run_engine_docs(det, n: int, **md) -> list[tuple[str, dict]]:
    from bluesky import RunEngine
    from bluesky.plans import count

    RE = RunEngine({}, context_managers=[])
    docs: list[tuple[str, dict]] = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(count([det], num=n), **md)
    return docs


def _translate(volume: Path, docs, **kwargs) -> list:
    """Feed documents to a translator as the dispatcher would; return the DataEvents it published, each with the
    size its file had at that moment."""
    published = []

    async def publish(ev):
        published.append((ev, (volume / ev.path).stat().st_size if ev.kind == "file" else None))

    async def main():
        tr = BlueskyTranslator(Volume(volume), publish=publish, **kwargs)
        tasks = [await tr.handle(name, doc) for name, doc in docs]
        await asyncio.gather(*[t for t in tasks if t is not None])
        return tr

    asyncio.run(main())
    return published


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_run_documents_become_file_events_and_an_end_of_run(tmp_path, volume):
    """start -> config.json (expected_stills from num_points), each event's datum -> the file the detector wrote
    for that point, stop -> end of run after the frames; the run record lists them."""
    src = _sources(tmp_path)
    det = frame_file_detector("det", src, volume / "incoming" / "bs1", prefix="still")
    cfg = {"space_group": "P 43 21 2", "unit_cell": [40, 40, 60, 90, 90, 90], "d_min": 2.5}
    docs = _run_engine_docs(det, 3, diffractflow={"run_id": "bs1", "config": cfg})
    pub = _translate(volume, docs, settle_s=0.05)
    kinds = [ev.kind for ev, _ in pub]
    assert kinds == ["file"] * 3 + ["end_of_run"]
    assert {ev.run_id for ev, _ in pub} == {"bs1"}
    # each event names the file holding the frame acquired at that point
    for i, (ev, _size) in enumerate(pub[:3]):
        assert _sha(volume / ev.path) == _sha(src[i])
        assert ev.event_id == f"bs1:{Path(ev.path).name}"
    stored = json.loads((volume / "runs/bs1/config.json").read_text())
    assert stored["unit_cell"] == [40, 40, 60, 90, 90, 90] and stored["d_min"] == 2.5
    assert stored["expected_stills"] == 3 and stored["space_group"] == "P 43 21 2"
    rec = json.loads((volume / "runs/bs1/bluesky.json").read_text())
    assert rec["status"] == "ended" and rec["exit_status"] == "success" and rec["plan_name"] == "count"
    assert rec["frames"] == [ev.path for ev, _ in pub[:3]] and rec["missing"] == []


def test_frames_are_dispatched_only_once_complete(tmp_path, volume):
    """A file writer lagging behind the acquisition (file absent at the event, then written in two halves): each
    frame is published only when whole."""
    src = _sources(tmp_path)
    det = frame_file_detector("det", src, volume / "incoming" / "lag", prefix="f", lag_s=0.25)
    docs = _run_engine_docs(det, 3, diffractflow={"run_id": "lag"})
    assert not all(p.exists() for p in det.written)  # the documents are ahead of the files
    pub = _translate(volume, docs, settle_s=0.5, validate_config=False)
    files = [(ev, size) for ev, size in pub if ev.kind == "file"]
    assert len(files) == 3
    for i, (ev, size) in enumerate(files):
        assert size == src[i].stat().st_size
    assert pub[-1][0].kind == "end_of_run"


def test_runs_without_metadata_are_ignored_and_bad_configs_refused(tmp_path, volume):
    src = _sources(tmp_path, 1)
    det = frame_file_detector("det", src, volume / "incoming" / "x", prefix="f")
    assert _translate(volume, _run_engine_docs(det, 1), settle_s=0.05) == []  # an alignment scan
    assert not (volume / "runs").exists()
    docs = _run_engine_docs(det, 1, diffractflow={"run_id": "bad", "config": {"d_min": -1}})
    assert _translate(volume, docs, settle_s=0.05) == []
    rec = json.loads((volume / "runs/bad/bluesky.json").read_text())
    assert rec["status"] == "refused" and "d_min" in rec["refused"]
    assert not (volume / "runs/bad/config.json").exists()
    docs = _run_engine_docs(det, 1, diffractflow={"run_id": "no/slash"})
    assert _translate(volume, docs, settle_s=0.05) == []


def test_detector_root_mapped_and_files_off_the_volume_reported(tmp_path, volume):
    """A resource root as the detector host names it (/detector/data) maps to this host's path; a frame that
    lands outside the shared volume is reported missing and the run ends without an end-of-run flow."""
    src = _sources(tmp_path, 2)
    det = frame_file_detector("det", src, volume / "incoming" / "mapped", prefix="f", reported_root="/detector/data")
    docs = _run_engine_docs(det, 2, diffractflow={"run_id": "mapped"})
    pub = _translate(volume, docs, settle_s=0.05, validate_config=False,
                     root_map={"/detector/data": str(volume / "incoming" / "mapped")})
    assert [ev.path for ev, _ in pub[:2]] == ["incoming/mapped/f_000000.cbf", "incoming/mapped/f_000001.cbf"]
    assert pub[-1][0].kind == "end_of_run"

    outside = frame_file_detector("det", src, tmp_path / "elsewhere", prefix="f")
    docs = _run_engine_docs(outside, 2, diffractflow={"run_id": "outside"})
    assert _translate(volume, docs, settle_s=0.05, validate_config=False) == []
    rec = json.loads((volume / "runs/outside/bluesky.json").read_text())
    assert rec["status"] == "ended without frames" and len(rec["missing"]) == 2
    assert "volume" in rec["missing"][0]["reason"]


def test_event_and_datum_pages_are_unpacked(tmp_path, volume):
    import event_model

    src = _sources(tmp_path, 2)
    det = frame_file_detector("det", src, volume / "incoming" / "pages", prefix="f")
    docs = _run_engine_docs(det, 2, diffractflow={"run_id": "pages"})
    datums = [d for n, d in docs if n == "datum"]
    events = [d for n, d in docs if n == "event"]
    paged = [(n, d) for n, d in docs if n not in ("datum", "event", "stop")]
    paged += [("datum_page", event_model.pack_datum_page(*datums)), ("event_page", event_model.pack_event_page(*events))]
    paged += [(n, d) for n, d in docs if n == "stop"]
    pub = _translate(volume, paged, settle_s=0.05, validate_config=False)
    assert [ev.kind for ev, _ in pub] == ["file", "file", "end_of_run"]
    assert [_sha(volume / ev.path) for ev, _ in pub[:2]] == [_sha(s) for s in src]


# --------------------------------------------------------------------------------------------- over the bus
def test_runengine_over_nats_runs_the_echo_flow_per_frame(tmp_path, nats_server, volume, settings, bus_env,
                                                          workers, prefect_server):
    """RunEngine -> bluesky-nats (user 'bluesky') -> EVENTS -> dispatcher -> echo flow per frame, then the
    end-of-run handler after every frame's flow. The echo stage hashed the whole file each time."""
    from bluesky import RunEngine
    from bluesky.plans import count

    from diffractflow import bus
    from orchestration.bluesky import connect_publisher
    from orchestration.flows import echo_on_file
    from orchestration.watcher import dispatch

    workers.start("echo")
    src = _sources(tmp_path)
    det = frame_file_detector("det", src, volume / "incoming" / "echo-bs", prefix="still", lag_s=0.2)
    ended, finished_files, results = [], [], {}

    async def on_file(ev):
        results[ev.path] = await echo_on_file(ev)
        finished_files.append(ev.path)
        return results[ev.path]

    async def on_end(ev):
        ended.append((ev.run_id, sorted(finished_files)))

    async def scenario():
        stop = asyncio.Event()
        tr = BlueskyTranslator(Volume(volume), settle_s=0.5, frame_timeout_s=30, validate_config=False)
        disp = asyncio.create_task(dispatch(settings, on_file, on_end, stop, bluesky=tr))
        nc = await bus.connect(settings)
        await bus.ensure_streams(nc.jetstream())
        await nc.drain()

        def acquire():
            pub = connect_publisher(nats_server.url, "bluesky", nats_server.creds.users["bluesky"], source="bl")
            RE = RunEngine({}, context_managers=[])
            RE.subscribe(pub)
            try:
                RE(count([det], num=3), diffractflow={"run_id": "echo-bs"})
            finally:
                assert pub.close()

        await asyncio.to_thread(acquire)
        for _ in range(600):
            if ended:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await disp

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert ended and ended[0][0] == "echo-bs"
    frames = [f"incoming/echo-bs/still_{i:06d}.cbf" for i in range(3)]
    assert ended[0][1] == frames  # every frame's flow finished before the end of the run
    from diffractflow.messages import ArtifactRef

    for i, rel in enumerate(frames):
        echo = json.loads(Volume(volume).open_ref(ArtifactRef(**results[rel]["outputs"]["echo"])).read_text())
        assert echo["inputs"]["data"] == _sha(src[i])  # the whole frame, not the half a lagging writer had
    rec = json.loads((volume / "runs/echo-bs/bluesky.json").read_text())
    assert rec["frames"] == frames and rec["status"] == "ended"


def test_runengine_user_may_only_publish_documents(nats_server, settings):
    """The 'bluesky' user's documents are stored; a job it tries to put on a service's queue is refused, and a
    client without the password cannot connect."""
    import nats

    from diffractflow import bus

    async def quiet(_exc):
        return None

    async def main():
        admin = await bus.connect(settings)
        js_admin = admin.jetstream()
        await bus.ensure_streams(js_admin)
        nc = await nats.connect(nats_server.url, user="bluesky", password=nats_server.creds.users["bluesky"],
                                max_reconnect_attempts=0, error_cb=quiet)
        js = nc.jetstream()
        ack = await js.publish("events.bluesky.bl.start", b"\x80", timeout=2)
        assert ack.stream == bus.EVENTS
        with pytest.raises(Exception):
            await js.publish("jobs.echo", b"{}", timeout=1)
        with pytest.raises(Exception):
            await js.publish("events.file.run", b"{}", timeout=1)
        assert (await js_admin.stream_info(bus.JOBS)).state.messages == 0
        await nc.close()
        with pytest.raises(Exception):
            await nats.connect(nats_server.url, user="bluesky", password="wrong", max_reconnect_attempts=0,
                               allow_reconnect=False, connect_timeout=2, error_cb=quiet)
        await admin.drain()

    asyncio.run(main())
