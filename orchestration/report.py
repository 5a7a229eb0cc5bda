"""A run's report: one self-contained HTML page next to its outputs, and a live view while it collects.

``write_report(run)`` writes ``report.html`` (figures embedded as base64 PNG drawn with matplotlib, no external
JS/CSS, links to the NeXus/HDF5/JSON files relative to the page) for

- a diffuse run directory on the volume (``runs/<run_id>/``: ``config.json``, ``stills/<stem>.json`` per still,
  ``output/`` once merged): configuration, versions, timings per stage, per-still status with reasons, the merged
  map's h=0/k=0/l=0 slices, radial profile, CC½ and symmetry agreement by resolution shell, per-still scales and
  background profiles, links to the files. While the run is collecting (no ``output/run_summary.json`` yet) the
  slices are computed from the voxel-merger's per-still partial accumulators: the sums of every still accumulated
  so far, symmetry-merged like the final map but unscaled and without outlier rejection;
- the output directory of ``diffractflow process diffuse`` (``summary.json`` and the copied outputs; the per-still
  records and tables are taken from the run's volume when it is found beside it);
- a stem-polar job directory (``logs/run.json``; the page of :func:`diffractflow.report_page.job_page`, which the
  stem-polar worker and CLI write themselves) or a stem-polar demo directory (``result/logs/run.json``).

The page pieces (HTML skeleton, tables, embedded figures, link checks, versions) are the platform's
(:mod:`diffractflow.report_page`); this module holds what is particular to diffuse runs.

``serve_report`` serves the page on localhost and regenerates it on each request when any input changed (cached
by modification time; a partial accumulator is read once), with an auto-refresh while the run collects. Only the
page and the files it links to are served.
"""
from __future__ import annotations

import functools
import json
import os
import threading
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence  # Optional: the CLI's annotations

import numpy as np
import typer

from diffractflow.artifacts import atomic_write_path
from diffractflow.errors import InputError
from diffractflow.report_page import (REPORT_NAME, Linker as _Linker, Page, check_links, esc as _esc,  # noqa: F401
                                      figure as _figure, fmt as _fmt, img as _img, img_file, job_page,
                                      kv_table as _kv_table, png_b64 as _png_b64, render_html, table as _table,
                                      write_page)
from diffractflow.report_page import software_versions as _platform_versions

from .embedded import default_home

#: seconds between refreshes of the served page while a run is collecting
REFRESH_S = 10.0


class ReportError(ValueError):
    """The target is not a run this module can report on (the message names the path or id)."""


# ============================================================================ locating a run
@dataclass
class RunLayout:
    """Where a run's pieces are. ``kind``: "diffuse" or "stem"."""

    kind: str
    page_dir: Path                 # report.html goes here; links are relative to it
    run_dir: Path | None = None    # volume's runs/<run_id> (config.json, stills/); None if not found
    output_dir: Path | None = None  # merged outputs (map.h5, stats.json, scales.json, run_summary/summary.json)
    volume: Path | None = None     # volume root (per-still references are relative to it)

    @property
    def page(self) -> Path:
        return self.page_dir / REPORT_NAME


def _volumes_of_home(home: Path) -> list[Path]:
    out = []
    state = home / "state.json"
    if state.is_file():
        try:
            out.append(Path(json.loads(state.read_text())["volume"]))
        except (ValueError, KeyError, OSError):
            pass
    out.append(home / "volume")
    return out


def _run_in_homes(run_id: str, homes: Iterable[Path]) -> Path | None:
    for home in homes:
        for vol in _volumes_of_home(Path(home)):
            d = vol / "runs" / run_id
            if d.is_dir():
                return d
    return None


def _volume_of_run_dir(run_dir: Path) -> Path | None:
    return run_dir.parent.parent if run_dir.parent.name == "runs" else None


def locate(target: str | os.PathLike, home: str | os.PathLike | None = None) -> RunLayout:
    """The run behind ``target``: a volume run directory, a ``process diffuse`` or demo output directory, a
    stem-polar job directory, or a run id looked up in ``home`` (default ``$DIFFRACTFLOW_HOME`` or ./.diffractflow)."""
    p = Path(target).expanduser()
    if p.is_dir():
        p = p.resolve()
        for job in (p, p / "result"):  # a stem-polar job, or a stem-polar demo directory
            if (job / "logs" / "run.json").is_file():
                return RunLayout("stem", page_dir=job, output_dir=job)
        if (p / "stills").is_dir() or (p / "config.json").is_file():
            return RunLayout("diffuse", page_dir=p, run_dir=p, output_dir=p / "output", volume=_volume_of_run_dir(p))
        if not (p / "summary.json").is_file() and (p / "result" / "summary.json").is_file():
            p = p / "result"  # a `diffractflow demo diffuse` directory
        if (p / "summary.json").is_file():
            try:
                run_id = json.loads((p / "summary.json").read_text()).get("run_id")
            except (OSError, ValueError) as exc:
                raise ReportError(f"{p / 'summary.json'}: unreadable ({exc})") from exc
            homes = [p / ".diffractflow", p.parent / ".diffractflow"] + ([Path(home)] if home else [])
            rdir = _run_in_homes(str(run_id), homes) if run_id else None
            return RunLayout("diffuse", page_dir=p, run_dir=rdir, output_dir=p,
                             volume=_volume_of_run_dir(rdir) if rdir else None)
        # a `process diffuse --out` or demo directory while its run is still collecting: the run in its topology
        runs = sorted({d.resolve() for v in _volumes_of_home(p / ".diffractflow") if (v / "runs").is_dir()
                       for d in (v / "runs").iterdir() if d.is_dir()})
        if len(runs) == 1:
            return locate(runs[0])
        if runs:
            raise ReportError(f"{p}: {len(runs)} runs in {p / '.diffractflow'} ({', '.join(r.name for r in runs)}); "
                              f"name one: report RUN_ID --home {p / '.diffractflow'}")
        raise ReportError(f"{p}: not a run directory (no stills/ or config.json), process output (summary.json) "
                          f"or stem-polar job (logs/run.json)")

    h = Path(home).resolve() if home else default_home()
    rdir = _run_in_homes(str(target), [h])
    if rdir is None:
        raise ReportError(f"{target}: no such directory, and no run of that id under {h} "
                          f"(looked in {', '.join(str(v / 'runs') for v in _volumes_of_home(h))})")
    return RunLayout("diffuse", page_dir=rdir, run_dir=rdir, output_dir=rdir / "output",
                     volume=_volume_of_run_dir(rdir))


# ============================================================================ small helpers
def _read_json(path: Path | None, default=None):
    if path is None or not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default  # being replaced (atomic writes make this rare) or broken: the next refresh retries


@functools.lru_cache(maxsize=1)
def software_versions() -> dict[str, str]:
    """Versions of the platform and the scientific stack a diffuse run's report was made with."""
    out = dict(_platform_versions(("diffractflow", "numpy", "h5py", "dxtbx", "prefect", "nats-py", "torch",
                                   "matplotlib")))
    try:  # Debian's DIALS carries no reliable distribution metadata: ask DIALS itself
        from dials.util.version import dials_version

        out["dials"] = dials_version().replace("DIALS ", "")
    except Exception:  # pragma: no cover - DIALS is part of the platform
        pass
    return out


# ============================================================================ live map from partial sums
_PARTIAL_CACHE: dict[tuple, np.ndarray] = {}
_MAPPER_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


@dataclass
class LiveMap:
    """Merged h=0/k=0/l=0 planes from the partial accumulators of the stills accumulated so far."""

    grid: Any                      # voxel_merger GlobalGrid
    planes: dict[int, np.ndarray]  # axis -> mean intensity plane (NaN = no data)
    counts: dict[int, np.ndarray]  # axis -> observations per voxel
    n_partials: int
    symmetry: str | None


def _plane_ids(grid) -> dict[int, np.ndarray]:
    """Flat voxel ids of the h=0, k=0, l=0 planes (axes present in the grid)."""
    nh, nk, nl = grid.shape
    i, j, m = np.arange(nh), np.arange(nk), np.arange(nl)
    out = {}
    zero = [-lo for lo in grid.lo]
    if 0 <= zero[0] < nh:
        out[0] = (zero[0] * nk + j[:, None]) * nl + m[None, :]
    if 0 <= zero[1] < nk:
        out[1] = (i[:, None] * nk + zero[1]) * nl + m[None, :]
    if 0 <= zero[2] < nl:
        out[2] = (i[:, None] * nk + j[None, :]) * nl + zero[2]
    return out


def _asu_ids(grid, symmetry: str | None, ids: np.ndarray) -> np.ndarray:
    """Voxel ids -> their asymmetric-unit voxel (the voxel-merger's own mapper), identity without symmetry."""
    if not symmetry:
        return np.asarray(ids, dtype=np.int64)
    # the voxel-merger's code (cctbx, numba: seconds) only for a run's live map; the CLI imports this module
    from voxel_merger.core.merge import AsuMapper

    key = (json.dumps(grid.to_dict(), sort_keys=True), symmetry)
    with _CACHE_LOCK:
        mapper = _MAPPER_CACHE.get(key)
        if mapper is None:
            _MAPPER_CACHE.clear()
            mapper = _MAPPER_CACHE[key] = AsuMapper(grid, symmetry)
    return mapper.map_observations(np.asarray(ids, dtype=np.int64))


def _partial_sums_at(path: Path, grid, symmetry: str | None, targets: np.ndarray) -> np.ndarray:
    """Sums (4, len(targets)) of one partial accumulator at the (ASU) voxel ids ``targets`` (sorted, unique).

    Every occupied voxel of the partial is mapped onto its ASU voxel as the merge does; cached by path, size and
    modification time, so a refresh reads only the partials that are new."""
    # voxel-merger (see _asu_ids)
    from voxel_merger.core.accumulate import N_FIELDS
    from voxel_merger.storage import H5VoxelAccumulator

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, symmetry, targets.size, int(targets[:1].sum()),
           int(targets[-1:].sum()))
    with _CACHE_LOCK:
        hit = _PARTIAL_CACHE.get(key)
    if hit is not None:
        return hit
    out = np.zeros((N_FIELDS, targets.size))
    with H5VoxelAccumulator(path, mode="r") as part:
        if part.grid != grid:
            raise ReportError(f"{path}: partial accumulator on another grid than the run's first partial")
        for start, s in part.iter_blocks():
            t = np.asarray(s, dtype=np.float64).sum(axis=1)
            occ = np.flatnonzero(t[0] > 0)
            if occ.size == 0:
                continue
            asu = _asu_ids(grid, symmetry, start + occ)
            pos = np.searchsorted(targets, asu)
            pos[pos >= targets.size] = 0
            hit_ = (asu >= 0) & (targets[pos] == asu)
            for f in range(N_FIELDS):
                np.add.at(out[f], pos[hit_], t[f, occ[hit_]])
    with _CACHE_LOCK:
        _PARTIAL_CACHE[key] = out
    return out


def live_map(partials: Sequence[Path], symmetry: str | None = None) -> LiveMap | None:
    """The current merged planes of a collecting run from its per-still partial accumulators.

    Equal to the voxel-merger's ``merge`` of the same partials without scales and without outlier rejection
    (``symmetry``: merge onto that space group's asymmetric unit and expand, as the final map does)."""
    # voxel-merger (see _asu_ids)
    from voxel_merger.core.merge import merge_sums
    from voxel_merger.storage import H5VoxelAccumulator

    partials = [Path(p) for p in partials if Path(p).is_file()]
    if not partials:
        return None
    with H5VoxelAccumulator(partials[0], mode="r") as first:
        grid = first.grid
    pids = _plane_ids(grid)
    asu = {ax: _asu_ids(grid, symmetry, ids.ravel()) for ax, ids in pids.items()}
    targets = np.unique(np.concatenate([a[a >= 0] for a in asu.values()]))
    total = sum(_partial_sums_at(p, grid, symmetry, targets) for p in partials)
    planes, counts = {}, {}
    for ax, a in asu.items():
        sums = np.zeros((total.shape[0], a.size))
        ok = a >= 0
        sums[:, ok] = total[:, np.searchsorted(targets, a[ok])]
        mean, _, count = merge_sums(sums)
        planes[ax] = mean.reshape(pids[ax].shape)
        counts[ax] = count.reshape(pids[ax].shape)
    return LiveMap(grid, planes, counts, len(partials), symmetry)


_MAP_CACHE: dict[tuple, tuple] = {}


def map_file_planes(path: Path):
    """(grid, {axis: plane}) of the h=0/k=0/l=0 planes of a voxel-merger map.h5 (read plane by plane; the last
    map read is kept, keyed by path, size and modification time)."""
    # voxel-merger and h5py (see _asu_ids)
    from diffractflow.formats.merged_map import open_map
    from voxel_merger.artifacts import map_planes
    from voxel_merger.core.grid import GlobalGrid

    st = Path(path).stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        hit = _MAP_CACHE.get(key)
    if hit is not None:
        return hit
    with open_map(path) as f:
        grid = GlobalGrid.from_dict(json.loads(f["entry/crystal"].attrs["grid"]))
        out = grid, map_planes(grid, f["entry/map/intensity"])
    with _CACHE_LOCK:
        _MAP_CACHE.clear()
        _MAP_CACHE[key] = out
    return out


# ============================================================================ figures
def fig_slices(grid, planes: dict[int, np.ndarray], title: str) -> str:
    """The h=0, k=0, l=0 planes side by side (colour range 1st-99th percentile of each plane)."""
    names = "hkl"
    fig = _figure(4.2 * max(len(planes), 1), 4.0)
    for n, (ax_i, sl) in enumerate(sorted(planes.items())):
        ax = fig.add_subplot(1, len(planes), n + 1)
        others = [a for a in range(3) if a != ax_i]
        x, y = grid.axis(others[1]), grid.axis(others[0])
        finite = sl[np.isfinite(sl)]
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        if vmax <= vmin:
            vmax = vmin + 1.0
        im = ax.imshow(sl, origin="lower", extent=(x[0], x[-1], y[0], y[-1]), vmin=vmin, vmax=vmax,
                       cmap="viridis", interpolation="nearest", aspect="auto")
        ax.set_facecolor("#dddddd")
        ax.set_xlabel(names[others[1]])
        ax.set_ylabel(names[others[0]])
        ax.set_title(f"{names[ax_i]} = 0  ({finite.size} voxels with data)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png_b64(fig)


def fig_radial(profile: dict) -> str | None:
    s = np.asarray(profile.get("s_centres") or [], dtype=float)
    m = np.array([np.nan if v is None else v for v in profile.get("mean_intensity") or []], dtype=float)
    if s.size == 0 or s.size != m.size:
        return None
    fig = _figure(5.5, 3.6)
    ax = fig.add_subplot()
    ax.plot(s, m, ".-")
    ax.set_xlabel("|s| = 1/d (1/Å)")
    ax.set_ylabel("mean voxel intensity")
    ax.set_title("radial profile of the merged map", fontsize=10)
    ax.grid(alpha=0.3)
    return _png_b64(fig)


def _shell_centres(table: dict) -> np.ndarray | None:
    d = table.get("d_edges")
    if not d:
        return None
    inv = 1.0 / np.asarray(d, dtype=float)
    return 0.5 * (inv[:-1] + inv[1:])


def fig_shells(stats: dict) -> str | None:
    """CC½ and the symmetry agreement (CC between symmetry equivalents) by resolution shell."""
    series = []
    for key, col, label in (("cc_half", "cc_half", "CC½"), ("symmetry_agreement", "cc", "symmetry agreement (CC)")):
        t = stats.get(key) or {}
        x = _shell_centres(t)
        y = np.array([np.nan if v is None else v for v in t.get(col) or []], dtype=float)
        if x is not None and y.size == x.size and y.size:
            series.append((x, y, label))
    if not series:
        return None
    fig = _figure(5.5, 3.6)
    ax = fig.add_subplot()
    for x, y, label in series:
        ax.plot(x, y, "o-", label=label)
    ax.set_xlabel("shell centre |s| = 1/d (1/Å)")
    ax.set_ylabel("correlation")
    ax.set_ylim(min(-0.1, np.nanmin([np.nanmin(y) for _, y, _ in series]) - 0.05), 1.05)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("agreement by resolution shell", fontsize=10)
    return _png_b64(fig)


def fig_scales(scales: dict[str, float]) -> str | None:
    if not scales:
        return None
    names = sorted(scales)
    fig = _figure(min(11, 2 + 0.3 * len(names)), 3.6)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), [scales[n] for n in names], color="#4477aa")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.split("#")[0] for n in names], rotation=70, fontsize=7)
    ax.set_ylabel("scale b (I_obs ≈ b·I_ref)")
    ax.set_title("per-still scales", fontsize=10)
    return _png_b64(fig)


#: figures drawn from a run's per-still records, by their inputs: :func:`predraw_still_figures` draws them while the
#: end-of-run stages run, and the final page takes them from here (the same inputs give the same figure)
_STILL_FIGURES: dict[tuple, str | None] = {}
_STILL_FIGURES_LOCK = threading.Lock()
_STILL_FIGURES_MAX = 8


def _memo_figure(key: tuple, draw) -> str | None:
    with _STILL_FIGURES_LOCK:
        if key in _STILL_FIGURES:
            return _STILL_FIGURES[key]
    png = draw()
    with _STILL_FIGURES_LOCK:
        while len(_STILL_FIGURES) >= _STILL_FIGURES_MAX:
            _STILL_FIGURES.pop(next(iter(_STILL_FIGURES)))
        _STILL_FIGURES[key] = png
    return png


def fig_background(profiles: dict[str, np.ndarray]) -> str | None:
    """Per-still isotropic background B(|q|) (the extractor's estimate, corrected intensity units)."""
    if not profiles:
        return None
    key = ("background",) + tuple((n, a.shape, a.tobytes()) for n, a in profiles.items())
    return _memo_figure(key, lambda: _draw_background(profiles))


def _draw_background(profiles: dict[str, np.ndarray]) -> str:
    fig = _figure(5.5, 3.6)
    ax = fig.add_subplot()
    for name, p in profiles.items():
        ax.plot(p[:, 0], p[:, 1], lw=1, alpha=0.7, label=name if len(profiles) <= 8 else None)
    ax.set_xlabel("|q| (1/Å)")
    ax.set_ylabel("background B(|q|)")
    ax.set_title(f"background profile per still ({len(profiles)} stills)", fontsize=10)
    if len(profiles) <= 8:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png_b64(fig)


def fig_timings(rows: list[dict]) -> str | None:
    """Seconds per stage of every still, stacked."""
    rows = [r for r in rows if r.get("stage_seconds")]
    if not rows:
        return None
    key = ("timings",) + tuple((Path(r.get("image", "?")).stem, tuple(sorted((k, float(v)) for k, v in
                                                                          r["stage_seconds"].items())))
                               for r in rows)
    return _memo_figure(key, lambda: _draw_timings(rows))


def _draw_timings(rows: list[dict]) -> str:
    stages = sorted({k for r in rows for k in r["stage_seconds"]})
    fig = _figure(min(11, 2 + 0.3 * len(rows)), 3.6)
    ax = fig.add_subplot()
    bottom = np.zeros(len(rows))
    for st in stages:
        v = np.array([float(r["stage_seconds"].get(st, 0.0)) for r in rows])
        ax.bar(range(len(rows)), v, bottom=bottom, label=st)
        bottom += v
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([Path(r.get("image", "?")).stem for r in rows], rotation=70, fontsize=7)
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    ax.set_title("time per still and stage", fontsize=10)
    return _png_b64(fig)


# ============================================================================ collecting a diffuse run
def _records(layout: RunLayout, summary: dict) -> list[dict]:
    if layout.run_dir is not None and (layout.run_dir / "stills").is_dir():
        rows = []
        for p in sorted((layout.run_dir / "stills").glob("*.json")):
            r = _read_json(p)
            if isinstance(r, dict):
                r["_record"] = p
                rows.append(r)
        return rows
    return list(summary.get("stills") or [])


def _vol_path(layout: RunLayout, ref) -> Path | None:
    """A record's artifact reference ({path, sha256} relative to the volume, or an absolute path) as a path."""
    if ref is None:
        return None
    rel = ref.get("path") if isinstance(ref, dict) else str(ref)
    if not rel:
        return None
    if os.path.isabs(rel):
        return Path(rel)
    if layout.volume is None:
        return None
    p = (layout.volume / rel).resolve()
    return p if layout.volume.resolve() in p.parents else None


@functools.lru_cache(maxsize=1024)
def _background_profile(path: str, _mtime_ns: int, _size: int) -> np.ndarray | None:
    """A still table's background profile (cached by the file's modification time and size)."""
    # h5py (with the table reader) only for a run's page, not for the CLI's start
    from diffractflow.formats.still_table import StillTable

    with StillTable(path) as t:
        return t.background_profile()


def _background_profiles(layout: RunLayout, records: list[dict], limit: int = 40) -> dict[str, np.ndarray]:
    out = {}
    for r in records:
        p = _vol_path(layout, r.get("diffuse"))
        if p is None or not p.is_file():
            continue
        try:
            st = p.stat()
            a = _background_profile(str(p), st.st_mtime_ns, st.st_size)
        except (InputError, OSError):
            continue
        if a is not None and a.ndim == 2 and a.shape[1] >= 2 and np.isfinite(a[:, 1]).any():
            out[Path(r.get("image", p.name)).stem] = a
        if len(out) >= limit:
            break
    return out


def _named_scales(out_dir: Path) -> dict[str, float]:
    f = out_dir / "scales.json"
    if not f.is_file():
        return {}
    # h5py (see _background_profiles)
    from diffractflow.formats.scales import read_scales

    names = (_read_json(out_dir / "statistics.json", {}) or {}).get("still_names")
    if isinstance(names, dict):  # {index: name}: an old run's index-keyed scales
        names = [names.get(str(i), str(i)) for i in range(1 + max((int(k) for k in names), default=-1))]
    try:
        return read_scales(f, names)
    except InputError:
        return {}


def _provenance(path: Path) -> dict:
    # h5py (see _background_profiles)
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()
                    if k in ("producer", "producer_version", "schema", "schema_version", "created")}
    except OSError:
        return {}


def _diffuse_page(layout: RunLayout, refresh_s: float | None) -> Page:
    out = layout.output_dir
    run_summary = _read_json(out / "run_summary.json", None) if out else None
    user_summary = _read_json(out / "summary.json", {}) if out else {}
    summary = run_summary or user_summary or {}
    complete = bool(run_summary or user_summary)
    config = _read_json(layout.run_dir / "config.json", {}) if layout.run_dir else {}
    records = _records(layout, user_summary)
    run_id = summary.get("run_id") or (layout.run_dir.name if layout.run_dir else layout.page_dir.name)
    n_ok = sum(r.get("status") == "ok" for r in records)
    n_fail = len(records) - n_ok
    expected = config.get("expected_stills")
    status = (f"complete: {summary.get('stills_processed', n_ok)}/{summary.get('stills_total', len(records))} "
              f"stills merged" if complete else
              f"collecting: {len(records)}{f'/{expected}' if expected else ''} stills landed, {n_ok} accumulated, "
              f"{n_fail} failed" + ("; all stills in, end-of-run merge and scaling running"
                                    if expected and len(records) >= expected else ""))
    page = Page(title=f"diffuse run {run_id}", status=status, refresh_s=None if complete else refresh_s)
    link = _Linker(page, layout.page_dir)
    S = page.sections

    # --- headline numbers
    stats = _read_json(out / "stats.json", {}) if out else {}
    head = {"run": run_id, "status": status, "stills landed": len(records), "stills ok": n_ok, "stills failed": n_fail}
    cc = (stats.get("cc_half") or {}).get("overall")
    if cc is not None:
        head["CC½ (overall)"] = round(cc, 4)
    sym = (stats.get("symmetry_agreement") or {}).get("overall")
    if sym is not None:
        head["symmetry agreement (overall)"] = round(sym, 4)
    for k in ("wall_seconds", "map_cc_vs_truth", "scale_error_max"):
        if k in summary:
            head[k] = summary[k]
    S.append("<h2>Summary</h2>" + _kv_table(head))

    # --- figures
    figs = []
    map_h5 = out / "map.h5" if out and (out / "map.h5").is_file() else None
    # the services' own figures of a finished run are embedded as they are (drawing them again costs seconds of
    # matplotlib layout at the end of every run); only what no service draws is drawn here
    own = {name: out / f"{name}.png" for name in ("slice_h0", "slice_k0", "slice_l0", "radial_profile",
                                                   "scales_per_still")} if out else {}
    own = {k: v for k, v in own.items() if v.is_file()}
    if map_h5 is not None:
        what = "merged map: " + ", ".join([
            "scaled" if stats.get("scales_applied") else "unscaled",
            f"merged in {stats['symmetry']}" if stats.get("symmetry") not in (None, "none") else "no symmetry",
            f"outliers rejected at {stats['reject_sigma']}σ ({stats.get('n_rejected', 0)} still-voxels)"
            if stats.get("reject_sigma") else "no outlier rejection"])
        slices = [own.get(f"slice_{a}0") for a in "hkl"]
        if any(slices):
            figs += [img_file(f, f"merged map slice {f.stem[-2]}=0 (the voxel-merger's figure); {what}")
                     for f in slices if f is not None]
        else:
            try:
                grid, planes = map_file_planes(map_h5)
                figs.append(_img(fig_slices(grid, planes, what), f"merged map slices h=0, k=0, l=0; {what}"))
            except (OSError, KeyError, ValueError) as exc:
                figs.append(f"<p class=warn>cannot read {_esc(map_h5)}: {_esc(exc)}</p>")
    else:
        partials = [p for p in (_vol_path(layout, r.get("partial")) for r in records if r.get("status") == "ok") if p]
        sym_name = config.get("symmetry")
        lm = live_map(partials, sym_name) if partials else None
        if lm is not None:
            what = (f"live: {lm.n_partials} stills accumulated (unscaled, no outlier rejection"
                    f"{', merged in ' + sym_name if sym_name else ''})")
            figs.append(_img(fig_slices(lm.grid, lm.planes, what),
                             f"current merged slices h=0, k=0, l=0 from the per-still partial sums; {what}"))
        else:
            figs.append("<p>no still accumulated yet</p>")
    if "radial_profile" in own:
        figs.append(img_file(own["radial_profile"], "radial profile of the merged map (the voxel-merger's figure)"))
    elif stats.get("radial_profile"):
        figs.append(_img(fig_radial(stats["radial_profile"]), "radial profile"))
    figs.append(_img(fig_shells(stats), "CC½ and symmetry agreement by resolution shell"))
    if "scales_per_still" in own:
        figs.append(img_file(own["scales_per_still"], "per-still scales (relative scaling; the scaler's figure)"))
    elif out:
        figs.append(_img(fig_scales(_named_scales(out)), "per-still scales (relative scaling)"))
    method = (summary.get("background") or {}).get("method") or (
        "frames" if config.get("background_frames") else (config.get("extractor") or {}).get("background", "none"))
    figs.append(_img(fig_background(_background_profiles(layout, records)),
                     "the extractor's per-still isotropic background estimate B(|q|) (subtracted only with the "
                     f"'isotropic' method; this run's background: {method})"))
    figs.append(_img(fig_timings(records), "seconds per stage and still"))
    S.append("<h2>Figures</h2><div class=figs>" + "".join(f for f in figs if f) + "</div>")

    # --- per-still status
    rows = []
    for r in records:
        st = r.get("status", "?")
        secs = r.get("stage_seconds") or {}
        rows.append([link(r.get("_record"), Path(r.get("image", "?")).name),
                     f'<span class="st-{_esc(st)}">{_esc(st)}</span>',
                     _esc(r.get("reason") or ""), _esc(r.get("strategy") or ""), _esc(r.get("n_spots", "")),
                     _esc(r.get("n_indexed", "")),
                     _esc(", ".join(f"{k} {v:.1f}" for k, v in secs.items())), _esc(_fmt(r.get("seconds"))),
                     link(_vol_path(layout, r.get("diffuse")), "table") if r.get("diffuse") else "",
                     link(_vol_path(layout, r.get("partial")), "partial") if r.get("partial") else ""])
    S.append("<h2>Stills</h2>" + _table(["still", "status", "reason", "indexing strategy", "spots", "indexed",
                                         "seconds per stage", "total s", "diffuse table", "voxel sums"], rows,
                                        "stills"))

    # --- timings
    per_stage: dict[str, list[float]] = {}
    for r in records:
        for k, v in (r.get("stage_seconds") or {}).items():
            per_stage.setdefault(k, []).append(float(v))
    trows = [[_esc(k), _esc(len(v)), _esc(f"{np.mean(v):.2f}"), _esc(f"{np.max(v):.2f}"), _esc(f"{np.sum(v):.1f}")]
             for k, v in per_stage.items()]
    trows += [[_esc(k), "end of run", _esc(f"{v:.2f}"), "", ""] for k, v in (summary.get("stage_seconds") or {}).items()
              if not k.endswith("_per_still_mean")]
    S.append("<h2>Timings per stage</h2>" + _table(["stage", "stills", "mean s", "max s", "total s"], trows))

    # --- configuration, versions, files
    if config:
        S.append("<h2>Configuration</h2>" + _kv_table(config))
    versions = dict(software_versions())
    if map_h5 is not None:
        prov = _provenance(map_h5)
        if prov.get("producer"):
            versions[f"{prov['producer']} (map.h5)"] = prov.get("producer_version")
    S.append("<h2>Versions</h2>" + _kv_table(versions))
    files = []
    if layout.run_dir is not None:
        files += [layout.run_dir / n for n in ("config.json", "background.json", "beamstop.npz")]
        bkg = _vol_path(layout, (_read_json(layout.run_dir / "background.json", {}) or {}).get("artifact"))
        if bkg:
            files.append(bkg)
    if out and out.is_dir():
        files += sorted(p for p in out.iterdir() if p.is_file() and p.name != REPORT_NAME)
    frows = []
    for f_ in dict.fromkeys(files):
        if f_.is_file():
            frows.append([link(f_, os.path.relpath(f_, layout.page_dir)), _esc(_describe(f_)),
                          _esc(f"{f_.stat().st_size / 1e6:.2f} MB")])
    S.append("<h2>Files</h2>" + _table(["file", "what", "size"], frows))
    return page


_DESCRIPTIONS = {
    "map.h5": "merged 3-D map, NeXus NXdata (h, k, l; intensity, sigma, counts)",
    "absolute_map.h5": "map on the absolute scale (electron units), NeXus",
    "observations.h5": "per (still, voxel) observation table for scaling",
    "scales.json": "per-still scales b (I_obs ≈ b·I_ref)",
    "stats.json": "merging statistics: CC½, symmetry agreement, radial profile",
    "statistics.json": "scaling statistics",
    "run_summary.json": "end-of-run summary",
    "summary.json": "the run's summary for the user",
    "config.json": "run configuration",
    "background.h5": "smoothed background from background-only frames",
}


def _describe(p: Path) -> str:
    if p.name in _DESCRIPTIONS:
        return _DESCRIPTIONS[p.name]
    return {".png": "figure", ".h5": "HDF5", ".json": "JSON", ".nxs": "NeXus"}.get(p.suffix, "")


def predraw_still_figures(layout: RunLayout) -> None:
    """Draw the figures made from the per-still records (background profiles, time per still) now, so the final
    page finds them drawn: called once every still has its record, while the end-of-run stages still run."""
    records = _records(layout, {})
    fig_background(_background_profiles(layout, records))
    fig_timings(records)


# ============================================================================ HTML
def build_page(layout: RunLayout, refresh_s: float | None = None) -> Page:
    return job_page(layout.output_dir) if layout.kind == "stem" else _diffuse_page(layout, refresh_s)


def write_report(run: str | os.PathLike | RunLayout, home: str | os.PathLike | None = None,
                 refresh_s: float | None = None) -> Path:
    """Write ``report.html`` for a run (a directory or run id, see :func:`locate`) next to its outputs; return it.

    ``refresh_s``: make the page reload itself every so many seconds while the run is still collecting."""
    layout = run if isinstance(run, RunLayout) else locate(run, home)
    return write_page(build_page(layout, refresh_s), layout.page)


# ============================================================================ serving
def _signature(layout: RunLayout) -> tuple:
    """Modification times and sizes of everything the page is made from (cheap: no file is opened)."""
    sig = []
    dirs = [d for d in (layout.run_dir, layout.run_dir / "stills" if layout.run_dir else None, layout.output_dir)
            if d is not None and d.is_dir()]
    if layout.kind == "stem":
        dirs += [layout.output_dir / n for n in ("logs", "figures", "kspace", "realspace")]
    for d in dirs:
        for p in sorted(d.iterdir()) if d.is_dir() else ():
            if p.name == REPORT_NAME or p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            sig.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(sig)


class ReportServer:
    """Serves a run's page on ``host:port`` (``/`` redirects to it), regenerated when its inputs changed.

    Only the page and files it links to are served. ``port`` 0 picks a free port (see ``url``)."""

    def __init__(self, run: str | os.PathLike | RunLayout, host: str = "127.0.0.1", port: int = 0,
                 home: str | os.PathLike | None = None, refresh_s: float = REFRESH_S, write: bool = True):
        self.layout = run if isinstance(run, RunLayout) else locate(run, home)
        self.refresh_s, self.write = refresh_s, write
        # URLs mirror the directory tree below the common root of the page and the volume, so the page's relative
        # links work the same over HTTP as from the file system
        vol = self.layout.volume
        self.root = Path(os.path.commonpath([self.layout.page_dir.resolve()] + ([vol.resolve()] if vol else [])))
        self.page_path = "/" + urllib.parse.quote(Path(os.path.relpath(self.layout.page, self.root)).as_posix())
        self._lock = threading.Lock()
        self._sig: tuple | None = None
        self._html = b""
        self._files: dict[str, Path] = {}
        self.renders = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server._handle(self)

            def log_message(self, *args):  # quiet: the operator's terminal shows the URL only
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address."""
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}{self.page_path}"

    def page_bytes(self) -> bytes:
        """The current page, rebuilt only when a file it is made from changed."""
        with self._lock:
            sig = _signature(self.layout)
            if sig != self._sig or not self._html:
                page = build_page(self.layout, self.refresh_s)
                text = render_html(page)
                self._files = {Path(os.path.relpath(p, self.root)).as_posix(): p for p in page.links
                               if self.root in p.parents}
                self._html, self._sig = text.encode("utf-8"), sig
                self.renders += 1
                if self.write:
                    with atomic_write_path(self.layout.page) as tmp:
                        Path(tmp).write_bytes(self._html)
            return self._html

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.urlsplit(req.path).path
        if path == "/" and self.page_path != "/":
            req.send_response(HTTPStatus.FOUND)
            req.send_header("Location", self.page_path)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        if path == self.page_path:
            try:
                body = self.page_bytes()
            except Exception as exc:  # a half-written run must not kill the server: say what failed
                body = render_html(Page("report error", f"{type(exc).__name__}: {exc}")).encode()
            req.send_response(HTTPStatus.OK)
            req.send_header("Content-Type", "text/html; charset=utf-8")
            req.send_header("Content-Length", str(len(body)))
            req.send_header("Cache-Control", "no-store")
            req.end_headers()
            req.wfile.write(body)
            return
        with self._lock:
            target = self._files.get(urllib.parse.unquote(path).lstrip("/"))
        if target is None or not target.is_file():
            req.send_error(HTTPStatus.NOT_FOUND, "not a file of this report")
            return
        ctype = {".json": "application/json", ".png": "image/png", ".html": "text/html"}.get(
            target.suffix, "application/octet-stream")
        size = target.stat().st_size
        req.send_response(HTTPStatus.OK)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(size))
        req.end_headers()
        with open(target, "rb") as fh:
            while chunk := fh.read(1 << 20):
                req.wfile.write(chunk)

    def start(self) -> "ReportServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="report-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ============================================================================ CLI
def register(app) -> None:
    """Add ``report`` to a typer app: ``diffractflow report RUN_DIR_OR_ID [--home H] [--serve --port N]``."""
    @app.command("report")
    def report_cmd(
        run: str = typer.Argument(..., help="A run directory (volume runs/<run_id>), the output directory of "
                                  "`process diffuse` or a demo, a stem-polar job directory, or a run id (looked "
                                  "up in the topology's volume)."),
        home: Optional[Path] = typer.Option(None, "--home", envvar="DIFFRACTFLOW_HOME",
                                            help="Topology directory whose volume holds the run (for a run id)."),
        serve: bool = typer.Option(False, "--serve", help="Serve the page on localhost, regenerated as stills land "
                                   "(auto-refresh while collecting); Ctrl-C stops."),
        port: int = typer.Option(8765, "--port", help="Port for --serve (0: any free port)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address for --serve (default: this machine only)."),
        refresh: float = typer.Option(REFRESH_S, "--refresh", help="Seconds between reloads of the served page "
                                      "while the run collects."),
    ):
        """Write the run's report (one self-contained HTML page next to its outputs), or serve it live."""
        try:
            if not serve:
                typer.echo(str(write_report(run, home)))
                return
            srv = ReportServer(run, host=host, port=port, home=home, refresh_s=refresh)
        except (ReportError, OSError) as exc:
            typer.echo(f"report: {exc}", err=True)
            raise typer.Exit(2)
        srv.page_bytes()
        typer.echo(f"serving {srv.layout.page} at {srv.url} (Ctrl-C stops)")
        try:
            srv.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            srv.httpd.server_close()
