"""`diffractflow process diffuse`: a whole run of files already on disk, through the live path.

Nothing here processes data itself. The files are landed (hard-linked, or copied when the directory is on
another filesystem) into the volume's incoming directory, and the same watcher, dispatcher, Prefect flows and
services that handle live data do the rest; so a re-processing on a workstation and a live run at the beamline
give the same answer. Background-only frames (``--background``) are turned into one smoothed background by the
diffuse-extractor before the first still is landed, and every extraction of the run subtracts it.

The embedded topology is started for the run and stopped after it, unless one is already up in ``home``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from diffractflow.artifacts import Volume, atomic_write_json
from diffractflow.report_page import warm_up_figures

from .embedded import Topology
from .progress import RunProgress, logs_to_file
from .report import locate, predraw_still_figures, write_report
from .watcher import WatchRule, dispatch, watch

#: the services a diffuse run needs, and replicas on a small workstation (DIALS indexing is the slow stage)
DIFFUSE_SERVICES = ["stills-processor", "diffuse-extractor", "voxel-merger", "scaler"]
DIFFUSE_REPLICAS = {"stills-processor": 2, "diffuse-extractor": 1}


#: seconds into a run before the command pays the run page's one-time costs (:func:`warm_up_report`): by then the
#: first stills are in the workers' hands, so the warm-up does not delay the first flow runs
REPORT_WARM_UP_DELAY_S = 5.0


class ProcessError(RuntimeError):
    """The run cannot start (no files, unreadable configuration); the message names the problem."""


def select_files(directory: Path, pattern: str, exclude: Iterable[Path] = ()) -> list[Path]:
    """Regular files of ``directory`` matching ``pattern`` (sorted), without hidden files and ``exclude``."""
    skip = {Path(p).resolve() for p in exclude}
    return sorted(p for p in directory.glob(pattern)
                  if p.is_file() and not p.name.startswith(".") and p.resolve() not in skip)


def land(src: Path, dest_dir: Path) -> Path:
    """Put ``src`` into ``dest_dir`` atomically (a hard link when possible, else a copy), as a detector would."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / src.name
    if final.exists():
        return final
    tmp = dest_dir / f".{src.name}.part"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    tmp.rename(final)
    return final


@contextlib.contextmanager
def topology_for_run(home: Path, volume: Path | None, console, services: Sequence[str] = DIFFUSE_SERVICES,
                     replicas: dict[str, int] | None = None):
    """The running topology in ``home`` if one is up, else a new one that is stopped on exit."""
    topo = Topology(home)
    if topo.load():
        console.print(f"using the topology already up in {home}")
        topo.apply_env()
        yield topo
        return
    topo.up(list(services), dict(DIFFUSE_REPLICAS if replicas is None else replicas), volume=volume, prefect=True,
            log=console.print)
    try:
        topo.apply_env()
        yield topo
    finally:
        topo.down(log=console.print)


def warm_up_report() -> None:
    """Pay the run page's one-time costs (matplotlib's first figure, the readers of the run's files: ~0.5 CPU-s)
    while the run is going and the command only waits, instead of after the run's last stage, where nothing
    overlaps them."""
    from diffractflow.formats import merged_map, scales, still_table  # noqa: F401 - imported for their one-time cost

    warm_up_figures()


async def prepare_report(rdir: Path, n_stills: int, delay_s: float = REPORT_WARM_UP_DELAY_S,
                         poll_s: float = 0.5) -> bool:
    """The run page's head start, while the command only waits: its one-time costs (:func:`warm_up_report`)
    ``delay_s`` into the run; then, once every still has its record (the end-of-run merge and scaling are running,
    on one core), the figures drawn from the per-still records. Returns whether those were drawn."""
    await asyncio.sleep(delay_s)
    try:
        await asyncio.to_thread(warm_up_report)
        while sum(1 for _ in (rdir / "stills").glob("*.json")) < n_stills:
            await asyncio.sleep(poll_s)
        await asyncio.to_thread(predraw_still_figures, locate(rdir))
        return True
    except Exception:  # noqa: BLE001 - only a head start: the page is written (or its failure reported) at the end
        return False


def flows_in_flight(state: dict) -> int:
    """How many still flows ``process`` runs at once: enough that every stills-processor replica always finds its
    next job queued (a flow also holds its slot through extraction and accumulation, and a new flow run takes
    ~1 s to start on a loaded machine), at least the dispatcher's default of 8; bounded, so a queued job
    never waits long enough to reach its stage timeout."""
    n_index = sum(1 for s in state.get("services", []) if s.get("service") == "stills-processor")
    return max(8, 4 * n_index)


async def feed_and_dispatch(topo: Topology, incoming: Path, run_id: str, files: Sequence[Path], console,
                            pattern: str = "*.cbf", interval_s: float = 0.0, timeout_s: float = 6 * 3600,
                            verbose: bool = False, generation: int = 0) -> None:
    """Land ``files`` in ``incoming`` one by one while a watcher and a dispatcher (in this process) turn them into
    flow runs; return once the end-of-run flow has finished. Unless ``verbose``, one progress display
    (:class:`orchestration.progress.RunProgress`) shows the run instead of a line per file."""
    # flows and diffuse import prefect (~1 s): only when a run is processed, not for the CLI's --help
    from .flows import FLOWS

    settings = topo.settings()
    stop = asyncio.Event()
    on_file, on_end = FLOWS["diffuse-pipeline"]
    done = asyncio.Event()

    async def on_end_and_signal(ev):
        try:
            return await on_end(ev)
        finally:
            done.set()

    # files are landed by an atomic rename (`land`), complete when they appear: no settling time beyond one poll
    rule = WatchRule(incoming, run_id, pattern=pattern, settle_s=0.0, expected=len(files), quiet_timeout_s=3600,
                     generation=generation)
    disp = asyncio.create_task(dispatch(settings, on_file, on_end_and_signal, stop,
                                        max_concurrent=flows_in_flight(topo.load() or {})))
    watcher = asyncio.create_task(watch(rule, settings, stop, poll_s=0.25))
    # diffuse is loaded with the flows above
    from .diffuse import run_dir

    warm = asyncio.create_task(prepare_report(run_dir(Volume(settings.volume), run_id), len(files)))
    prog = shown = None
    if not verbose:
        prog = RunProgress(console, settings.volume, run_id, len(files))
        shown = asyncio.create_task(prog.run())
    for i, f in enumerate(files):
        land(f, incoming)
        if prog is not None:
            prog.landed = i + 1
        else:
            console.print(f"  landed {f.name} ({i + 1}/{len(files)})")
        if interval_s:
            await asyncio.sleep(interval_s)
    await watcher
    try:
        await asyncio.wait_for(done.wait(), timeout=timeout_s)
    finally:
        stop.set()
        warm.cancel()
        await disp
        if prog is not None:
            prog.stop()
            await shown


def load_run_config(path: Path | None, **overrides):
    """A ``DiffuseRunConfig`` from a YAML/JSON file (or defaults) with ``overrides`` applied."""
    # diffuse imports prefect (see feed_and_dispatch)
    from .diffuse import DiffuseRunConfig

    data = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ProcessError(f"{path}: cannot read the run configuration ({exc})") from exc
        if not isinstance(data, dict):
            raise ProcessError(f"{path}: the run configuration must be a mapping, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return DiffuseRunConfig.model_validate(data)
    except Exception as exc:
        raise ProcessError(f"{path or 'run configuration'}: {exc}") from exc


RERUN_RECORD = "reruns.json"


def start_rerun(rdir: Path, incoming: Path) -> int:
    """Prepare a finished run to be processed again; returns its new generation number.

    The run's records (per-still records, sweep models, the background record) and its landed files are removed so
    the run goes through the flows again (the run's beamstop record is kept: a property of its data, found
    once); its previous output is kept as ``previous-output``. The
    job directories stay: jobs are content-addressed, so every stage whose service, parameters and inputs are
    unchanged finds its finished job and reuses it, and a changed configuration makes new jobs."""
    record = rdir / RERUN_RECORD
    generation = (json.loads(record.read_text())["generation"] if record.exists() else 0) + 1
    prev = rdir / "previous-output"
    shutil.rmtree(prev, ignore_errors=True)
    (rdir / "output").rename(prev)
    for name in ("stills", "sweeps"):
        shutil.rmtree(rdir / name, ignore_errors=True)
    (rdir / "background.json").unlink(missing_ok=True)
    if incoming.is_dir():
        for p in incoming.iterdir():
            if p.is_file():
                p.unlink()
    atomic_write_json(record, {"generation": generation})
    return generation


def still_status(rdir: Path) -> list[dict]:
    """Per-still records of a run (image, status, reason, strategy, seconds per stage)."""
    rows = []
    for p in sorted((rdir / "stills").glob("*.json")):
        rec = json.loads(p.read_text())
        rows.append({k: rec.get(k) for k in ("image", "status", "reason", "strategy", "n_spots", "n_indexed",
                                             "seconds", "stage_seconds") if k in rec})
    return rows


def stage_seconds(rdir: Path, run_summary: dict) -> dict:
    """Mean seconds per still of each per-still stage, plus the end-of-run stages."""
    per_still: dict[str, list[float]] = {}
    for p in (rdir / "stills").glob("*.json"):
        for k, v in json.loads(p.read_text()).get("stage_seconds", {}).items():
            per_still.setdefault(k, []).append(v)
    out = {f"{k}_per_still_mean": round(sum(v) / len(v), 2) for k, v in per_still.items() if v}
    out.update(run_summary.get("stage_seconds", {}))
    return out


def _by_shell(table: dict, key: str) -> list[dict]:
    """[{d_max, d_min (Angstrom), value, n_voxels}] from a per-shell statistics table of the voxel-merger."""
    d = table.get("d_edges") or []
    return [{"d_max": d[i], "d_min": d[i + 1], key: v, "n_voxels": n}
            for i, (v, n) in enumerate(zip(table.get(key) or [], table.get("n_voxels") or []))]


def run_summary_for_user(rdir: Path, wall_seconds: float) -> dict:
    """The summary a user reads first: counts, CC½, background, per-still status, where the outputs are."""
    out = rdir / "output"
    run_summary = json.loads((out / "run_summary.json").read_text())
    stats = json.loads((out / "stats.json").read_text()) if (out / "stats.json").exists() else {}
    cc_half = (stats.get("cc_half") or {}).get("overall")
    sym = stats.get("symmetry_agreement") or {}
    return {
        "run_id": run_summary.get("run_id"),
        "stills_total": run_summary["stills_total"],
        "stills_processed": run_summary["stills_processed"],
        "stills_failed": run_summary["stills_failed"],
        "cc_half_overall": cc_half,
        "background": run_summary.get("background", {"method": "none"}),
        "cc_half_by_shell": _by_shell(stats.get("cc_half") or {}, "cc_half"),
        "symmetry_agreement_overall": sym.get("overall"),
        "symmetry_agreement_by_shell": _by_shell(sym, "cc"),
        "wall_seconds": round(wall_seconds, 1),
        "stage_seconds": stage_seconds(rdir, run_summary),
        "failed": run_summary.get("failed", {}),
        "stills": still_status(rdir),
        "outputs": str(out),
    }


def copy_results(src: Path, dest: Path) -> list[str]:
    """Copy a run's output directory (merged NeXus map, figures, scales, statistics) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for p in sorted(src.iterdir()):
        if p.is_file():
            shutil.copy2(p, dest / p.name)
            names.append(p.name)
    return names


def process_diffuse(directory: Path, out: Path, console, *, config: Path | None = None, pattern: str = "*.cbf",
                    background: str | None = None, run_id: str | None = None, home: Path | None = None,
                    volume: Path | None = None, replicas: dict[str, int] | None = None,
                    config_overrides: dict | None = None, verbose: bool = False, rerun: bool = False) -> dict:
    """Process every still of ``directory`` (``pattern``) as one diffuse run; results and summary.json in ``out``.

    ``background``: a glob (relative to ``directory``) of background-only frames. Returns the summary.
    """
    # diffuse imports prefect (see feed_and_dispatch)
    from .diffuse import run_dir

    directory = Path(directory).resolve()
    out = Path(out).resolve()
    if not directory.is_dir():
        raise ProcessError(f"{directory} is not a directory")
    bkg_files = select_files(directory, background) if background else []
    if background and not bkg_files:
        raise ProcessError(f"no background frame matches {background!r} in {directory}")
    files = select_files(directory, pattern, exclude=bkg_files)
    if not files:
        raise ProcessError(f"no file matches {pattern!r} in {directory}")
    cfg = load_run_config(config, **(config_overrides or {}))
    # the command writes the run's page into `out` itself (with the user summary): the flow's copy would be a second
    # rendering at the end of the run (~0.9 s there, on the critical path)
    cfg = cfg.model_copy(update={"expected_stills": len(files), "run_report": False})
    run_id = run_id or directory.name
    out.mkdir(parents=True, exist_ok=True)
    home = Path(home).resolve() if home else out / ".diffractflow"
    t0 = time.monotonic()
    console.print(f"{len(files)} stills" + (f" and {len(bkg_files)} background frames" if bkg_files else "")
                  + f" from {directory} as run {run_id!r}")
    with topology_for_run(home, volume, console, replicas=replicas) as topo:
        vol = Volume(topo.settings().volume)
        rdir = run_dir(vol, run_id)
        incoming = vol.resolve(f"incoming/{run_id}")
        generation = 0
        if (rdir / "output" / "run_summary.json").exists():
            if not rerun:
                raise ProcessError(f"run {run_id!r} already has results in {rdir}; choose another --run-id, or "
                                   f"--rerun to process it again (unchanged work is reused)")
            generation = start_rerun(rdir, incoming)
            console.print(f"re-processing run {run_id!r} (generation {generation}): jobs whose service, parameters "
                          f"and inputs are unchanged are reused")
        incoming.mkdir(parents=True, exist_ok=True)
        if bkg_files:
            landed = [land(f, incoming / "background") for f in bkg_files]
            cfg = cfg.model_copy(update={"background_frames": [vol.relative(p) for p in landed]})
        atomic_write_json(rdir / "config.json", cfg.model_dump())

        topo.wait_prefect()
        with topo.prefect_settings(), logs_to_file(home / "logs" / f"flows-{run_id}.log", verbose) as log_file:
            if log_file is not None:
                console.print(f"flow logs: {log_file} (-v shows them live); worker logs: {home / 'logs'}")
            if bkg_files:
                # diffuse imports prefect (see feed_and_dispatch)
                from .diffuse import diffuse_background_flow

                console.print(f"background: {len(bkg_files)} frames -> one smoothed background")
                asyncio.run(diffuse_background_flow(run_id))
            asyncio.run(feed_and_dispatch(topo, incoming, run_id, files, console, pattern=pattern, verbose=verbose,
                                          generation=generation))
        if not (rdir / "output" / "run_summary.json").exists():
            raise ProcessError(f"run {run_id!r} produced no merged output; per-still records in {rdir / 'stills'}")
        summary = run_summary_for_user(rdir, time.monotonic() - t0)
        summary["outputs"] = str(out)
        summary["files"] = copy_results(rdir / "output", out)
    atomic_write_json(out / "summary.json", summary)
    try:  # the run's page for a browser; a failure here must not lose the run's results
        summary["report"] = str(write_report(out, home=home))  # home: the run's records and tables are linked
        console.print(f"report: {summary['report']}")
    except Exception as exc:  # noqa: BLE001
        console.print(f"[yellow]report not written: {exc}[/yellow]")
    return summary
