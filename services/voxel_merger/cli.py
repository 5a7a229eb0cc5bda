"""voxel-merger command line: run / grid / accumulate / merge / inspect (+ serve from the platform)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from diffractflow.cli import service_app

from . import __version__

app = service_app("voxel-merger", __version__, stage="voxel_merger.worker:STAGE",
                  help="Merge diffuse-scattering stills onto a global reciprocal grid (exposure-weighted, HDF5-backed).")


def _options(subdivisions, symmetry, reject_sigma, d_min, backend, cache_mb, half_seed, n_shells, table=True):
    from .pipeline import MergeOptions

    if subdivisions < 1 or subdivisions % 2 == 0:
        typer.echo(f"error: --subdivisions must be a positive odd number, got {subdivisions}", err=True)
        raise typer.Exit(2)
    if backend not in ("memory", "hdf5"):
        typer.echo(f"error: --backend must be 'memory' or 'hdf5', got {backend!r}", err=True)
        raise typer.Exit(2)
    return MergeOptions(subdivisions=subdivisions, symmetry=symmetry, reject_sigma=reject_sigma, d_min=d_min,
                        backend=backend, cache_mb=cache_mb, half_seed=half_seed, n_shells=n_shells, write_table=table)


def _fail(exc: Exception):
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


SUBDIV = typer.Option(3, "--subdivisions", help="Sub-voxels per unit of h, k and l (odd: integer hkl at voxel centres).")
SYMM = typer.Option(None, "--symmetry", help="Merge symmetry equivalents (Laue group + Friedel) of this space group "
                                             "symbol, or 'auto' for the stills' own; default: no symmetry merging.")
DMIN = typer.Option(None, "--d-min", help="Resolution limit of the grid in Å (default: from the data).")
BACKEND = typer.Option("hdf5", "--backend", help="'hdf5' (bounded memory, on disk; dense in memory while the grid "
                                                  "fits --cache-mb) or 'memory' (dense arrays). Same default as the bus worker.")
CACHE = typer.Option(256, "--cache-mb", help="Block cache of the hdf5 backend, MiB.")
SEED = typer.Option(0, "--half-seed", help="Seed of the random per-still half-dataset split (CC1/2).")
SHELLS = typer.Option(10, "--shells", help="Resolution shells for CC1/2 (equal reciprocal volume).")


@app.command()
def run(
    inputs: List[Path] = typer.Argument(..., help="Per-still HDF5 tables from the diffuse-extractor."),
    out: Path = typer.Option(..., "--out", help="Output directory (map.h5, observations.h5, PNGs, stats.json)."),
    subdivisions: int = SUBDIV,
    scales: Optional[Path] = typer.Option(None, "--scales", help="scales.json from the scaler: still id -> b, "
                                                                  "with I_obs = b * I_ref (intensities are divided by b)."),
    symmetry: Optional[str] = SYMM,
    reject_sigma: Optional[float] = typer.Option(None, "--reject-sigma", help="Reject observations further than this "
                                                 "many σ from the mean of the other observations in their voxel."),
    d_min: Optional[float] = DMIN,
    backend: str = BACKEND,
    cache_mb: int = CACHE,
    half_seed: int = SEED,
    shells: int = SHELLS,
    table: bool = typer.Option(True, "--table/--no-table", help="Write the scaler's flat observation table."),
):
    """Merge stills end to end: grid, accumulation, weighted merge, map and figures."""
    from .artifacts import InputError
    from .pipeline import run as run_pipeline

    opt = _options(subdivisions, symmetry, reject_sigma, d_min, backend, cache_mb, half_seed, shells, table)
    try:
        with _progress() as prog:
            tasks = {}

            def cb(stage, i, n):
                if stage not in tasks:
                    tasks[stage] = prog.add_task(stage, total=n)
                prog.update(tasks[stage], completed=i)

            outputs, stats = run_pipeline(inputs, out, opt, scales_path=scales, progress=cb)
    except (InputError, ValueError, RuntimeError) as exc:
        _fail(exc)
    _summary(outputs, stats)


def _summary(outputs, stats):
    typer.echo(f"stills: {stats.get('n_stills')}  observations: {stats.get('n_observations')}  "
               f"voxels measured: {stats.get('n_voxels_measured')} / {stats.get('n_voxels_grid')}  "
               f"rejected: {stats.get('n_rejected', 0)}")
    cc = stats.get("cc_half")
    if cc:
        typer.echo(f"CC1/2 overall: {cc['overall']:.4f}")
    for k, v in outputs.items():
        typer.echo(f"  {k}: {v}")


@app.command()
def grid(
    inputs: List[Path] = typer.Argument(..., help="Per-still HDF5 tables (crystal models and resolution)."),
    out: Path = typer.Option(..., "--out", help="Grid JSON to write (shared by all accumulate jobs)."),
    subdivisions: int = SUBDIV,
    d_min: Optional[float] = DMIN,
):
    """Define the global grid (average cell, reference setting, bounds) for per-still accumulate jobs."""
    from .artifacts import InputError, write_grid
    from .pipeline import grid_from_inputs

    opt = _options(subdivisions, None, None, d_min, "memory", 256, 0, 10)
    try:
        g, info = grid_from_inputs(inputs, opt)
    except (InputError, ValueError) as exc:
        _fail(exc)
    write_grid(out, g, info)
    typer.echo(f"grid {g.shape} ({g.n_voxels} voxels), cell {info['average_unit_cell']}, {info['space_group']}, "
               f"d_min {info['d_min']:.3f} Å -> {out}")


@app.command()
def accumulate(
    still: Path = typer.Argument(..., help="One still's per-pixel HDF5 table."),
    grid_file: Path = typer.Option(..., "--grid", help="Grid JSON from `voxel-merger grid`."),
    out: Path = typer.Option(..., "--out", help="Partial accumulator HDF5 to write."),
    cache_mb: int = CACHE,
):
    """Accumulate one still into a partial accumulator file (sums per voxel; merge later)."""
    from .artifacts import InputError, read_grid
    from .pipeline import MergeOptions, accumulate_one

    try:
        info = accumulate_one(still, read_grid(grid_file), out, MergeOptions(cache_mb=cache_mb))
    except (InputError, ValueError) as exc:
        _fail(exc)
    typer.echo(json.dumps(info))


@app.command()
def merge(
    partials: List[Path] = typer.Argument(..., help="Partial accumulator files (one per still or more)."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    scales: Optional[Path] = typer.Option(None, "--scales", help="scales.json (still id -> b, I_obs = b * I_ref)."),
    table: Optional[Path] = typer.Option(None, "--table", help="Observation table whose still_names map integer "
                                                                "keys of scales.json to still ids."),
    symmetry: Optional[str] = SYMM,
    reject_sigma: Optional[float] = typer.Option(None, "--reject-sigma", help="Drop a still's voxel estimate "
                                                 "further than this many σ from the other stills' mean (voxels "
                                                 "with >= 3 stills; single-still partials). Default: off."),
    backend: str = BACKEND,
    cache_mb: int = CACHE,
    half_seed: int = SEED,
    shells: int = SHELLS,
):
    """Add partial accumulators (exact) and write the merged map, figures and statistics."""
    from .artifacts import InputError
    from .pipeline import merge_partials

    opt = _options(3, symmetry, reject_sigma, None, backend, cache_mb, half_seed, shells, table=True)
    try:
        with _progress() as prog:
            task = prog.add_task("merging partials", total=len(partials))
            outputs, stats = merge_partials(partials, out, opt, scales_path=scales, table_path=table,
                                            heartbeat=lambda: prog.update(  # also ticks while writing the map
                                                task, completed=min(len(partials), prog.tasks[0].completed + 1)))
    except (InputError, ValueError) as exc:
        _fail(exc)
    _summary(outputs, stats)


@app.command()
def inspect(path: Path = typer.Argument(..., help="A map.h5, partial accumulator, observation table or still file.")):
    """Summarise a voxel-merger file (or an input still)."""
    import h5py
    import numpy as np

    from .artifacts import InputError, MAP_SCHEMA, TABLE_SCHEMA, open_still, read_map
    from .storage import ACCUMULATOR_SCHEMA, H5VoxelAccumulator

    if not path.exists():
        _fail(FileNotFoundError(f"{path} does not exist"))
    try:
        with h5py.File(path, "r") as f:
            schema = f.attrs.get("schema", "")
            is_acc = "accumulator" in f
    except OSError as exc:
        _fail(InputError(f"{path}: not an HDF5 file ({exc})"))
    try:
        if schema == MAP_SCHEMA:
            m = read_map(path)
            meas = m.counts > 0
            typer.echo(f"map {m.grid.shape} voxels, subdivisions {m.grid.ndiv}, cell {m.grid.unit_cell}, "
                       f"{m.grid.space_group}")
            typer.echo(f"measured voxels: {int(meas.sum())}, observations merged: "
                       f"{m.statistics.get('n_observations', 'n/a')}, symmetry: {m.statistics.get('symmetry', 'n/a')}")
            if meas.any():
                typer.echo(f"intensity: median {np.nanmedian(m.intensity):.4g}, range "
                           f"{np.nanmin(m.intensity):.4g} .. {np.nanmax(m.intensity):.4g}")
            cc = m.statistics.get("cc_half")
            if cc:
                typer.echo(f"CC1/2 overall {cc['overall']:.4f}; per shell (d_max..d_min Å):")
                fmt = lambda x: "inf" if x is None else f"{x:.2f}"  # noqa: E731
                for i, v in enumerate(cc["cc_half"]):
                    typer.echo(f"  {fmt(cc['d_edges'][i]):>7} - {fmt(cc['d_edges'][i + 1]):>6}  CC1/2 "
                               f"{'n/a' if v is None else f'{v:.4f}'}  voxels {cc['n_voxels'][i]}")
        elif is_acc or schema == ACCUMULATOR_SCHEMA:
            with H5VoxelAccumulator(path, mode="r") as acc:
                nb = int(acc._nonempty.sum())
                typer.echo(f"accumulator on grid {acc.grid.shape}, halves {acc.n_halves}, stills {acc.still_ids[:10]}"
                           f"{' ...' if len(acc.still_ids) > 10 else ''} ({len(acc.still_ids)}), observations "
                           f"{acc.n_obs}, dropped {acc.n_dropped}, blocks stored {nb}/{acc.n_blocks}")
        elif schema == TABLE_SCHEMA:
            with h5py.File(path, "r") as f:
                typer.echo(f"observation table: {f['voxel_id'].shape[0]} observations from "
                           f"{f['still_names'].shape[0]} stills")
        else:
            with open_still(path) as s:
                typer.echo(f"still {s.still_id}: {s.n_obs} observations, crystal {s.crystal}")
    except (InputError, ValueError, KeyError) as exc:
        _fail(exc)
