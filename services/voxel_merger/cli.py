"""voxel-merger command line: run / grid / accumulate / merge / inspect (+ serve from the platform).

Options, their defaults and help come from :mod:`voxel_merger.core.params` (the bus worker's models), so a job
behaves the same from here and from the bus (e.g. the hdf5 storage backend)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import h5py
import numpy as np
import typer
from diffractflow.cli import model_option, service_app
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .artifacts import MAP_SCHEMA, TABLE_SCHEMA, InputError, open_still, read_grid, read_map, write_grid
from .core.params import MergeOptions, merge_reject_sigma
from .pipeline import accumulate_one, check_subdivisions, grid_from_inputs, merge_partials
from .pipeline import run as run_pipeline
from .storage import ACCUMULATOR_SCHEMA, H5VoxelAccumulator

app = service_app("voxel-merger", __version__, stage="voxel_merger.worker:STAGE",
                  help="Merge diffuse-scattering stills onto a global reciprocal grid (exposure-weighted, HDF5-backed).")


#: MergeOptions field -> its option, where the names differ
FLAGS = {"n_shells": "--shells", "write_table": "--table/--no-table"}


def _flag(loc: tuple) -> str:
    name = str(loc[0]) if loc else ""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def _options(**values: Any) -> MergeOptions:
    """The library options from the command line's values; exit 2 naming the option on a bad value."""
    try:
        opt = MergeOptions(**values)
        check_subdivisions(opt.subdivisions)
    except ValidationError as exc:
        typer.echo("error: " + "; ".join(f"{_flag(e['loc'])}: {e['msg']}" for e in exc.errors()), err=True)
        raise typer.Exit(2)
    except InputError as exc:
        typer.echo(f"error: --{exc}", err=True)
        raise typer.Exit(2)
    return opt


def _fail(exc: Exception):
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


def _progress():
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _opt(name: str, *decls: str) -> Any:
    """A typer option for MergeOptions' field ``name``: its default and description."""
    return model_option(MergeOptions, name, *decls)


SUBDIV = _opt("subdivisions", "--subdivisions")
SYMM = _opt("symmetry", "--symmetry")
DMIN = _opt("d_min", "--d-min")
BACKEND = _opt("backend", "--backend")
CACHE = _opt("cache_mb", "--cache-mb")
SEED = _opt("half_seed", "--half-seed")
SHELLS = _opt("n_shells", "--shells")
REJECT = _opt("reject_sigma", "--reject-sigma")


@app.command()
def run(
    inputs: List[Path] = typer.Argument(..., help="Per-still HDF5 tables from the diffuse-extractor."),
    out: Path = typer.Option(..., "--out", help="Output directory (map.h5, observations.h5, PNGs, stats.json)."),
    subdivisions: int = SUBDIV,
    scales: Optional[Path] = typer.Option(None, "--scales", help="scales.json from the scaler: still id -> b, "
                                                                  "with I_obs = b * I_ref (intensities are divided by b)."),
    symmetry: Optional[str] = SYMM,
    reject_sigma: Optional[float] = REJECT,
    d_min: Optional[float] = DMIN,
    backend: str = BACKEND,
    cache_mb: int = CACHE,
    half_seed: int = SEED,
    shells: int = SHELLS,
    table: bool = _opt("write_table", "--table/--no-table"),
):
    """Merge stills end to end: grid, accumulation, weighted merge, map and figures."""
    opt = _options(subdivisions=subdivisions, symmetry=symmetry, reject_sigma=reject_sigma, d_min=d_min,
                   backend=backend, cache_mb=cache_mb, half_seed=half_seed, n_shells=shells, write_table=table)
    try:
        with _progress() as prog:
            tasks = {}

            def cb(stage, i, n):
                if stage not in tasks:
                    tasks[stage] = prog.add_task(stage, total=n)
                prog.update(tasks[stage], completed=i)

            outputs, stats = run_pipeline(inputs, out, opt, scales_path=scales, progress=cb)
    except InputError as exc:
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
    opt = _options(subdivisions=subdivisions, d_min=d_min)
    try:
        g, info = grid_from_inputs(inputs, opt)
    except InputError as exc:
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
    opt = _options(cache_mb=cache_mb)
    try:
        info = accumulate_one(still, read_grid(grid_file), out, opt)
    except InputError as exc:
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
    reject_sigma: Optional[float] = REJECT,
    backend: str = BACKEND,
    cache_mb: int = CACHE,
    half_seed: int = SEED,
    shells: int = SHELLS,
):
    """Add partial accumulators (exact) and write the merged map, figures and statistics."""
    opt = _options(symmetry=symmetry, reject_sigma=merge_reject_sigma(reject_sigma, scaled=scales is not None),
                   backend=backend, cache_mb=cache_mb, half_seed=half_seed, n_shells=shells)
    try:
        with _progress() as prog:
            task = prog.add_task("merging partials", total=len(partials))
            outputs, stats = merge_partials(partials, out, opt, scales_path=scales, table_path=table,
                                            heartbeat=lambda: prog.update(  # also ticks while writing the map
                                                task, completed=min(len(partials), prog.tasks[0].completed + 1)))
    except InputError as exc:
        _fail(exc)
    _summary(outputs, stats)


@app.command()
def inspect(path: Path = typer.Argument(..., help="A map.h5, partial accumulator, observation table or still file.")):
    """Summarise a voxel-merger file (or an input still)."""
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
