"""Command line: ``diffuse-extractor run`` (files in, files out), ``inspect``, ``serve``."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from diffractflow.cli import service_app

from . import __version__

app = service_app("diffuse-extractor", __version__, stage="diffuse_extractor.worker:STAGE",
                  help="Masks, physical corrections and per-still {q, I, sigma} tables from DIALS stills.")


def _shapes(texts: List[str], what: str):
    from .core.masks import Shape

    out = []
    for t in texts:
        try:
            out.append(Shape.parse(t))
        except ValueError as exc:
            typer.echo(f"error: {what}: {exc}", err=True)
            raise typer.Exit(2)
    return out


@app.command()
def run(
    expt: Path = typer.Option(..., "--expt", help="Refined DIALS experiment list (.expt); its images must be readable."),
    out: Path = typer.Option(..., "--out", help="Output directory (created): one HDF5 per still plus PNGs."),
    refl: Optional[Path] = typer.Option(None, "--refl", help="DIALS reflections (.refl, strong or integrated): observed spots are masked and size the Bragg mask."),
    image_index: List[int] = typer.Option([0], "--image-index", help="Experiment (still) index in the .expt; repeat for several."),
    all_images: bool = typer.Option(False, "--all", help="Process every experiment in the .expt."),
    beamstop: List[str] = typer.Option(["auto"], "--beamstop", help="'auto', 'none', or shapes 'circle:PANEL:X,Y,R' / 'polygon:PANEL:X1,Y1,X2,Y2,...' (pixels; repeat for disk and arm)."),
    no_arm: bool = typer.Option(False, "--no-arm", help="With --beamstop auto: do not look for the beamstop arm."),
    mask_shape: List[str] = typer.Option([], "--mask", help="Extra user mask shape (same syntax as --beamstop), repeatable."),
    background: Optional[Path] = typer.Option(None, "--background", help="Background: an artifact of 'diffuse-extractor background' (scaled to each still by exposure time x transmission from the headers, variance propagated), or an image (dxtbx-readable, or .npy for one panel) in counts; subtracted before correction."),
    background_scale: float = typer.Option(1.0, "--background-scale", help="Extra multiplier for the background (an image: e.g. the exposure ratio)."),
    isotropic_background: bool = typer.Option(False, "--isotropic-background", help="Subtract the per-still isotropic background B(|q|) fitted to the still's own unmasked pixels (always computed and stored in /entry/background_profile). It also removes the isotropic part of the diffuse signal."),
    lorentz: bool = typer.Option(False, "--lorentz/--no-lorentz", help="Rotation frames: apply DIALS' Lorentz factor (off: it belongs to integrated Bragg intensities; diffuse pixels need none, as in mdx2). Stills never get one."),
    bragg_radius: Optional[float] = typer.Option(None, "--bragg-radius", help="Bragg mask radius in pixels (default: from the spot profile)."),
    bragg_delpsi: float = typer.Option(0.003, "--bragg-delpsi", help="Predicted-reflection window |delta psi| in rad (DIALS' stills prediction uses 0.0015)."),
    outlier_nsigma: float = typer.Option(8.0, "--outlier-nsigma", help="Also mask unpredicted bright pixels this many Poisson sigmas above their |q| shell (0 = off)."),
    gain: float = typer.Option(1.0, "--gain", help="Detector gain in ADU per photon (counting statistics)."),
    air_path_fraction: float = typer.Option(1.0, "--air-path-fraction", help="Fraction of the sample-to-pixel path in air (0 = vacuum/helium)."),
    hot_dead: bool = typer.Option(True, "--hot-dead/--no-hot-dead", help="Find hot/dead pixels from the selected stills' statistics (needs >= 3 stills)."),
    pngs: bool = typer.Option(True, "--png/--no-png", help="Write diagnostic PNGs (raw, masks, corrected, radial profile)."),
):
    """Extract the diffuse signal of one or more stills: per-pixel q, fractional hkl, corrected I and sigma."""
    from rich.progress import Progress

    from . import pipeline
    from .artifacts import InputError, load_experiments
    from .core.extract import ExtractionParams

    bs = beamstop
    if len(bs) == 1 and bs[0].lower() in ("auto", "none"):
        bs_param = bs[0].lower()
    else:
        bs_param = _shapes(bs, "--beamstop")
    params = ExtractionParams(beamstop=bs_param, detect_arm=not no_arm, user_shapes=_shapes(mask_shape, "--mask"),
                              bragg_radius_px=bragg_radius, bragg_delpsi_max=bragg_delpsi,
                              outlier_nsigma=outlier_nsigma or None, gain=gain, air_path_fraction=air_path_fraction,
                              background_scale=background_scale, lorentz=lorentz,
                              isotropic_background=isotropic_background)
    try:
        indices = list(range(len(load_experiments(expt)))) if all_images else list(image_index)
        with Progress(transient=True) as prog:
            task = prog.add_task("extracting stills", total=len(indices))
            results = pipeline.process(expt, out, refl_path=refl, image_indices=indices, params=params,
                                       background_path=background, hot_dead=hot_dead, pngs=pngs,
                                       progress=lambda: prog.advance(task))
    except (InputError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    for r in results:
        typer.echo(f"still {r['index']}: {r['n_pixels']} pixels -> {r['artifact']}")


@app.command("background")
def background_cmd(
    frames: List[Path] = typer.Argument(..., help="Background-only frames (no crystal, same geometry as the stills), dxtbx-readable."),
    out: Path = typer.Option(..., "--out", help="Output HDF5 background artifact (give it to 'run --background')."),
    bin_px: int = typer.Option(8, "--bin", help="Bin size in pixels (bin_px x bin_px)."),
    smooth: float = typer.Option(0.5, "--smooth", help="Gaussian smoothing sigma in bins (0 = none)."),
    outlier_nsigma: float = typer.Option(6.0, "--outlier-nsigma", help="Drop zingers / hot pixels this many Poisson sigmas above the median / the smooth background."),
    beamstop: List[str] = typer.Option(["auto"], "--beamstop", help="'auto', 'none', or shapes (as for run)."),
    mask_shape: List[str] = typer.Option([], "--mask", help="Extra user mask shape, repeatable."),
    gain: float = typer.Option(1.0, "--gain", help="Detector gain in ADU per photon."),
):
    """Estimate a smooth background (counts per frame and its variance) from background-only frames."""
    from . import pipeline
    from .artifacts import InputError
    from .core.extract import ExtractionParams

    bs = beamstop
    bs_param = bs[0].lower() if len(bs) == 1 and bs[0].lower() in ("auto", "none") else _shapes(bs, "--beamstop")
    params = ExtractionParams(beamstop=bs_param, user_shapes=_shapes(mask_shape, "--mask"), gain=gain)
    try:
        path, info = pipeline.make_background(frames, out, bin_px=bin_px, smooth_bins=smooth,
                                              outlier_nsigma=outlier_nsigma, gain=gain, params=params)
    except (InputError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{info['n_frames']} frames, mean {info['mean_counts_per_frame']:.3g} counts/pixel/frame -> {path}")


@app.command()
def inspect(
    artifact: Path = typer.Argument(..., help="A diffuse-extractor HDF5 artifact."),
    png_dir: Optional[Path] = typer.Option(None, "--png", help="Also write masks / corrected / radial PNGs here."),
):
    """Summarise an artifact: provenance, mask counts, ranges of q, I, sigma and each correction."""
    import numpy as np

    from . import diagnostics
    from .artifacts import InputError, read_still

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
