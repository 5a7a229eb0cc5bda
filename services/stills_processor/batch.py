"""Processing many images: a pool of long-lived worker processes that keep DIALS loaded.

``process_unit`` runs in a worker: one still or one sequence through the DIALS workflow, its
DIALS files written, a plain summary row returned (DIALS objects never cross processes). Any
failure of one unit is recorded in its row and the others go on; a worker that dies (e.g. a
segfault in a C++ reader) is replaced and the units it held are retried once.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from .artifacts import empty_record, write_summary, write_unit_files
from .core.params import ProcessingSettings
from .core.pipeline import ERROR, FAILED, UnreadableImage, process_sequence, process_still
from .core.routing import SEQUENCE, STILL, UNREADABLE, WorkUnit, plan

log = logging.getLogger("stills_processor.batch")


def warm_up() -> None:
    """Import DIALS once per process (a few seconds), so no image pays for it (the forkserver runs it through
    ``_preload.py`` before it forks the pool's workers; elsewhere DIALS is imported where it is used)."""
    # DIALS (a few seconds) here on purpose: the point is to pay for it once, at the worker's start
    import dials.algorithms.indexing.indexer  # noqa: F401
    import dials.algorithms.integration.integrator  # noqa: F401
    import dials.algorithms.refinement  # noqa: F401
    import dials.command_line.index  # noqa: F401
    import dials.command_line.integrate  # noqa: F401
    import dials.command_line.refine  # noqa: F401
    import dials.command_line.stills_process  # noqa: F401
    from dials.array_family import flex  # noqa: F401

    logging.getLogger("dials").setLevel(logging.WARNING)


def process_unit(unit: WorkUnit, out_dir: str, settings: ProcessingSettings) -> dict[str, Any]:
    """Process one unit and write its files; returns its summary row (never raises).

    DIALS' stray ``print`` output is swallowed (results come from its objects, not its text).
    """
    c0 = time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        rec = _process_unit(unit, out_dir, settings)
    rec["cpu_seconds"] = time.process_time() - c0
    return rec


def _process_unit(unit: WorkUnit, out_dir: str, settings: ProcessingSettings) -> dict[str, Any]:
    t0 = time.perf_counter()
    rec = empty_record()
    rec.update(name=unit.name, kind=unit.kind, input_path=unit.paths[0], input_files=json.dumps(list(unit.paths)),
               frame=unit.frame)
    try:
        if unit.kind == UNREADABLE:
            raise UnreadableImage(unit.error)
        if unit.kind == STILL:
            out = process_still(unit.paths[0], unit.frame, settings)
        elif unit.kind == SEQUENCE:
            out = process_sequence(list(unit.paths), settings)
        else:
            raise ValueError(f"unknown unit kind {unit.kind!r}")
    except UnreadableImage as exc:
        rec.update(status=ERROR, reason=str(exc), seconds=time.perf_counter() - t0)
        return rec
    except Exception as exc:  # a DIALS failure outside the guarded steps: report, do not stop the batch
        log.exception("unexpected failure on %s", unit.paths[0])
        rec.update(status=FAILED, reason=f"unexpected {type(exc).__name__}: {exc}"[:500],
                   seconds=time.perf_counter() - t0)
        return rec

    rec.update(status=out.status, reason=out.reason, n_spots=out.n_spots, n_indexed=out.n_indexed,
               n_refined=out.n_refined, n_integrated=out.n_integrated, space_group=out.space_group,
               rmsd_x_px=out.rmsd_x_px, rmsd_y_px=out.rmsd_y_px, rmsd_z=out.rmsd_z,
               strategy=out.strategy if out.status == "indexed" else "", attempts=json.dumps(out.attempts))
    if out.unit_cell is not None:
        crystal = out.experiments[0].crystal
        rec["unit_cell"] = list(out.unit_cell)
        rec["A_matrix"] = out.A_matrix.tolist()
        rec["U_matrix"] = [list(crystal.get_U()[i * 3 : i * 3 + 3]) for i in range(3)]
        rec["B_matrix"] = [list(crystal.get_B()[i * 3 : i * 3 + 3]) for i in range(3)]
    v = out.validation
    if v is not None:
        rec.update(validation_passed=v.passed, validation_n=v.n, q_median_error=v.q_median, q_max_error=v.q_max,
                   q_rel_median_error=v.q_rel_median, px_median_error=v.px_median, px_p90_error=v.px_p90,
                   mm_median_error=v.mm_median)
    if out.indexed is not None:  # indexed (maybe not integrated): keep the model for inspection
        try:
            rec.update(write_unit_files(Path(out_dir), unit.name, out.experiments, out.integrated, out.indexed))
        except Exception as exc:
            rec.update(status=FAILED, reason=f"cannot write outputs to {out_dir}: {type(exc).__name__}: {exc}"[:500])
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _worker_init() -> None:
    warm_up()


_POOLS: dict[int, ProcessPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def get_pool(nproc: int, persistent: bool = True) -> ProcessPoolExecutor:
    """A pool of ``nproc`` DIALS-loaded processes (forkserver: no threads inherited; the server
    imports DIALS once and forks the workers from it)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["stills_processor._preload"])
    if not persistent:
        return ProcessPoolExecutor(max_workers=nproc, mp_context=ctx, initializer=_worker_init)
    with _POOL_LOCK:
        pool = _POOLS.get(nproc)
        if pool is None or getattr(pool, "_broken", False):
            pool = ProcessPoolExecutor(max_workers=nproc, mp_context=ctx, initializer=_worker_init)
            _POOLS[nproc] = pool
        return pool


def shutdown_pools() -> None:
    with _POOL_LOCK:
        for pool in _POOLS.values():
            pool.shutdown(wait=True, cancel_futures=True)
        _POOLS.clear()


def run_units(
    units: Sequence[WorkUnit],
    out_dir: str | Path,
    settings: ProcessingSettings,
    nproc: int = 1,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
    persistent_pool: bool = False,
) -> list[dict[str, Any]]:
    """Process all units (in-process when ``nproc == 1``); rows come back in input order."""
    out_dir = str(Path(out_dir).resolve())
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any] | None] = [None] * len(units)
    if nproc <= 1 or len(units) <= 1:
        warm_up()
        for i, u in enumerate(units):
            rows[i] = process_unit(u, out_dir, settings)
            if on_done:
                on_done(i, rows[i])
        return rows  # type: ignore[return-value]

    crashes = [0] * len(units)
    todo = list(range(len(units)))
    while todo:
        pool = get_pool(nproc) if persistent_pool else get_pool(nproc, persistent=False)
        futures = {pool.submit(process_unit, units[i], out_dir, settings): i for i in todo}
        todo = []
        pending = set(futures)
        broken = False
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = futures[fut]
                try:
                    rows[i] = fut.result()
                except BrokenProcessPool:
                    broken = True
                    crashes[i] += 1
                    if crashes[i] >= 2:
                        rows[i] = _error_row(units[i], f"{units[i].paths[0]}: the worker process died while processing it")
                    else:
                        todo.append(i)
                        continue
                except Exception as exc:  # e.g. a result that cannot be unpickled
                    rows[i] = _error_row(units[i], f"{units[i].paths[0]}: {type(exc).__name__}: {exc}")
                if on_done:
                    on_done(i, rows[i])
        if not persistent_pool or broken:
            pool.shutdown(wait=True, cancel_futures=True)
            if broken:
                with _POOL_LOCK:
                    if _POOLS.get(nproc) is pool:
                        del _POOLS[nproc]
    return rows  # type: ignore[return-value]


def _error_row(unit: WorkUnit, reason: str) -> dict[str, Any]:
    rec = empty_record()
    rec.update(name=unit.name, kind=unit.kind, input_path=unit.paths[0], input_files=json.dumps(list(unit.paths)),
               frame=unit.frame, status="error", reason=reason[:500])
    return rec


def summarise(rows: Sequence[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Small JSON-able figures of a batch."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("indexed", "non_hit", "failed", "error")}
    n_still = sum(r["kind"] == "still" for r in rows)
    by_strategy: dict[str, int] = {}
    for r in rows:
        if r["status"] == "indexed" and r.get("strategy"):
            by_strategy[r["strategy"]] = by_strategy.get(r["strategy"], 0) + 1
    return {
        "n_indexed_by_strategy": by_strategy,
        "n_fallback": sum(n for k, n in by_strategy.items() if k != "default"),
        "n_units": len(rows),
        **{f"n_{k}": v for k, v in counts.items()},
        "n_validation_passed": sum(bool(r["validation_passed"]) for r in rows),
        "wall_s": round(wall_s, 3),
        "stills_per_min": round(60.0 * n_still / wall_s, 3) if wall_s > 0 and n_still else math.nan,
    }


def settings_dict(settings: ProcessingSettings) -> dict[str, Any]:
    d = asdict(settings)
    d["phil"] = list(settings.phil)
    return d


def default_nproc() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def run_job(
    images: Sequence[str | Path],
    out_dir: str | Path,
    settings: ProcessingSettings,
    nproc: int = 1,
    on_planned: Callable[[list[WorkUnit]], None] | None = None,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
    persistent_pool: bool = False,
    job_id: str | None = None,
    input_hashes: dict[str, str] | None = None,
    units: Sequence[WorkUnit] | None = None,
) -> tuple[list[dict[str, Any]], Path, dict[str, Any]]:
    """Route, process and summarise a set of images: (rows, summary.h5 path, metrics).

    ``units``: work units already planned from ``images`` (routing is then skipped)."""
    t0 = time.perf_counter()
    units = list(units) if units is not None else plan(images)
    if on_planned:
        on_planned(units)
    rows = run_units(units, out_dir, settings, nproc=nproc, on_done=on_done, persistent_pool=persistent_pool)
    wall = time.perf_counter() - t0
    metrics = summarise(rows, wall)
    summary = write_summary(Path(out_dir) / "summary.h5", rows, parameters={**settings_dict(settings), "nproc": nproc},
                            inputs=input_hashes, job_id=job_id,
                            tolerances={"q_tolerance": settings.q_tolerance, "px_tolerance": settings.px_tolerance,
                                        "min_spots": settings.min_spots})
    return rows, summary, metrics
