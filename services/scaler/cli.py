"""``scaler`` command line: relative scaling (seed 003) and absolute scaling (seed 002 phase 4).

Options, their defaults and help come from :mod:`scaler.core.params` (the bus worker's models)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from diffractflow.cli import model_option, service_app, validated
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from . import __version__
from .artifacts import InputError
from .core.errors import DisabledComponentAccess, ParameterLimitExceeded, RefinementFailure, SmootherNotIdentifiable
from .core.params import AbsoluteParams, RelativeParams
from .pipeline import run_absolute, run_relative

app = service_app("scaler", __version__, stage="scaler.worker:STAGE",
                  help="Relative (per-still) and absolute scaling of diffuse scattering observations.")


def _fail(msg: str, code: int = 1):
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


#: model field -> its option, where the names differ
FLAGS = {"convergence_tolerance": "--tolerance", "minimizer_type": "--minimizer", "q_range": "--q-min/--q-max",
         "extra_formula": "--solvent"}

R, A = RelativeParams, AbsoluteParams


@app.command()
def run(
    observations: Path = typer.Option(..., "--observations", "-i", help="Observation table HDF5 (1-D still_id, voxel_id, "
                                      "q_magnitude [|s| = 1/d, 1/Å], intensity, sigma), e.g. voxel-merger observations.h5."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: scales.json, statistics.json, PNG plots."),
    smoother: bool = model_option(R, "smoother", "--smoother/--no-smoother"),
    n_control_points: int = model_option(R, "n_control_points", "--n-control-points"),
    q_min: Optional[float] = typer.Option(None, "--q-min", help="Smoother range start, |s| in 1/Å (default: data minimum)."),
    q_max: Optional[float] = typer.Option(None, "--q-max", help="Smoother range end, |s| in 1/Å (default: data maximum)."),
    smoothness_weight: float = model_option(R, "smoothness_weight", "--smoothness-weight"),
    max_iterations: int = model_option(R, "max_iterations", "--max-iterations"),
    tolerance: float = model_option(R, "convergence_tolerance", "--tolerance"),
    minimizer: str = model_option(R, "minimizer_type", "--minimizer"),
    outlier_zmax: float = model_option(R, "outlier_zmax", "--outlier-zmax", help="0 = off."),
    refl: Optional[list[Path]] = typer.Option(None, "--refl", help="Bragg references: a stills-processor <name>.refl "
                                              "(its <name>.expt beside it); repeatable. Matched to the table's still_names."),
    partiality_threshold: float = model_option(R, "partiality_threshold", "--partiality-threshold"),
    rlp_sigma: Optional[float] = model_option(R, "rlp_sigma", "--rlp-sigma"),
    space_group: Optional[str] = model_option(R, "space_group", "--space-group"),
    min_information: float = model_option(R, "smoother_min_information", "--smoother-min-information"),
    sequences_file: Optional[Path] = typer.Option(None, "--sequences", help="JSON {sweep id: [still name, ...]} of "
                                                  "rotation sweeps (the table's still_names in rotation order); their "
                                                  "frame scales are restrained to vary smoothly along the rotation."),
    rotation_smoothness: float = model_option(R, "rotation_smoothness", "--rotation-smoothness"),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the PNG plots."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Refine one multiplicative scale b per still (I_obs ≈ b·I_ref) and write scales.json + statistics.json."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)
    if (q_min is None) != (q_max is None):
        _fail("give both --q-min and --q-max, or neither", 2)
    sequences = None
    if sequences_file is not None:
        try:
            sequences = json.loads(sequences_file.read_text())
        except (OSError, ValueError) as exc:
            _fail(f"{sequences_file}: not a JSON file of rotation sequences ({exc})", 2)
        if not isinstance(sequences, dict):
            _fail(f"{sequences_file}: expected a JSON object {{sweep id: [still name, ...]}}", 2)
    params = validated(
        RelativeParams, FLAGS, smoother=smoother, n_control_points=n_control_points,
        q_range=(q_min, q_max) if q_min is not None else None, smoothness_weight=smoothness_weight,
        max_iterations=max_iterations, convergence_tolerance=tolerance, minimizer_type=minimizer,
        outlier_zmax=outlier_zmax or None, partiality_threshold=partiality_threshold, rlp_sigma=rlp_sigma,
        space_group=space_group, smoother_min_information=min_information, sequences=sequences,
        rotation_smoothness=rotation_smoothness)
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as pb:
            task = pb.add_task("reading + indexing observations", total=None)

            def progress(it, r):
                pb.update(task, description=f"iteration {it}: R = {r:.5f}")

            paths, stats = run_relative(observations, out, params, plots=not no_plots, progress=progress,
                                        bragg=[(p, None) for p in refl] if refl else None)
    except (ParameterLimitExceeded, DisabledComponentAccess, SmootherNotIdentifiable) as exc:
        _fail(exc.describe(), 2)
    except RefinementFailure as exc:  # not an input error (see core.errors), but a clear message here
        _fail(exc.describe(), 1)
    except InputError as exc:
        _fail(str(exc), 2)
    typer.echo(json.dumps({k: stats[k] for k in ("n_iterations", "final_r_factor", "convergence_achieved",
                                                   "parameter_shifts", "n_stills", "n_observations")}, indent=2))
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command()
def absolute(
    map_file: Path = typer.Option(..., "--map", "-m", help="Relatively scaled merged map (voxel-merger map.h5) or HDF5 "
                                  "with 1-D q_magnitude (1/Å) + intensity."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: absolute_map.h5, absolute.json, PNG."),
    formula: Optional[str] = model_option(A, "formula", "--formula"),
    sequence: Optional[str] = model_option(A, "sequence", "--sequence"),
    pdb: Optional[Path] = typer.Option(None, "--pdb", help="PDB/mmCIF model: contents x space-group order, cell volume."),
    copies: float = model_option(A, "copies", "--copies"),
    extra_formula: Optional[str] = model_option(A, "extra_formula", "--solvent"),
    cell_volume: Optional[float] = model_option(A, "cell_volume", "--cell-volume"),
    wavelength: Optional[float] = model_option(A, "wavelength", "--wavelength"),
    bragg: Optional[Path] = typer.Option(None, "--bragg", help="Bragg intensities on the same relative scale "
                                         "(DIALS .refl or HDF5 with intensity + d/q_magnitude)."),
    n_shells: int = model_option(A, "n_shells", "--n-shells"),
):
    """Put a merged map on electron units per unit cell (Krogh-Moe / Norman) and subtract Compton scattering."""
    params = validated(AbsoluteParams, FLAGS, formula=formula, sequence=sequence, copies=copies, extra_formula=extra_formula,
                        cell_volume=cell_volume, wavelength=wavelength, n_shells=n_shells)
    try:
        paths, res = run_absolute(map_file, out, params, pdb=pdb, bragg=bragg)
    except (InputError, FileNotFoundError) as exc:
        _fail(str(exc), 2)
    typer.echo(json.dumps({k: res[k] for k in ("scale", "theory_integral", "forward_term", "observed_integral",
                                                "F000", "cell_volume")}, indent=2))
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")
