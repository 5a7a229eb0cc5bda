"""Refinement commands of diff-sim-refiner: ``refine-demo`` (seed 001) and ``refine`` (general refiner).

Registered onto the service's typer app by :func:`register`. ``refine``'s defaults and checks are
:class:`~.core.params.RefineParams`'s, the bus job's model. torch and the refine package (it imports torch) are
imported inside the commands so the CLI starts fast.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from diffractflow.artifacts import sha256_file
from diffractflow.cli import model_option, validated
from diffractflow.errors import InputError

from .artifacts import load_job_config
from .core.io import FormatError
from .core.params import DemoParams, RefineParams
from .nbrun import tune_malloc

#: RefineParams field -> the option as typed, where they differ
_FLAGS = {"dtype": "--float32"}


def _parse_init(items: List[str]) -> dict:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--init expects NAME=V[,V...], got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = [float(x) for x in v.split(",") if x.strip()]
    return out


def _parse_bounds(items: List[str]) -> dict:
    """NAME=LO:HI[,LO:HI...]"""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--bounds expects NAME=LO:HI[,LO:HI...], got {it!r}")
        k, v = it.split("=", 1)
        pairs = []
        for part in v.split(","):
            lo, hi = part.split(":")
            pairs.append((float(lo), float(hi)))
        out[k.strip()] = pairs
    return out


def _progress(total: int, label: str):
    """A rich progress bar and a refinement callback advancing it (shows the loss)."""
    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TimeElapsedColumn(), transient=False, disable=not sys.stderr.isatty())
    task = bar.add_task(label, total=total, loss="-")

    def cb(it, loss, values):
        bar.update(task, completed=min(it + 1, total), loss=f"{loss:.4e}")

    return bar, cb


def register(app: typer.Typer) -> None:
    """Add ``refine-demo`` and ``refine`` to the service's app."""

    @app.command("refine-demo")
    def refine_demo(
        out: Path = typer.Option(Path("refine_demo"), "--out", "-o", help="Output directory (history.json, "
                                 "summary.json, refinement_demo.png)."),
        iterations: int = model_option(DemoParams, "iterations", "--iterations"),
        lr: float = model_option(DemoParams, "lr", "--lr"),
        lbfgs_steps: int = model_option(DemoParams, "lbfgs_steps", "--lbfgs-steps"),
    ):
        """Seed 001: recover mosaic spread (0.8 deg) and misset (5, 3, -2) deg from a synthetic image,
        starting at 0.2 deg and (0, 0, 0). Exit 0 only if the seed's success criteria hold."""
        p = validated(DemoParams, iterations=iterations, lr=lr, lbfgs_steps=lbfgs_steps)
        # torch and the refiner (~1-2 s) only when a command runs, not for --help
        import torch

        from .refine.demo import results_table, run_demo, write_demo_outputs

        tune_malloc()

        console = Console()
        torch.set_num_threads(1)  # 64x64 pixels: threads only add overhead on a busy 2-core machine
        total = p.iterations + p.lbfgs_steps + 1
        bar, cb = _progress(total, "refining")
        with bar:
            outcome = run_demo(adam_iterations=p.iterations, lr=p.lr, lbfgs_steps=p.lbfgs_steps, callback=cb)
        paths = write_demo_outputs(outcome, out)
        r = outcome.result
        console.print(results_table(outcome))
        console.print(f"Convergence: initial loss {r.loss_initial:.4e}, final loss {r.loss_final:.4e}, "
                      f"reduction {r.loss_reduction:.3g}x; {r.iterations} iterations, {r.evaluations} "
                      f"evaluations, {r.wall_seconds:.1f} s")
        for k, ok in outcome.criteria.items():
            console.print(f"  {'PASS' if ok else 'FAIL'}  {k}")
        console.print(f"wrote {paths['history']}, {paths['summary']}, {paths['figure']}")
        if not outcome.passed:
            raise typer.Exit(1)

    @app.command("refine")
    def refine_cmd(
        target: Path = typer.Option(..., "--target", help="Target image, photons per pixel (slow x fast): .npy, "
                                    ".h5 (e.g. a simulation artifact), .tif, .img/.smv or raw float32 .bin."),
        config: Path = typer.Option(..., "--config", help="Starting model: the YAML/JSON simulation config of "
                                    "`run` (Angstrom, degrees, mm, photons/m^2)."),
        params: str = model_option(RefineParams, "params", "--params",
                                   default=",".join(RefineParams.model_fields["params"].get_default(
                                       call_default_factory=True)), help="Comma-separated."),
        mask: Optional[Path] = typer.Option(None, "--mask", help="Mask image, non-zero = use the pixel."),
        optimizer: str = model_option(RefineParams, "optimizer", "--optimizer"),
        iterations: int = model_option(RefineParams, "iterations", "--iterations"),
        lr: float = model_option(RefineParams, "lr", "--lr", help="(1 deg angles, 0.1 A / 0.1 deg cell, 1 cell N, "
                                 "1 mm distance, 0.1 mm beam centre, log-scale)"),
        lbfgs_steps: int = model_option(RefineParams, "lbfgs_steps", "--lbfgs-steps"),
        loss: str = model_option(RefineParams, "loss", "--loss"),
        init: Optional[List[str]] = typer.Option(None, "--init", help="Override a start value: NAME=V[,V...], "
                                                 "e.g. --init misset=0,0,0 (physical units)."),
        bounds: Optional[List[str]] = typer.Option(None, "--bounds", help="NAME=LO:HI[,LO:HI...]"),
        float32: bool = typer.Option(RefineParams.model_fields["dtype"].default == "float32", "--float32",
                                     help="Compute in float32 (default float64)."),
        out: Path = typer.Option(Path("refinement"), "--out", "-o", help="Output directory: refined_model.h5, "
                                 "history.json, convergence.png, summary.json."),
    ):
        """Refine chosen simulator parameters against a target image (masked MSE or Poisson loss)."""
        try:
            init_d, bounds_d = _parse_init(init), _parse_bounds(bounds)
        except ValueError as exc:   # float() of the user's text, or a malformed NAME=... item
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        p = validated(RefineParams, _FLAGS, params=[t for t in params.split(",") if t.strip()], optimizer=optimizer,
                      iterations=iterations, lr=lr, lbfgs_steps=lbfgs_steps, loss=loss, init=init_d, bounds=bounds_d,
                      dtype="float32" if float32 else "float64")

        # the refiner imports torch (~1-2 s): only when the command runs, not for --help
        from .refine.artifacts import plot_convergence, write_history, write_refinement
        from .refine.images import read_image, read_mask
        from .refine.refiner import Refiner, RefinementError, RefineSettings

        tune_malloc()
        console = Console()
        try:
            job = load_job_config(config)
        except (FormatError, InputError, OSError) as exc:
            typer.echo(f"error: {config}: {exc}", err=True)
            raise typer.Exit(2)
        shape = (job.detector.spixels, job.detector.fpixels)
        try:
            tgt = read_image(target, shape).astype(np.float64)
            m = read_mask(mask, shape) if mask is not None else None
        except FormatError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        settings = RefineSettings.from_params(p)
        try:
            refiner = Refiner.from_params(job.crystal, job.detector, job.beam, tgt, p, hkl=job.hkl, mask=m)
        except ValueError as exc:   # the constructor's refusals of its arguments (as in refine.worker)
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        n_steps = (p.iterations if "adam" in settings.optimizer else 0) + \
            (p.lbfgs_steps if "lbfgs" in settings.optimizer else 0) + 1
        bar, cb = _progress(n_steps, "refining")
        try:
            with bar:
                result = refiner.run(settings, callback=cb)
        except RefinementError as exc:
            typer.echo(f"error: refinement failed: {exc}", err=True)
            raise typer.Exit(1)
        out.mkdir(parents=True, exist_ok=True)
        model = refiner.model_image()
        inputs = {"target": sha256_file(target), "config": sha256_file(config)}
        if mask is not None:
            inputs["mask"] = sha256_file(mask)
        write_refinement(out / "refined_model.h5", result, model, tgt, refiner.mask.numpy(), inputs=inputs)
        write_history(out / "history.json", result.history)
        write_history(out / "summary.json", result.summary())
        plot_convergence(result, out / "convergence.png")
        table = Table(title="refinement")
        for col in ("parameter", "initial", "refined", "units"):
            table.add_column(col)
        for lab in result.labels:
            table.add_row(lab, f"{result.initial[lab]:.6g}", f"{result.final[lab]:.6g}", result.units[lab])
        console.print(table)
        console.print(f"loss {result.loss_initial:.4e} -> {result.loss_final:.4e} ({result.loss_reduction:.3g}x), "
                      f"{result.iterations} iterations, {result.evaluations} evaluations, {result.wall_seconds:.1f} s")
        console.print(f"wrote {out / 'refined_model.h5'}, history.json, summary.json, convergence.png")
        if not result.finite:
            raise typer.Exit(1)


__all__ = ["register"]
