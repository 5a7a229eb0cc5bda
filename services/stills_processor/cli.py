"""Command line: ``stills-processor run`` (images in, DIALS files + summary.h5 out), ``frame-model`` (one
rotation frame's experiment from a sweep model), ``show``, ``serve``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from diffractflow.artifacts import atomic_write_path

from . import __version__
from .artifacts import read_summary
from .batch import default_nproc, run_job
from .core.params import StillsJob, field_default, field_help
from .core.sweep import FrameMismatch, frame_experiment

_HELP = "DIALS processing of true stills and rotation sequences (spot finding, indexing, refinement, integration)."
try:
    from diffractflow.cli import service_app

    app = service_app("stills-processor", __version__, stage="stills_processor.worker:STAGE", help=_HELP)
except Exception:  # platform library not importable: a plain app keeps `run` usable
    app = typer.Typer(name="stills-processor", no_args_is_help=True, help=_HELP)


def _fail(msg: str, code: int = 2):
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _fmt(v, nd=2):
    try:
        return "-" if v != v else f"{v:.{nd}f}"  # NaN -> "-"
    except TypeError:
        return str(v)


def print_table(rows, console=None) -> None:
    """A rich table of the summary rows."""
    console = console or Console()
    colour = {"indexed": "green", "non_hit": "yellow", "failed": "red", "error": "bold red"}
    t = Table(title="stills-processor summary", show_lines=False)
    for col in ("name", "kind", "status", "spots", "indexed", "refined", "integr.", "a b c (Å)", "α β γ (°)", "SG",
                "rmsd x,y (px)", "Δq med (1/Å)", "valid", "strategy", "reason"):
        t.add_column(col, overflow="fold")
    for r in rows:
        uc = r["unit_cell"]
        cell = "-" if uc[0] != uc[0] else f"{uc[0]:.2f} {uc[1]:.2f} {uc[2]:.2f}"
        ang = "-" if uc[0] != uc[0] else f"{uc[3]:.1f} {uc[4]:.1f} {uc[5]:.1f}"
        st = r["status"]
        t.add_row(r["name"], r["kind"], f"[{colour.get(st, 'white')}]{st}[/]", str(r["n_spots"]), str(r["n_indexed"]),
                  str(r["n_refined"]), str(r["n_integrated"]), cell, ang, r["space_group"] or "-",
                  f"{_fmt(r['rmsd_x_px'])},{_fmt(r['rmsd_y_px'])}", _fmt(r["q_median_error"], 5),
                  ("yes" if r["validation_passed"] else "no") if r["status"] == "indexed" else "-",
                  r.get("strategy") or "-",
                  r["reason"] if len(r["reason"]) <= 90 else r["reason"][:87] + "...")
    console.print(t)


def _opt(name: str, *decls: str, **kw) -> Any:
    """A ``run`` option for the field ``name`` of :class:`StillsJob`: its default and help are the model's."""
    return typer.Option(field_default(StillsJob, name), *decls, help=field_help(StillsJob, name), **kw)


def _parse_sets(items: List[str]) -> dict:
    """``--set key=value`` items -> a dict (values read as YAML: numbers, true/false, lists)."""
    out: dict = {}
    for it in items:
        key, eq, val = it.partition("=")
        if not eq or not key.strip():
            _fail(f"--set expects key=value, got {it!r}")
        out[key.strip()] = yaml.safe_load(val)
    return out


def _load_config(path: Optional[Path]) -> dict:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"--config {path}: cannot read it ({exc})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        _fail(f"--config {path}: expected a mapping of stills-processor parameters, got {type(data).__name__}")
    return data


def job_params(ctx: typer.Context, config: Optional[Path], sets: List[str]) -> StillsJob:
    """The job's parameters: the model's defaults, then ``--config``, then ``--set``, then the options given on
    the command line (an option left at its default does not override the file)."""
    values = {**_load_config(config), **_parse_sets(sets)}
    for name in StillsJob.model_fields:
        source = ctx.get_parameter_source(name) if name in ctx.params else None  # typer's own click: by name
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            values[name] = ctx.params[name]
    try:
        return StillsJob.model_validate(values)
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'parameters'}: {e['msg']}" for e in exc.errors()[:5]))


@app.command()
def run(
    ctx: typer.Context,
    images: List[Path] = typer.Argument(..., help="Image files dxtbx reads (mini-CBF, full CBF, NeXus/HDF5 master, SMV). "
                                        "Stills are processed one image at a time; oscillation images are grouped into sequences."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: <name>.expt, <name>.refl, <name>_indexed.refl, summary.h5."),
    space_group: Optional[str] = _opt("space_group", "--space-group"),
    unit_cell: Optional[str] = _opt("unit_cell", "--unit-cell"),
    phil: List[str] = _opt("phil", "--phil"),
    nproc: int = _opt("nproc", "--nproc", "-j"),
    min_spots: int = _opt("min_spots", "--min-spots"),
    q_tolerance: float = _opt("q_tolerance", "--q-tolerance"),
    px_tolerance: float = _opt("px_tolerance", "--px-tolerance"),
    strategies: Optional[str] = _opt("strategies", "--strategies"),
    relaxed_sigma_b: float = _opt("relaxed_sigma_b", "--relaxed-sigma-b"),
    scan_varying: Optional[bool] = _opt("scan_varying", "--scan-varying/--scan-static"),
    integrate: bool = _opt("integrate", "--integrate/--no-integrate"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of job parameters (the keys of a bus "
                                          "job's params, mode auto); options given on the command line win."),
    set_: List[str] = typer.Option([], "--set", help="A job parameter key=value (repeatable; value read as YAML), "
                                   "applied after --config."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
):
    """Process IMAGES with DIALS; write per-image .expt/.refl and summary.h5 under --out.

    Exit code 0 when every input could be read (non-hits and images that do not index are
    reported in the summary, not errors), 1 when some input files were unreadable, 2 for usage errors.
    """
    params = job_params(ctx, config, set_)
    settings = params.settings()
    missing = [str(p) for p in images if not p.exists()]
    if missing and len(missing) == len(images):
        _fail(f"no input file exists: {', '.join(missing[:5])}")
    nproc = params.nproc or default_nproc()

    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[last]}"), console=console, disable=quiet)
    with progress:
        task = progress.add_task("routing", total=None, last="")

        def planned(units):
            progress.update(task, description=f"processing ({nproc} proc)", total=len(units))

        def done(i, row):
            progress.update(task, advance=1, last=f"{row['name']}: {row['status']}")

        rows, summary, metrics = run_job([str(p) for p in images], out, settings, nproc=nproc, on_planned=planned,
                                         on_done=done)
    if not quiet:
        print_table(rows, Console(width=None if sys.stdout.isatty() else 200))
        typer.echo(f"{metrics['n_indexed']} indexed, {metrics['n_non_hit']} non-hits, {metrics['n_failed']} failed, "
                   f"{metrics['n_error']} unreadable in {metrics['wall_s']:.1f} s; summary: {summary}")
        if metrics["n_fallback"]:
            typer.echo("indexed by strategy: " + ", ".join(f"{k} {v}" for k, v in metrics["n_indexed_by_strategy"].items()))
    for r in rows:
        if r["status"] == "error":
            typer.secho(f"error: {r['reason']}", fg=typer.colors.RED, err=True)
    if metrics["n_error"]:
        raise typer.Exit(1)


@app.command("frame-model")
def frame_model(
    model: Path = typer.Argument(..., help="A rotation sequence's refined experiment list (.expt from `run`, one "
                                 "experiment with a scan and a crystal; scan-varying or not)."),
    frame: Path = typer.Argument(..., help="One rotation image of the same sweep (inside or beyond the image range "
                                 "the model was refined on)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .expt: a one-image rotation experiment for FRAME."),
):
    """A one-image rotation experiment for FRAME from the sweep MODEL, without spot finding.

    FRAME's own imageset and scan (its header's start angle and oscillation width), the model's refined beam,
    detector and goniometer, and a scan-static crystal: for a scan-varying model and a frame inside its scan,
    the A matrix at the frame's centre (mean of its two scan points); otherwise the model's static A.
    Exit code 2 if FRAME is not of MODEL's sweep (another detector, template, width or start angle).
    """
    try:
        experiments, info = frame_experiment(model, frame)
    except FrameMismatch as exc:
        _fail(str(exc))
    with atomic_write_path(out) as tmp:
        experiments.as_json(str(tmp))
    inside = "inside" if info.inside_model_scan else "outside"
    typer.echo(f"{out}: image {info.frame_number}, phi {info.start_angle_deg:g} to "
               f"{info.start_angle_deg + info.increment_deg:g} deg ({inside} the model's images "
               f"{info.model_image_range[0]}-{info.model_image_range[1]}), crystal: {info.crystal_source}")


@app.command()
def show(summary: Path = typer.Argument(..., help="A summary.h5 written by `run` or the service.")):
    """Print the summary table of a finished job."""
    try:
        rows = read_summary(summary)
    except (OSError, ValueError, KeyError) as exc:
        _fail(f"{summary}: {exc}")
    print_table(rows, Console(width=None if sys.stdout.isatty() else 200))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
