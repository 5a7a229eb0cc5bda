"""``scaler`` command line: relative scaling (seed 003) and absolute scaling (seed 002 phase 4)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from diffractflow.cli import service_app

from . import __version__

app = service_app("scaler", __version__, stage="scaler.worker:STAGE",
                  help="Relative (per-still) and absolute scaling of diffuse scattering observations.")


def _fail(msg: str, code: int = 1):
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def run(
    observations: Path = typer.Option(..., "--observations", "-i", help="Observation table HDF5 (1-D still_id, voxel_id, "
                                      "q_magnitude [|s| = 1/d, 1/Å], intensity, sigma), e.g. voxel-merger observations.h5."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: scales.json, statistics.json, PNG plots."),
    smoother: bool = typer.Option(False, "--smoother/--no-smoother", help="Enable the shared resolution smoother g(|q|)."),
    n_control_points: int = typer.Option(3, "--n-control-points", help="Smoother control points (2..5; > 5 is refused)."),
    q_min: Optional[float] = typer.Option(None, "--q-min", help="Smoother range start, |s| in 1/Å (default: data minimum)."),
    q_max: Optional[float] = typer.Option(None, "--q-max", help="Smoother range end, |s| in 1/Å (default: data maximum)."),
    smoothness_weight: float = typer.Option(1e-2, "--smoothness-weight", help="Second-difference restraint weight "
                                            "(relative to the data curvature)."),
    max_iterations: int = typer.Option(30, "--max-iterations", help="Maximum refinement cycles."),
    tolerance: float = typer.Option(1e-6, "--tolerance", help="Convergence: R-factor change between cycles."),
    minimizer: str = typer.Option("lm", "--minimizer", help="lm (Levenberg-Marquardt) or gauss_newton."),
    outlier_zmax: float = typer.Option(6.0, "--outlier-zmax", help="Reject |normalised deviation| > this between "
                                       "cycles (0 = off)."),
    refl: Optional[list[Path]] = typer.Option(None, "--refl", help="Bragg references: a stills-processor <name>.refl "
                                              "(its <name>.expt beside it); repeatable. Matched to the table's still_names."),
    partiality_threshold: float = typer.Option(0.1, "--partiality-threshold", help="Seed 003 P_min: Bragg observations "
                                               "with a smaller partiality are not used."),
    rlp_sigma: Optional[float] = typer.Option(None, "--rlp-sigma", help="Rocking-curve width in the excitation error "
                                              "(1/Å); default: estimated per still."),
    space_group: Optional[str] = typer.Option(None, "--space-group", help="Asymmetric unit for the Bragg Miller indices "
                                              "(default: each crystal model's space group)."),
    min_information: float = typer.Option(1e-3, "--smoother-min-information", help="Refuse the smoother when the data's "
                                          "relative information on its shape is below this."),
    sequences_file: Optional[Path] = typer.Option(None, "--sequences", help="JSON {sweep id: [still name, ...]} of "
                                                  "rotation sweeps (the table's still_names in rotation order); their "
                                                  "frame scales are restrained to vary smoothly along the rotation."),
    rotation_smoothness: float = typer.Option(1.0, "--rotation-smoothness", help="Second-difference restraint weight on "
                                              "ln b along a sweep, relative to one frame's information (0 = free)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the PNG plots."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Refine one multiplicative scale b per still (I_obs ≈ b·I_ref) and write scales.json + statistics.json."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .artifacts import InputError
    from .core.errors import (DisabledComponentAccess, ParameterLimitExceeded, RefinementFailure,
                              SmootherNotIdentifiable)
    from .pipeline import run_relative

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)
    if minimizer not in ("lm", "gauss_newton"):
        _fail(f"--minimizer must be lm or gauss_newton, got {minimizer!r}", 2)
    if (q_min is None) != (q_max is None):
        _fail("give both --q-min and --q-max, or neither", 2)
    q_range = (q_min, q_max) if q_min is not None else None
    if rotation_smoothness < 0:
        _fail("--rotation-smoothness must be >= 0", 2)
    sequences = None
    if sequences_file is not None:
        try:
            sequences = json.loads(sequences_file.read_text())
        except (OSError, ValueError) as exc:
            _fail(f"{sequences_file}: not a JSON file of rotation sequences ({exc})", 2)
        if not isinstance(sequences, dict):
            _fail(f"{sequences_file}: expected a JSON object {{sweep id: [still name, ...]}}", 2)
    refinement = {"max_iterations": max_iterations, "convergence_tolerance": tolerance, "minimizer_type": minimizer,
                  "outlier_zmax": outlier_zmax or None}
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as pb:
            task = pb.add_task("reading + indexing observations", total=None)

            def progress(it, r):
                pb.update(task, description=f"iteration {it}: R = {r:.5f}")

            paths, stats = run_relative(observations, out, smoother=smoother, n_control_points=n_control_points,
                                        q_range=q_range, smoothness_weight=smoothness_weight, refinement=refinement,
                                        plots=not no_plots, progress=progress,
                                        bragg=[(p, None) for p in refl] if refl else None,
                                        partiality_threshold=partiality_threshold, rlp_sigma=rlp_sigma,
                                        space_group=space_group, min_information=min_information,
                                        sequences=sequences, rotation_smoothness=rotation_smoothness)
    except (ParameterLimitExceeded, DisabledComponentAccess, SmootherNotIdentifiable) as exc:
        _fail(exc.describe(), 2)
    except RefinementFailure as exc:
        _fail(exc.describe(), 1)
    except (InputError, ValueError) as exc:
        _fail(str(exc), 2)
    typer.echo(json.dumps({k: stats[k] for k in ("n_iterations", "final_r_factor", "convergence_achieved",
                                                   "parameter_shifts", "n_stills", "n_observations")}, indent=2))
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command()
def absolute(
    map_file: Path = typer.Option(..., "--map", "-m", help="Relatively scaled merged map (voxel-merger map.h5) or HDF5 "
                                  "with 1-D q_magnitude (1/Å) + intensity."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: absolute_map.h5, absolute.json, PNG."),
    formula: Optional[str] = typer.Option(None, "--formula", help="Unit-cell contents as a formula, e.g. "
                                          "'C400H640N110O120S4(H2O)900' (per cell, x --copies)."),
    sequence: Optional[str] = typer.Option(None, "--sequence", help="Protein sequence (one-letter or FASTA file); "
                                           "--copies chains per unit cell."),
    pdb: Optional[Path] = typer.Option(None, "--pdb", help="PDB/mmCIF model: contents x space-group order, cell volume."),
    copies: float = typer.Option(1.0, "--copies", help="Copies of --formula / --sequence per unit cell."),
    extra_formula: Optional[str] = typer.Option(None, "--solvent", help="Extra per-cell contents, e.g. '(H2O)1200'."),
    cell_volume: Optional[float] = typer.Option(None, "--cell-volume", help="Unit-cell volume in Å^3 (default: from map/PDB)."),
    wavelength: Optional[float] = typer.Option(None, "--wavelength", help="Å; adds f', f'' (Henke) and the Breit-Dirac "
                                               "factor to the Compton term."),
    bragg: Optional[Path] = typer.Option(None, "--bragg", help="Bragg intensities on the same relative scale "
                                         "(DIALS .refl or HDF5 with intensity + d/q_magnitude)."),
    n_shells: int = typer.Option(30, "--n-shells", help="Resolution shells for the sum rule."),
):
    """Put a merged map on electron units per unit cell (Krogh-Moe / Norman) and subtract Compton scattering."""
    from .artifacts import InputError
    from .pipeline import run_absolute

    try:
        paths, res = run_absolute(map_file, out, formula=formula, sequence=sequence, pdb=pdb, copies=copies,
                                  extra_formula=extra_formula, cell_volume=cell_volume, wavelength=wavelength,
                                  bragg=bragg, n_shells=n_shells)
    except (InputError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc), 2)
    typer.echo(json.dumps({k: res[k] for k in ("scale", "theory_integral", "forward_term", "observed_integral",
                                                "F000", "cell_volume")}, indent=2))
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")
