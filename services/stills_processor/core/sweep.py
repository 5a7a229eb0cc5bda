"""One rotation frame as its own experiment, from a sweep's refined DIALS model (no spot finding).

A rotation sweep that arrives frame by frame is indexed and refined once as a sequence (possibly on its
first frames only); each frame is then given a one-image rotation experiment for diffuse extraction:

- the frame's own imageset and scan, read from its header by dxtbx (a single-image scan with the frame's
  absolute start angle and oscillation width),
- the sweep model's refined beam, detector and goniometer,
- a scan-static crystal: for a scan-varying model and a frame inside its scan, the A matrix at the frame's
  centre, i.e. the mean of the scan points at the frame's two edges (DIALS' scan-varying predictor
  interpolates A linearly between scan points); otherwise the model's static A.

A frame that does not belong to the model's sweep (another detector, image size, oscillation width, file
template or start angle) raises :class:`FrameMismatch` naming both files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffractflow.errors import InputError

# dxtbx and DIALS are imported inside the functions that use them: they take ~3 s (dxtbx) to ~4 s (DIALS'
# programs) to import, which `stills-processor --help`, `show` and parameter checks should not pay; the
# worker's pool imports them once per process before any image (batch.warm_up, run by _preload.py).


class FrameMismatch(InputError):
    """The frame (or the model) cannot give a frame experiment: unreadable, or not of the model's sweep (bad input:
    the job is rejected)."""


@dataclass(frozen=True)
class FrameModelInfo:
    """What was built: the frame's number and angles (deg) and where its crystal came from."""

    frame_number: int
    start_angle_deg: float
    increment_deg: float
    phi_centre_deg: float  # rotation angle at the frame's centre
    inside_model_scan: bool  # the frame lies in the image range the model was refined on
    crystal_source: str  # "scan_point" (interpolated scan-varying A) | "static"
    model_image_range: tuple[int, int]


def load_sweep_model(path: str | Path):
    """The single rotation experiment of a sequence ``.expt`` (beam, detector, goniometer, scan, crystal)."""
    # dxtbx (~2 s) only when a sweep is read: the CLI imports this module
    from dxtbx.model.experiment_list import ExperimentList

    path = Path(path)
    try:
        el = ExperimentList.from_file(str(path), check_format=False)
    except Exception as exc:
        raise FrameMismatch(f"{path}: not a DIALS experiment list ({type(exc).__name__}: {exc})") from exc
    if len(el) != 1:
        raise FrameMismatch(f"{path}: holds {len(el)} experiments, a sweep model has exactly one")
    e = el[0]
    missing = [n for n in ("beam", "detector", "goniometer", "scan", "crystal") if getattr(e, n) is None]
    if missing:
        raise FrameMismatch(f"{path}: not a refined rotation sequence (no {', '.join(missing)})")
    if e.scan.get_oscillation()[1] == 0:
        raise FrameMismatch(f"{path}: its scan has zero oscillation width (a still, not a sweep)")
    return e


def import_frame(path: str | Path):
    """One rotation image as dxtbx reads it: an experiment with a one-image ImageSequence and its scan."""
    # dxtbx (see load_sweep_model)
    from dxtbx.imageset import ImageSequence
    from dxtbx.model.experiment_list import ExperimentListFactory

    path = Path(path)
    if not path.is_file():
        raise FrameMismatch(f"{path}: no such file")
    try:
        el = ExperimentListFactory.from_filenames([str(path)])
    except Exception as exc:
        raise FrameMismatch(f"{path}: dxtbx cannot read it ({type(exc).__name__}: {exc})") from exc
    if len(el) != 1 or not isinstance(el[0].imageset, ImageSequence) or el[0].scan is None:
        raise FrameMismatch(f"{path}: not a rotation image (dxtbx finds no scan: a still?)")
    if len(el[0].imageset) != 1:
        raise FrameMismatch(f"{path}: holds {len(el[0].imageset)} images; give one rotation frame per file")
    if el[0].scan.get_oscillation()[1] == 0:
        raise FrameMismatch(f"{path}: a still (oscillation width 0), not a rotation frame")
    return el[0]


def check_same_sweep(model, frame, model_path, frame_path, distance_rtol: float = 0.05) -> None:
    """Raise FrameMismatch (naming both files) unless ``frame`` is an image of the sweep of ``model``.

    Compared: panels, image sizes and pixel sizes (exact), wavelength (0.1 %), rotation axis (1 deg),
    oscillation width (0.1 %), the file-name template, the start angle expected from the frame number on
    the model's scan (1 % of a width), and the detector distance (``distance_rtol``; the model's is refined,
    the frame's is the header's).
    """
    def bad(what: str):
        raise FrameMismatch(f"frame {frame_path} is not of the sweep of model {model_path}: {what}")

    md, fd = model.detector, frame.detector
    if len(md) != len(fd):
        bad(f"{len(fd)} detector panels, the model has {len(md)}")
    for i, (mp, fp) in enumerate(zip(md, fd)):
        if tuple(mp.get_image_size()) != tuple(fp.get_image_size()):
            bad(f"panel {i} image size {fp.get_image_size()} != {mp.get_image_size()} px")
        if not np.allclose(mp.get_pixel_size(), fp.get_pixel_size(), rtol=1e-6):
            bad(f"panel {i} pixel size {fp.get_pixel_size()} != {mp.get_pixel_size()} mm")
        dm, df = mp.get_distance(), fp.get_distance()
        if abs(df - dm) > distance_rtol * abs(dm):
            bad(f"detector distance {df:.2f} mm, the model's (refined) is {dm:.2f} mm")
    wm, wf = model.beam.get_wavelength(), frame.beam.get_wavelength()
    if abs(wf - wm) > 1e-3 * wm:
        bad(f"wavelength {wf:.5f} != {wm:.5f} Angstrom")
    am = np.asarray(model.goniometer.get_rotation_axis_datum(), dtype=float)
    af = np.asarray(frame.goniometer.get_rotation_axis_datum(), dtype=float)
    cosang = float(np.dot(am, af) / (np.linalg.norm(am) * np.linalg.norm(af)))
    if cosang < math.cos(math.radians(1.0)):
        bad(f"rotation axis {tuple(np.round(af, 4))} != {tuple(np.round(am, 4))}")
    (m0, mw), (f0, fw) = model.scan.get_oscillation(), frame.scan.get_oscillation()
    if abs(fw - mw) > 1e-3 * abs(mw):
        bad(f"oscillation width {fw:g} != {mw:g} deg")
    tm = Path(model.imageset.get_template()).name if hasattr(model.imageset, "get_template") else ""
    tf = Path(frame.imageset.get_template()).name
    if tm and tm != tf:
        bad(f"file template {tf!r} != {tm!r}")
    n = frame.scan.get_image_range()[0]
    expected = model.scan.get_angle_from_image_index(n, deg=True)
    if abs(f0 - expected) > 0.01 * abs(mw):
        bad(f"image {n} starts at {f0:g} deg, the model's scan puts it at {expected:g} deg")


def static_crystal_for_image(model, image_number: int):
    """A scan-static copy of the model's crystal for one image of its sweep: (crystal, source).

    Scan-varying model and image inside its scan: A at the image centre, the mean of the A matrices at
    the image's two scan points (source ``scan_point``). Otherwise the model's static A (``static``).
    """
    # dxtbx (see load_sweep_model)
    from dxtbx.model import Crystal

    xtal = Crystal(model.crystal)
    first, last = model.scan.get_image_range()
    k = image_number - first
    n_pts = xtal.num_scan_points
    if n_pts > 0 and 0 <= k < last - first + 1 and n_pts == last - first + 2:
        A = 0.5 * (np.array(xtal.get_A_at_scan_point(k)) + np.array(xtal.get_A_at_scan_point(k + 1)))
        xtal.reset_scan_points()
        xtal.set_A(tuple(A.tolist()))
        return xtal, "scan_point"
    xtal.reset_scan_points()
    return xtal, "static"


def frame_experiment(model_path: str | Path, frame_path: str | Path):
    """The one-image rotation experiment of ``frame_path`` under the sweep model ``model_path``.

    Returns (ExperimentList with one experiment, FrameModelInfo). Its identifier is the model's with
    ``_<frame number>`` appended (stable across re-runs).
    """
    # dxtbx (see load_sweep_model)
    from dxtbx.model.experiment_list import Experiment, ExperimentList

    model = load_sweep_model(model_path)
    frame = import_frame(frame_path)
    check_same_sweep(model, frame, model_path, frame_path)
    n = frame.scan.get_image_range()[0]
    crystal, source = static_crystal_for_image(model, n)
    iset, scan = frame.imageset, frame.scan
    iset.set_beam(model.beam)
    iset.set_detector(model.detector)
    iset.set_goniometer(model.goniometer)
    iset.set_scan(scan)
    expt = Experiment(imageset=iset, beam=model.beam, detector=model.detector, goniometer=model.goniometer,
                      scan=scan, crystal=crystal, profile=model.profile,
                      identifier=f"{model.identifier or 'sweep'}_{n}")
    f0, fw = scan.get_oscillation()
    first, last = model.scan.get_image_range()
    info = FrameModelInfo(frame_number=int(n), start_angle_deg=float(f0), increment_deg=float(fw),
                          phi_centre_deg=float(f0 + 0.5 * fw), inside_model_scan=bool(first <= n <= last),
                          crystal_source=source, model_image_range=(int(first), int(last)))
    return ExperimentList([expt]), info
