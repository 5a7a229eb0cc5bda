"""Command line: ``diffuse-extractor run`` (files in, files out), ``background``, ``inspect``, ``serve``.

Options, their defaults and help come from :mod:`diffuse_extractor.core.params` (the bus worker's models)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.progress import Progress

from diffractflow.cli import model_option, service_app, validated

from . import __version__, diagnostics, pipeline
from .artifacts import InputError, load_experiments, read_still
from .core.params import BackgroundJob, ExtractJob, extraction_params

app = service_app("diffuse-extractor", __version__, stage="diffuse_extractor.worker:STAGE",
                  help="Masks, physical corrections and per-still {q, I, sigma} tables from DIALS stills.")

E, B = ExtractJob, BackgroundJob
#: model field -> its option, where the names differ
FLAGS = {"image_indices": "--image-index", "all_images": "--all", "mask_shapes": "--mask", "detect_arm": "--arm/--no-arm",
         "bragg_radius_px": "--bragg-radius", "bragg_delpsi_max": "--bragg-delpsi", "pngs": "--png/--no-png",
         "bin_px": "--bin", "smooth_bins": "--smooth"}


def _beamstop(values: List[str]):
    return values[0].lower() if len(values) == 1 and values[0].lower() in ("auto", "none") else values


@app.command()
def run(
    expt: Path = typer.Option(..., "--expt", help="Refined DIALS experiment list (.expt); its images must be readable."),
    out: Path = typer.Option(..., "--out", help="Output directory (created): one HDF5 per still plus PNGs."),
    refl: Optional[Path] = typer.Option(None, "--refl", help="DIALS reflections (.refl, strong or integrated): observed spots are masked and size the Bragg mask."),
    image_index: List[int] = model_option(E, "image_indices", "--image-index", help="Repeat for several."),
    all_images: bool = model_option(E, "all_images", "--all"),
    beamstop: List[str] = model_option(E, "beamstop", "--beamstop", default=["auto"], help="Repeat for disk and arm."),
    detect_arm: bool = model_option(E, "detect_arm", "--arm/--no-arm"),
    mask_shape: List[str] = model_option(E, "mask_shapes", "--mask", help="Repeatable."),
    background: Optional[Path] = typer.Option(None, "--background", help="Background: an artifact of 'diffuse-extractor background' (scaled to each still by exposure time x transmission from the headers, variance propagated), or an image (dxtbx-readable, or .npy for one panel) in counts; subtracted before correction."),
    background_scale: float = model_option(E, "background_scale", "--background-scale"),
    isotropic_background: bool = model_option(E, "isotropic_background", "--isotropic-background"),
    lorentz: bool = model_option(E, "lorentz", "--lorentz/--no-lorentz"),
    d_min: Optional[float] = model_option(E, "d_min", "--d-min"),
    bragg_radius: Optional[float] = model_option(E, "bragg_radius_px", "--bragg-radius"),
    bragg_delpsi: float = model_option(E, "bragg_delpsi_max", "--bragg-delpsi"),
    outlier_nsigma: float = model_option(E, "outlier_nsigma", "--outlier-nsigma", help="0 = off."),
    gain: float = model_option(E, "gain", "--gain"),
    air_path_fraction: float = model_option(E, "air_path_fraction", "--air-path-fraction"),
    hot_dead: bool = model_option(E, "hot_dead", "--hot-dead/--no-hot-dead", help="From the selected stills' statistics."),
    pngs: bool = model_option(E, "pngs", "--png/--no-png"),
):
    """Extract the diffuse signal of one or more stills: per-pixel q, fractional hkl, corrected I and sigma."""
    job = validated(ExtractJob, FLAGS, image_indices=list(image_index), all_images=all_images, beamstop=_beamstop(beamstop),
                    detect_arm=detect_arm, mask_shapes=list(mask_shape), background_scale=background_scale,
                    isotropic_background=isotropic_background, lorentz=lorentz, bragg_radius_px=bragg_radius,
                    bragg_delpsi_max=bragg_delpsi, outlier_nsigma=outlier_nsigma or None, gain=gain,
                    air_path_fraction=air_path_fraction, hot_dead=hot_dead, pngs=pngs, d_min=d_min)
    try:
        indices = list(range(len(load_experiments(expt)))) if job.all_images else job.image_indices
        with Progress(transient=True) as prog:
            task = prog.add_task("extracting stills", total=len(indices))
            results = pipeline.process(expt, out, refl_path=refl, image_indices=indices, params=extraction_params(job),
                                       background_path=background, hot_dead=job.hot_dead, pngs=job.pngs,
                                       progress=lambda: prog.advance(task))
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    for r in results:
        typer.echo(f"still {r['index']}: {r['n_pixels']} pixels -> {r['artifact']}")


@app.command("background")
def background_cmd(
    frames: List[Path] = typer.Argument(..., help="Background-only frames (no crystal, same geometry as the stills), dxtbx-readable."),
    out: Path = typer.Option(..., "--out", help="Output HDF5 background artifact (give it to 'run --background')."),
    bin_px: int = model_option(B, "bin_px", "--bin"),
    smooth: float = model_option(B, "smooth_bins", "--smooth"),
    outlier_nsigma: float = model_option(B, "outlier_nsigma", "--outlier-nsigma"),
    beamstop: List[str] = model_option(B, "beamstop", "--beamstop", default=["auto"]),
    mask_shape: List[str] = model_option(B, "mask_shapes", "--mask", help="Repeatable."),
    gain: float = model_option(B, "gain", "--gain"),
):
    """Estimate a smooth background (counts per frame and its variance) from background-only frames."""
    job = validated(BackgroundJob, FLAGS, bin_px=bin_px, smooth_bins=smooth, outlier_nsigma=outlier_nsigma,
                    beamstop=_beamstop(beamstop), mask_shapes=list(mask_shape), gain=gain)
    try:
        path, info = pipeline.make_background(frames, out, job)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{info['n_frames']} frames, mean {info['mean_counts_per_frame']:.3g} counts/pixel/frame -> {path}")


@app.command()
def inspect(
    artifact: Path = typer.Argument(..., help="A diffuse-extractor HDF5 artifact."),
    png_dir: Optional[Path] = typer.Option(None, "--png", help="Also write masks / corrected / radial PNGs here."),
):
    """Summarise an artifact: provenance, mask counts, ranges of q, I, sigma and each correction."""
    try:
        a = read_still(artifact)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(diagnostics.summarise(a))
    if png_dir is not None:
        px = a["pixels"]
        raw = []
        for i, f in enumerate(a["masks"]):
            img = np.zeros(f.shape, np.float32)
            sel = px["panel"] == i
            img[px["y"][sel], px["x"][sel]] = px["raw"][sel]
            raw.append(img)
        paths = diagnostics.write_pngs(png_dir, raw, a["masks"], px, stem=artifact.stem)
        for p in paths.values():
            typer.echo(f"wrote {p}")
