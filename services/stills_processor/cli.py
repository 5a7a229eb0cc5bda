"""Command line: ``stills-processor run`` (images in, DIALS files + summary.h5 out), ``frame-model`` (one
rotation frame's experiment from a sweep model), ``show``, ``serve``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__

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
    from rich.console import Console
    from rich.table import Table

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


@app.command()
def run(
    images: List[Path] = typer.Argument(..., help="Image files dxtbx reads (mini-CBF, full CBF, NeXus/HDF5 master, SMV). "
                                        "Stills are processed one image at a time; oscillation images are grouped into sequences."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: <name>.expt, <name>.refl, <name>_indexed.refl, summary.h5."),
    space_group: Optional[str] = typer.Option(None, "--space-group", help="Known space group for indexing, e.g. P41212."),
    unit_cell: Optional[str] = typer.Option(None, "--unit-cell", help="Known cell a,b,c,alpha,beta,gamma (Angstrom, degrees)."),
    phil: List[str] = typer.Option([], "--phil", help="Any DIALS parameter KEY=VALUE (repeatable), e.g. spotfinder.threshold.dispersion.gain=1.5."),
    nproc: int = typer.Option(0, "--nproc", "-j", help="Worker processes, each keeping DIALS loaded (0 = all CPUs)."),
    min_spots: int = typer.Option(16, "--min-spots", help="Fewer strong spots than this: reported as a non-hit, not indexed."),
    q_tolerance: float = typer.Option(0.005, "--q-tolerance", help="Validation bound on the median |q_obs - q_pred| (1/Angstrom)."),
    px_tolerance: float = typer.Option(2.0, "--px-tolerance", help="Validation bound on the median detector offset (pixels)."),
    strategies: Optional[str] = typer.Option(None, "--strategies", help="Comma-separated processing strategies tried in "
                                             "order on a still until one indexes it (default: all, "
                                             "default,radial_profile,strict_spots,fixed_detector,dials_index)."),
    relaxed_sigma_b: float = typer.Option(0.5, "--relaxed-sigma-b", help="A still whose profile sigma_b exceeds DIALS' "
                                          "0.1 deg cut-off is still integrated below this (deg; 0 = no relaxation)."),
    scan_varying: Optional[bool] = typer.Option(None, "--scan-varying/--scan-static", help="Rotation sequences: "
                                                "refine static then scan-varying (--scan-varying), or scan-static "
                                                "only (--scan-static). Default: dials.refine's own (static, then "
                                                "scan-varying)."),
    integrate: bool = typer.Option(True, "--integrate/--no-integrate", help="Rotation sequences: integrate the "
                                   "Bragg reflections (--no-integrate stops after refinement; stills always "
                                   "integrate)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
):
    """Process IMAGES with DIALS; write per-image .expt/.refl and summary.h5 under --out.

    Exit code 0 when every input could be read (non-hits and images that do not index are
    reported in the summary, not errors), 1 when some input files were unreadable, 2 for usage errors.
    """
    from .batch import default_nproc, run_job
    from .core.params import (DEFAULT_STRATEGIES, PhilError, ProcessingSettings, Symmetry, check_space_group,
                              check_strategies, parse_unit_cell, validate_phil)

    try:
        sg = check_space_group(space_group) if space_group else None
        uc = parse_unit_cell(unit_cell) if unit_cell else None
        strats = check_strategies(strategies.split(",")) if strategies is not None else DEFAULT_STRATEGIES
    except ValueError as exc:
        _fail(str(exc))
    if min_spots < 1 or q_tolerance <= 0 or px_tolerance <= 0 or relaxed_sigma_b < 0:
        _fail("--min-spots must be >= 1, the tolerances > 0 and --relaxed-sigma-b >= 0")
    settings = ProcessingSettings(symmetry=Symmetry(sg, uc), phil=tuple(phil), min_spots=min_spots,
                                  q_tolerance=q_tolerance, px_tolerance=px_tolerance, strategies=strats,
                                  relaxed_sigma_b_cutoff=relaxed_sigma_b or None, scan_varying=scan_varying,
                                  integrate_sequences=integrate)
    try:
        if phil:
            validate_phil(settings)
    except PhilError as exc:
        _fail(str(exc))
    missing = [str(p) for p in images if not p.exists()]
    if missing and len(missing) == len(images):
        _fail(f"no input file exists: {', '.join(missing[:5])}")
    nproc = nproc or default_nproc()

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    from diffractflow.artifacts import atomic_write_path

    from .core.sweep import FrameMismatch, frame_experiment

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
    from rich.console import Console

    from .artifacts import read_summary

    try:
        rows = read_summary(summary)
    except (OSError, ValueError, KeyError) as exc:
        _fail(f"{summary}: {exc}")
    print_table(rows, Console(width=None if sys.stdout.isatty() else 200))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
