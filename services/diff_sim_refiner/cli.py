"""diff-sim-refiner command line: ``nanobragg`` (nanoBragg's own flags), ``run`` (config file -> HDF5), ``serve``,
and the refinement commands (:mod:`.refine_cli`). Option defaults come from :mod:`.core.params`.

torch, the simulator (it imports torch) and rich are imported inside the commands so ``--help`` and flag errors are
fast (torch alone costs about a second of start-up).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
import typer

from diffractflow.cli import model_option, service_app, validated
from diffractflow.errors import InputError

from . import __version__
from .artifacts import load_job_config, write_simulation
from .core.io import FormatError
from .core.params import SimulateParams
from .nbargs import FlagError, build_job, parse_args
from .nbrun import run_nanobragg, tune_malloc
from .refine_cli import register as register_refine

app = service_app(
    "diff-sim-refiner", __version__, stage="diff_sim_refiner.worker:STAGE",
    help="Differentiable diffraction simulator with nanoBragg's physics (PyTorch).",
)


def _progress_factory():
    bar = Progress(TextColumn("rendering"), BarColumn(), TextColumn("{task.completed}/{task.total} px"),
                   TimeElapsedColumn(), transient=True)
    bar.__enter__()
    task = bar.add_task("render", total=None)

    def cb(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, cb


def _fast_exit() -> None:
    """End the process at once after a successful ``nanobragg`` run when it is the ``diff-sim-refiner``
    console script (every output file is closed by then): the interpreter's normal teardown with torch
    loaded (module clean-up, libtorch's static destructors) costs about 0.4 s of CPU for nothing.
    In-process callers (tests, ``CliRunner``) and DIFF_SIM_REFINER_NO_FAST_EXIT=1 keep the normal exit."""
    if os.path.basename(sys.argv[0]) != "diff-sim-refiner" or os.environ.get("DIFF_SIM_REFINER_NO_FAST_EXIT"):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # closed or broken pipe: nothing more can reach it anyway
            pass
    os._exit(0)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=True,
)
def nanobragg(ctx: typer.Context):
    """Render like the nanoBragg C program, taking its flags, e.g.

    diff-sim-refiner nanobragg -cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 100
    -detpixels 256 -pixel 0.1 -floatfile img.bin -nonoise -nopgm

    Units as nanoBragg: Angstrom (cell, -lambda), degrees (angles), mm (-distance, -pixel, -Xbeam,
    -detsize, -beamsize, -pix0_vector_mm), metres (-pix0_vector), photons/m^2 (-fluence), photons/s (-flux),
    mrad (divergence), percent (-dispersion).  -floatfile is raw float32 photons/pixel, slow-major, the
    full detector (zeros outside -roi).  Extensions: -spot_cutoff K (evaluate only near Bragg peaks),
    -spot_local K (render only the pixels within K fringes of a reflection; the others are 0), -float64, -threads N (default: torch's, or 1 when the machine is saturated).  Unknown or malformed
    flags exit with code 2.
    """
    argv = list(ctx.args)
    if not argv:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    try:
        run_nanobragg(argv, progress_factory=_progress_factory if sys.stderr.isatty() else None)
        _fast_exit()
    except FlagError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except FormatError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc.filename}: no such file", err=True)
        raise typer.Exit(2)


@app.command()
def run(
    config: Path = typer.Argument(..., exists=False, help="YAML or JSON simulation config (crystal/detector/beam "
                                  "sections in the units of the Python API: Angstrom, degrees, mm, photons/m^2)."),
    output: Path = typer.Option(Path("simulation.h5"), "--output", "-o", help="HDF5 artifact to write."),
    float64: bool = typer.Option(SimulateParams.model_fields["dtype"].default == "float64", "--float64",
                                 help="Render in double precision (default float32; the artifact is float32)."),
    spot_cutoff: Optional[float] = model_option(SimulateParams, "spot_cutoff", "--spot-cutoff",
                                                help="See the docs for the error bound."),
):
    """Render a simulation described by a config file into an HDF5 artifact (photons/pixel)."""
    params = validated(SimulateParams, {"dtype": "--float64"}, dtype="float64" if float64 else "float32",
                       spot_cutoff=spot_cutoff)
    tune_malloc()

    try:
        job = load_job_config(config)
    except (FormatError, InputError, OSError) as exc:
        typer.echo(f"error: {config}: {exc}", err=True)
        raise typer.Exit(2)
    # torch and the simulator (~1 s) only when rendering, not for --help or the other commands
    import torch

    from .core.simulator import simulate

    dtype = torch.float64 if params.dtype == "float64" else torch.float32
    with torch.no_grad():
        img = simulate(job.crystal, job.detector, job.beam, job.hkl, dtype=dtype, spot_cutoff=params.spot_cutoff)
    write_simulation(output, img.to(torch.float32).numpy(), job)
    typer.echo(f"wrote {output}: {img.shape[1]}x{img.shape[0]} pixels, sum {float(img.sum()):.6g} photons")


@app.command()
def geometry(
    args: Optional[List[str]] = typer.Argument(None, help="nanoBragg flags after '--', e.g. -- -xds -distance 150"),
):
    """Print the lab-frame detector vectors nanoBragg's flags give (m), without rendering."""
    try:
        job = build_job(parse_args(list(args or [])), read_tables=False)
    except FlagError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    from .core.geometry import detector_geometry  # imports torch (~1 s): only for this command

    g = detector_geometry(job.detector, job.beam)
    for name in ("fdet", "sdet", "odet", "pix0", "beam", "polar", "spindle"):
        v = getattr(g, name).tolist()
        typer.echo(f"{name:8s} {v[0]: .9g} {v[1]: .9g} {v[2]: .9g}")
    typer.echo(f"distance {float(g.distance):.9g}  close_distance {float(g.close_distance):.9g}  "
               f"ORGX {g.orgx:.6g}  ORGY {g.orgy:.6g}")


register_refine(app)

__all__ = ["app"]
