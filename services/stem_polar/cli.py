"""Command line: ``stem-polar run`` (files in, the seed's output layout out), ``inspect``, ``serve``."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from diffractflow.report_page import write_job_report

from . import __version__
from .artifacts import DataError, open_source, write_outputs
from .core.calibration import detect_center, radial_grid
from .core.config import load_config
from .core.interactive import pick_center, pick_kspace
from .core.pipeline import InputError
from .core.source import auto_chunk, iter_chunks
from .core.xp import DeviceError
from .pipeline import run_files
from .synthetic import write_demo_dataset

try:
    from diffractflow.cli import service_app

    app = service_app("stem-polar", __version__, stage="stem_polar.worker:STAGE",
                      help="4D-STEM cluster-guided virtual detectors and gated CoM/DPC polarisation maps.")
except Exception:  # platform library not importable: a plain app with --version keeps `run` usable
    app = typer.Typer(name="stem-polar", no_args_is_help=True,
                      help="4D-STEM cluster-guided virtual detectors and gated CoM/DPC polarisation maps.")

    def _version(value: bool):
        if value:
            typer.echo(f"stem-polar {__version__}")
            raise typer.Exit()

    @app.callback()
    def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True)):
        """stem-polar"""


def _fail(msg: str, code: int = 2):
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _parse_sets(items: List[str]) -> dict:
    out: dict = {}
    for it in items or []:
        if "=" not in it:
            _fail(f"--set expects section.key=value, got {it!r}")
        key, val = it.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(val)
    return out


class _Progress:
    """rich progress bars, one per pipeline stage."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tasks = {}
        self.bar = None

    def __enter__(self):
        if not self.quiet:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=False)
            self.bar.__enter__()
        return self

    def __call__(self, stage, done, total):
        if self.bar is None:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


@app.command()
def run(
    data: Path = typer.Option(..., "--data", help="4D-STEM data: HDF5 (N,ky,kx) or (H,W,ky,kx), any int/float "
                              "dtype; Dectris *_master.h5; Merlin .mib; blockfile .blo; EMD/py4DSTEM .emd"),
    dset: Optional[str] = typer.Option(None, "--dset", help="HDF5 dataset path (default: the file's only 3-D/4-D "
                                       "dataset)"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="cluster labels .npy/.npz (H*W entries; cluster "
                                          "ids = the label values). Omitted: PCA + k-means in the service"),
    scan_shape: Optional[Tuple[int, int]] = typer.Option(None, "--scan-shape", help="scan H W (probe positions)"),
    out: Path = typer.Option(..., "--out", help="output directory (kspace/, realspace/, figures/, logs/)"),
    config: Optional[Path] = typer.Option(None, "--config", help="config.yaml (sections as in the seed)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda:N (CuPy)"),
    chunks: Optional[int] = typer.Option(None, "--chunks", min=1, help="frames per streamed chunk "
                                         "(default: ~64 MB of float32)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU worker threads (default: every "
                                          "CPU this process may use)"),
    interactive_center: bool = typer.Option(False, "--interactive-center", help="click the beam centre on the "
                                            "mean pattern"),
    interactive_kspace: bool = typer.Option(False, "--interactive-kspace", help="click pairs of opposite Bragg "
                                            "peaks to calibrate k-space pixel sizes"),
    known_spacing: Optional[float] = typer.Option(None, "--known-spacing", min=0.0, help="d-spacing (Å) of the "
                                                  "clicked reflection: absolute 1/Å calibration"),
    kspace_pairs: int = typer.Option(1, "--kspace-pairs", min=1, help="pairs to click (2+ along different "
                                     "directions give an anisotropic calibration)"),
    center: Optional[Tuple[float, float]] = typer.Option(None, "--center", help="beam centre Y X (detector px), "
                                                         "non-interactive"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="vacuum reference scan for descan "
                                             "correction (same scan and detector shape)"),
    reference_dset: Optional[str] = typer.Option(None, "--reference-dset", help="dataset in the reference file"),
    set_: List[str] = typer.Option([], "--set", help="config override section.key=value (repeatable)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
):
    """Cluster-guided polarisation mapping: templates, gates, matched filter, gated CoM, E-field maps."""
    if interactive_kspace is False and known_spacing is not None:
        _fail("--known-spacing only applies with --interactive-kspace")
    try:
        cfg = load_config(config, _parse_sets(set_))
    except (ValueError, FileNotFoundError) as exc:
        _fail(f"config: {exc}")
    if center is not None:
        cfg.calibration.center_y, cfg.calibration.center_x = center
    t0 = time.perf_counter()
    interactive = {}

    def calibrate(pipe):  # between the centre detection and the passes: no data reload
        if interactive_center:
            y, x = pick_center(pipe.mean_sample, (pipe.center.cy, pipe.center.cx))
            pipe.set_center(y, x, "interactive")
            interactive["center"] = {"y": y, "x": x}
        if interactive_kspace:
            interactive["kspace"] = apply_kspace_calibration(pipe, known_spacing, kspace_pairs, config)

    try:
        with _Progress(quiet) as prog, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # collected in the report and shown in the summary
            done = run_files(data, cfg, dset=dset, scan_shape=scan_shape, labels=labels, reference=reference,
                             reference_dset=reference_dset, device=device, chunks=chunks, threads=threads,
                             progress=prog, before_run=calibrate)
    except (DataError, InputError, DeviceError) as exc:
        _fail(str(exc))
    except RuntimeError as exc:
        _fail(str(exc), 1)
    res, pipe = done.result, done.pipeline
    run_info = {
        "service": "stem-polar", "version": __version__,
        "command": " ".join(sys.argv),
        "inputs": {"data": str(data), "dset": dset, "labels": str(labels) if labels else None,
                   "reference": str(reference) if reference else None, "config": str(config) if config else None},
        "data_gb": done.data_bytes / 1e9,
        "interactive": interactive,
        "wall_time_s": time.perf_counter() - t0,
    }
    write_outputs(res, out, pipe.cfg, run_info)
    write_job_report(out)  # the job's page for a browser (report.html)
    _summary(res, out, quiet)


def apply_kspace_calibration(pipe, known_spacing, n_pairs, config_path=None, driver=None) -> dict:
    """Interactive k-space calibration: update the pipeline's config in place (no data reload).

    pixel_size_ky / pixel_size_kx given explicitly in the config file take precedence over the clicks
    (the clicked result is still logged).
    """
    res = pick_kspace(pipe.mean_sample, (pipe.center.cy, pipe.center.cx), known_spacing, n_pairs, driver=driver)
    cal = pipe.cfg.calibration
    explicit = cal.pixel_size_ky is not None or cal.pixel_size_kx is not None
    if explicit:
        res["applied"] = False
        res["note"] = "pixel_size_ky/kx given in the config take precedence; clicked calibration only logged"
    else:
        cal.pixel_size_k = res["pixel_size_k"]
        cal.pixel_size_ky = res["pixel_size_ky"]
        cal.pixel_size_kx = res["pixel_size_kx"]
        cal.k_units = res["k_units"]
        res["applied"] = True
    pipe._check_physical_inputs()
    return res


def _summary(res, out, quiet):
    if quiet:
        return
    t = Table(title=f"stem-polar -> {out}")
    t.add_column("item")
    t.add_column("value")
    r = res.report
    t.add_row("centre (y, x) px", f"{res.center.cy:.2f}, {res.center.cx:.2f} ({res.center.method})")
    t.add_row("clusters", ", ".join(str(c) for c in res.cluster_ids))
    if r["clusters"]["skipped"]:
        t.add_row("skipped", "; ".join(f"{s['id']}: {s['reason']}" for s in r["clusters"]["skipped"]))
    t.add_row("mean confidence", f"{r['confidence']['mean']:.3f} ({r['confidence']['note']})")
    t.add_row("gate coverage", ", ".join(f"{c}: {100 * v['coverage']:.0f}%" for c, v in r["gate_coverage"].items()))
    for name, chk in r.get("quality", {}).get("checks", {}).items():
        t.add_row(f"check {name}", ("[green]ok[/green] " if chk["ok"] else "[red]FAILED[/red] ") + chk["message"])
    if r.get("split_half_ssim"):
        t.add_row("split-half SSIM", ", ".join(f"{c}: {v:.2f}" for c, v in r["split_half_ssim"].items()
                                               if v is not None))
    t.add_row("time (s)", f"{res.timings.get('total_after_sample', 0):.2f}")
    for w in res.warnings:
        t.add_row("[yellow]warning", w)
    Console(stderr=True).print(t)


@app.command()
def inspect(
    data: Path = typer.Option(..., "--data", help="4D-STEM data file"),
    dset: Optional[str] = typer.Option(None, "--dset", help="HDF5 dataset path"),
    scan_shape: Optional[Tuple[int, int]] = typer.Option(None, "--scan-shape", help="scan H W (for 3-D data)"),
    png: Optional[Path] = typer.Option(None, "--png", help="save the mean pattern and virtual BF/ADF images here"),
    full: bool = typer.Option(False, "--full", help="stream the whole scan (mean pattern, virtual BF/ADF images); "
                              "default: a sample of frames"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """Quick look at a dataset: shape, dtype, size, intensity range, beam centre and BF disk radius."""
    try:
        src = open_source(data, dset, scan_shape)
    except DataError as exc:
        _fail(str(exc))
    try:
        n = src.n_frames
        if full:
            idx = range(0, n)
            blocks = iter_chunks(src, auto_chunk(src.frame_shape))
        else:
            per = max(1, min(256, n) // 4)
            starts = np.unique(np.linspace(0, n - per, 4).astype(int))
            blocks = ((int(s), int(s) + per, src.read(int(s), int(s) + per)) for s in starts)
            idx = None
        acc = np.zeros(src.frame_shape)
        cnt, lo, hi, nonfinite = 0, np.inf, -np.inf, 0
        vbf = np.zeros(n) if full else None
        vadf = np.zeros(n) if full else None
        cen = None
        for a, b, blk in blocks:
            blk = np.asarray(blk, dtype=np.float64)
            fin = np.isfinite(blk)
            nonfinite += int((~fin).sum())
            acc += np.where(fin, blk, 0).sum(axis=0)
            cnt += len(blk)
            lo, hi = min(lo, float(np.nanmin(blk))), max(hi, float(np.nanmax(blk)))
            if full:
                if cen is None:
                    cen = detect_center(acc / cnt)
                    r = radial_grid(src.frame_shape, cen.cy, cen.cx)
                    bfm = (r <= max(cen.radius, 1)).ravel()
                    adfm = ((r > 1.2 * max(cen.radius, 1)) & (r < 3 * max(cen.radius, 1))).ravel()
                flat = np.nan_to_num(blk.reshape(len(blk), -1))
                vbf[a:b] = flat[:, bfm].sum(axis=1)
                vadf[a:b] = flat[:, adfm].sum(axis=1)
        mean = acc / max(cnt, 1)
        c = detect_center(mean)
        info = {
            "source": src.name, "scan_shape": list(src.scan_shape), "frame_shape": list(src.frame_shape),
            "dtype": str(src.dtype), "n_frames": n,
            "size_gb": n * src.frame_shape[0] * src.frame_shape[1] * np.dtype(src.dtype).itemsize / 1e9,
            "frames_read": cnt, "intensity_min": lo, "intensity_max": hi, "non_finite_values": nonfinite,
            "mean_counts_per_pattern": float(mean.sum()),
            "center_yx": [c.cy, c.cx], "bf_disk_radius_px": c.radius,
        }
        if hasattr(src, "ds"):
            info["hdf5_chunks"] = src.ds.chunks
            info["hdf5_compression"] = src.ds.compression
    finally:
        if hasattr(src, "close"):
            src.close()
    if png is not None:
        from matplotlib.figure import Figure  # heavy (matplotlib): only for --png

        fig = Figure(figsize=(10 if full else 4, 4))
        k = 3 if full else 1
        ax = fig.add_subplot(1, k, 1)
        ax.imshow(np.log1p(np.maximum(mean, 0)), cmap="inferno")
        ax.plot([c.cx], [c.cy], "c+", ms=12)
        ax.set_title("mean pattern log(I+1)", fontsize=8)
        if full:
            for j, (img, t) in enumerate(((vbf, "virtual BF"), (vadf, "virtual ADF")), start=2):
                ax = fig.add_subplot(1, k, j)
                ax.imshow(img.reshape(src.scan_shape), cmap="gray")
                ax.set_title(t, fontsize=8)
        fig.savefig(png, dpi=100, bbox_inches="tight")
        info["png"] = str(png)
    if json_out:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        t = Table(title=f"stem-polar inspect {data}")
        t.add_column("field")
        t.add_column("value")
        for k_, v in info.items():
            t.add_row(k_, f"{v:.4g}" if isinstance(v, float) else str(v))
        Console().print(t)


if __name__ == "__main__":  # pragma: no cover
    app()


@app.command()
def demo(
    out: Path = typer.Option(Path("stem-polar-demo"), "--out", help="output directory (dataset/ and result/)"),
    size: int = typer.Option(48, "--size", min=16, help="scan H = W (probe positions)"),
):
    """Generate a 4D-STEM scan with planted domains and fields, map it, and score the maps against the truth.

    Exit 0 only if -Ex and -Ey (E points against the deflection) correlate >= 0.95 with the planted deflections,
    the quality report passes, and the cluster map
    matches the planted domains on >= 95% of positions.
    """
    import tifffile  # heavy image-format package: only the demo's scoring reads the maps back

    ds = out / "dataset"
    truth = write_demo_dataset(ds, h=size, w=size)
    (ds / "config.yaml").write_text(yaml.safe_dump({
        "templates": {"top_percent": 10, "smooth_sigma": 1.5},
        "dpc": {"gate_mode": "union", "baseline": "median", "roi": [0, 9], "field_scale": 1.0},
        "calibration": {"pixel_size": 5.0, "pixel_size_units": "angstrom", "convergence_angle": 21.4},
        "validation": {"enable_split_half": True}}))
    run(data=ds / "patterns.h5", dset="patterns", labels=ds / "labels.npy", scan_shape=(size, size),
        out=out / "result", config=ds / "config.yaml", device="cpu", chunks=None, threads=None,
        interactive_center=False,
        interactive_kspace=False, known_spacing=None, kspace_pairs=1, center=None, reference=None,
        reference_dset=None, set_=[], quiet=True)
    rs = out / "result" / "realspace"
    ex, ey = tifffile.imread(rs / "Ex.tif"), tifffile.imread(rs / "Ey.tif")
    cx = float(np.corrcoef(-ex.ravel(), truth["fx"].ravel())[0, 1])  # E = -field_scale x CoM
    cy = float(np.corrcoef(-ey.ravel(), truth["fy"].ravel())[0, 1])
    quality = json.loads((out / "result" / "logs" / "run.json").read_text())["report"]["quality"]
    argmax = tifffile.imread(rs / "S_argmax.tif")
    match = float(np.mean(argmax == truth["domains"]))
    summary = {"scan": [size, size], "detector": list(truth["data"].shape[2:]), "corr_Ex_vs_planted": round(cx, 4),
               "corr_Ey_vs_planted": round(cy, 4), "cluster_map_match": round(match, 4),
               "quality_passed": quality["passed"], "quality_failed": quality["failed"],
               "outputs": str(out / "result")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    typer.echo(json.dumps(summary, indent=2))
    if min(cx, cy) < 0.95 or match < 0.95 or not quality["passed"]:
        raise typer.Exit(1)
