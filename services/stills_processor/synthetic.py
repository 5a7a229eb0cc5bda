"""A small synthetic rotation sequence with a planted crystal, for tests and benchmarks.

Frames are written as mini-CBF files by dxtbx's own writer (``FormatCBFMini.as_file``) and read back
through dxtbx, so the planted crystal is predicted (``reflection_table.from_predictions``) with exactly
the geometry DIALS will see. Each predicted reflection is rendered as a Gaussian spot (``sigma_xy``
pixels) spread over frames by a Gaussian rocking curve (``sigma_z`` frames), on a flat Poisson
background. Ground truth (cell, space group, U, A) is returned for comparison.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cctbx import crystal as cctbx_crystal
from cctbx import uctbx
from scipy.special import erf

# dxtbx and DIALS are imported inside the functions that use them: they take ~3 s (dxtbx) to ~4 s (DIALS'
# programs) to import, which `stills-processor --help`, `show` and parameter checks should not pay; the
# worker's pool imports them once per process before any image (batch.warm_up, run by _preload.py).


@dataclass
class SyntheticSequence:
    paths: list[Path]
    unit_cell: tuple[float, ...]
    space_group: str
    U: np.ndarray  # 3x3
    A: np.ndarray  # 3x3, 1/Angstrom, at the goniometer datum
    n_reflections: int  # rendered reflections


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def write_rotation_sequence(
    out_dir: str | Path,
    n_frames: int = 8,
    osc_deg: float = 0.5,
    unit_cell: tuple[float, ...] = (45.0, 45.0, 65.0, 90.0, 90.0, 90.0),
    space_group: str = "P 41 21 2",
    size: int = 1024,
    distance_mm: float = 200.0,
    wavelength: float = 1.0,
    d_min: float = 2.0,
    sigma_xy: float = 1.0,
    sigma_z: float = 0.3,
    mean_intensity: float = 3000.0,
    background: float = 5.0,
    seed: int = 7,
    stem: str = "synth",
) -> SyntheticSequence:
    """Write ``n_frames`` oscillation images ``<stem>_0001.cbf``... and return the planted truth."""
    # DIALS/dxtbx (~3 s) only when images are written; cctbx is loaded with the package anyway
    from dials.array_family import flex
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model import BeamFactory, Crystal, DetectorFactory, GoniometerFactory, ScanFactory
    from dxtbx.model.experiment_list import ExperimentListFactory
    from scitbx import matrix

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixel = 0.172
    beam = BeamFactory.simple(wavelength)
    detector = DetectorFactory.simple(
        "PAD", distance_mm, (size * pixel / 2, size * pixel / 2), "+x", "-y", (pixel, pixel), (size, size),
        (-1, 1e7),
    )
    gonio = GoniometerFactory.known_axis((1.0, 0.0, 0.0))
    scan = ScanFactory.make_scan((1, n_frames), [0.1] * n_frames, (0.0, osc_deg), list(range(n_frames)),
                                 deg=True)
    paths = [out_dir / f"{stem}_{i + 1:04d}.cbf" for i in range(n_frames)]
    blank = flex.int(flex.grid(size, size), 0)
    for i, p in enumerate(paths):  # first pass: header geometry only
        FormatCBFMini.as_file(detector, beam, gonio, scan[i : i + 1], blank, str(p))

    expt = ExperimentListFactory.from_filenames([str(p) for p in paths])[0]  # geometry as DIALS reads it
    uc = uctbx.unit_cell(unit_cell)
    sym = cctbx_crystal.symmetry(unit_cell=uc, space_group_symbol=space_group)
    U = _random_rotation(rng)
    B = np.array(matrix.sqr(uc.fractionalization_matrix()).transpose(), dtype=float).reshape(3, 3)
    A = U @ B
    real = np.linalg.inv(A)  # rows: real-space a, b, c
    xtal = Crystal(tuple(real[0]), tuple(real[1]), tuple(real[2]), space_group=sym.space_group())
    expt.crystal = xtal
    pred = flex.reflection_table.from_predictions(expt, dmin=d_min)
    keep = ~sym.space_group().is_sys_absent(pred["miller_index"])
    pred = pred.select(keep)
    xyz = np.array(pred["xyzcal.px"]).reshape(-1, 3)
    n = len(xyz)
    d = np.array(uc.d(pred["miller_index"]))
    intensity = rng.exponential(mean_intensity, n) * np.exp(-2.0 / d**2)

    images = np.zeros((n_frames, size, size), dtype=np.float64)
    half = int(np.ceil(4 * sigma_xy))
    offs = np.arange(-half, half + 1)
    for (x, y, z), inten in zip(xyz, intensity):
        k = np.arange(n_frames)
        frac = 0.5 * (erf((k + 1 - z) / (np.sqrt(2) * sigma_z)) - erf((k - z) / (np.sqrt(2) * sigma_z)))
        xs = int(np.floor(x)) + offs
        ys = int(np.floor(y)) + offs
        ok_x = (xs >= 0) & (xs < size)
        ok_y = (ys >= 0) & (ys < size)
        if not ok_x.any() or not ok_y.any():
            continue
        gx = np.exp(-0.5 * ((xs + 0.5 - x) / sigma_xy) ** 2)
        gy = np.exp(-0.5 * ((ys + 0.5 - y) / sigma_xy) ** 2)
        prof = np.outer(gy, gx)
        prof /= prof.sum()
        patch = prof[np.ix_(ok_y, ok_x)]
        for f in np.nonzero(frac > 1e-4)[0]:
            images[f][np.ix_(ys[ok_y], xs[ok_x])] += inten * frac[f] * patch
    counts = rng.poisson(images + background).astype(np.int32)
    for i, p in enumerate(paths):
        FormatCBFMini.as_file(detector, beam, gonio, scan[i : i + 1], flex.int(counts[i]), str(p))
    return SyntheticSequence(paths=paths, unit_cell=tuple(unit_cell), space_group=space_group, U=U, A=A,
                             n_reflections=n)
