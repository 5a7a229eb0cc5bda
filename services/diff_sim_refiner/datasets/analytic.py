"""A synthetic diffuse-scattering run with planted truth, written as PILATUS-style mini-CBF stills.

Each still: a crystal in a random orientation, a known 3-D diffuse signal (an anisotropic Gaussian
halo around every reciprocal-lattice point plus a smooth isotropic ring), Bragg peaks, a per-still
scale factor (crystal volume x beam intensity, log-normal), the detector's physical factors
(polarisation, solid angle, sensor efficiency, air), a beamstop shadow, PILATUS module gaps
(pixels = -1, as the real detector reports them) and Poisson noise. The truth (cell, orientations,
scales, the diffuse model's parameters) is written beside the images as ``truth.json``.

The diffuse model is a function of fractional Miller indices (and |q|), so the merged map can be
compared with it voxel by voxel: :func:`diffuse_truth`.

Unlike :mod:`.stills` (nanoBragg physics), the counts here are the analytic model divided by a per-pixel
``correction`` that the caller supplies (``pixel_model``): tests pass the diffuse-extractor's own multiplier, so the
pipeline divides out exactly what was planted. This package does not import the extractor (a service imports no
other service); the caller, which may, does.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from cctbx import crystal, uctbx
from dials.array_family import flex
from dxtbx.format.FormatCBFMini import FormatCBFMini
from dxtbx.model import BeamFactory, DetectorFactory
from scipy.spatial.transform import Rotation

#: image path -> (dxtbx detector, dxtbx beam, q_lab (3, slow, fast) in 1/Å, correction (slow, fast)): the models
#: dxtbx reads back from a written still and the multiplier the extraction applies to its counts
PixelModel = Callable[[Path], tuple]

PILATUS_MODULE = (487, 195)  # fast, slow pixels
PILATUS_GAP = (7, 17)  # fast, slow gap pixels between modules


@dataclass
class DiffuseModel:
    """Planted diffuse intensity (photons per pixel at unit scale, after all corrections)."""

    halo_amplitude: float = 60.0
    halo_sigma_hkl: tuple[float, float, float] = (0.22, 0.30, 0.38)  # Gaussian widths along h, k, l
    ring_amplitude: float = 40.0
    ring_q: float = 0.32  # 1/Angstrom (|q| = 1/d)
    ring_width: float = 0.08
    floor: float = 10.0


@dataclass
class DatasetSpec:
    n_stills: int = 20
    unit_cell: tuple[float, float, float, float, float, float] = (40.0, 50.0, 60.0, 90.0, 90.0, 90.0)
    space_group: str = "P 21 21 21"
    modules: tuple[int, int] = (2, 3)  # modules along fast, slow
    pixel_mm: float = 0.172
    distance_mm: float = 120.0
    wavelength: float = 1.0
    bragg_peak: float = 4000.0  # mean peak photons of a Bragg reflection at unit scale
    bragg_sigma_q: float = 0.0018  # 1/Angstrom: reciprocal-space width of a Bragg peak
    bragg_cutoff_sigma: float = 3.0  # Bragg peaks end here (a real peak's tail is far below the diffuse)
    scale_spread: float = 0.2  # log-normal sigma of the per-still scales
    beamstop_radius_mm: float = 2.5
    seed: int = 2024
    diffuse: DiffuseModel = field(default_factory=DiffuseModel)


def diffuse_truth(h, k, l, q_mag, model: DiffuseModel) -> np.ndarray:
    """The planted diffuse intensity at fractional (h, k, l) with |q| = ``q_mag`` (1/Angstrom)."""
    sh, sk, sl = model.halo_sigma_hkl
    dh, dk, dl = h - np.round(h), k - np.round(k), l - np.round(l)
    halo = model.halo_amplitude * np.exp(-0.5 * ((dh / sh) ** 2 + (dk / sk) ** 2 + (dl / sl) ** 2))
    ring = model.ring_amplitude * np.exp(-0.5 * ((q_mag - model.ring_q) / model.ring_width) ** 2)
    return halo + ring + model.floor


def _detector(spec: DatasetSpec):
    nf = spec.modules[0] * PILATUS_MODULE[0] + (spec.modules[0] - 1) * PILATUS_GAP[0]
    ns = spec.modules[1] * PILATUS_MODULE[1] + (spec.modules[1] - 1) * PILATUS_GAP[1]
    beam_centre = (nf * spec.pixel_mm * 0.47, ns * spec.pixel_mm * 0.53)  # mm, slightly off-centre
    det = DetectorFactory.simple("PAD", spec.distance_mm, beam_centre, "+x", "-y",
                                 (spec.pixel_mm, spec.pixel_mm), (nf, ns), (-1, 1_000_000))
    for p in det:
        p.set_thickness(0.45)
        p.set_material("Si")
    return det


def _gap_mask(nf: int, ns: int) -> np.ndarray:
    """True on PILATUS inter-module gap pixels, shape (slow, fast)."""
    gaps = np.zeros((ns, nf), bool)
    step_f, step_s = PILATUS_MODULE[0] + PILATUS_GAP[0], PILATUS_MODULE[1] + PILATUS_GAP[1]
    fx = np.arange(nf) % step_f >= PILATUS_MODULE[0]
    sy = np.arange(ns) % step_s >= PILATUS_MODULE[1]
    gaps[:, fx] = True
    gaps[sy, :] = True
    return gaps


def _bragg_table(rng: np.random.Generator, hmax: int) -> np.ndarray:
    """|F|^2 for every (h, k, l) in a cube, Wilson-like (exponentially distributed), fixed per dataset."""
    n = 2 * hmax + 1
    return rng.exponential(1.0, size=(n, n, n))


def generate(out_dir: str | Path, pixel_model: PixelModel, spec: DatasetSpec | None = None, progress=None) -> dict:
    """Write ``spec.n_stills`` CBF stills and ``truth.json`` into ``out_dir``; return the truth. ``pixel_model``
    gives the geometry and per-pixel correction of a still as the pipeline will read it (:data:`PixelModel`)."""
    spec = spec or DatasetSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    beam = BeamFactory.simple(spec.wavelength)
    beam.set_polarization_fraction(0.999)
    beam.set_polarization_normal((0.0, 1.0, 0.0))
    det = _detector(spec)
    nf, ns = det[0].get_image_size()
    # The models as dxtbx will read them back from the CBF (sensor attenuation, parallax, polarisation):
    # the forward model must use exactly the geometry the pipeline will see.
    staging = out / ".staging"
    staging.mkdir(exist_ok=True)
    probe = staging / "geometry_0001.cbf"
    FormatCBFMini.as_file(det, beam, None, None, flex.int(flex.grid(ns, nf), 0), str(probe))
    det, beam, q_lab, correction = pixel_model(probe)
    probe.unlink()
    panel = det[0]
    q_mag = np.linalg.norm(q_lab, axis=0)
    gaps = _gap_mask(nf, ns)
    bc = np.asarray(panel.get_beam_centre_px(beam.get_s0()))
    yy, xx = np.mgrid[0:ns, 0:nf]
    shadow = np.hypot(xx + 0.5 - bc[0], yy + 0.5 - bc[1]) * spec.pixel_mm < spec.beamstop_radius_mm

    uc = uctbx.unit_cell(spec.unit_cell)
    sym = crystal.symmetry(unit_cell=uc, space_group_symbol=spec.space_group)
    B = np.asarray(uc.fractionalization_matrix()).reshape(3, 3).T  # reciprocal basis (columns a*, b*, c*)
    hmax = int(np.ceil(q_mag.max() * max(spec.unit_cell[:3]))) + 1
    f2 = _bragg_table(rng, hmax)
    # systematic absences of the space group have no Bragg intensity
    sg = sym.space_group()
    scales = np.exp(rng.normal(0.0, spec.scale_spread, spec.n_stills))
    stills = []
    for i in range(spec.n_stills):
        U = Rotation.random(random_state=rng).as_matrix()
        A = U @ B
        hkl = np.einsum("ij,jsf->isf", np.linalg.inv(A), q_lab)
        diffuse = diffuse_truth(hkl[0], hkl[1], hkl[2], q_mag, spec.diffuse)
        hkl_int = np.round(hkl).astype(int)
        dq = q_lab - np.einsum("ij,jsf->isf", A, hkl_int)
        r2 = np.sum(dq * dq, axis=0) / spec.bragg_sigma_q ** 2
        peak = np.where(r2 < spec.bragg_cutoff_sigma ** 2, np.exp(-0.5 * r2), 0.0)  # compact Bragg peaks
        idx = np.clip(hkl_int + hmax, 0, 2 * hmax)
        f2_pix = f2[idx[0], idx[1], idx[2]]
        hit = peak > 0
        f2_hit = f2_pix[hit]
        if f2_hit.size:
            rows, inverse = np.unique(hkl_int[:, hit].T, axis=0, return_inverse=True)
            absent = np.array([sg.is_sys_absent(tuple(int(v) for v in r)) or not r.any() for r in rows])
            f2_hit[absent[inverse.ravel()]] = 0.0
        bragg = np.zeros_like(peak)
        bragg[hit] = spec.bragg_peak * f2_hit * peak[hit]
        expected = scales[i] * (diffuse + bragg) / correction
        expected[shadow] *= 0.002
        counts = rng.poisson(expected).astype(np.int32)
        counts[gaps] = -1
        path = out / f"still_{i + 1:04d}.cbf"
        # written aside, then renamed: a watcher never sees half a still
        FormatCBFMini.as_file(det, beam, None, None, flex.int(counts), str(staging / path.name))
        (staging / path.name).rename(path)
        stills.append({"file": path.name, "scale": float(scales[i]), "U": U.tolist(), "A": A.tolist()})
        if progress:
            progress(i + 1, spec.n_stills)
    truth = {"spec": asdict(spec), "stills": stills, "beam_centre_px": bc.tolist(),
             "image_size_fast_slow": [nf, ns]}
    (out / "truth.json").write_text(json.dumps(truth, indent=2))
    return truth


__all__ = ["DiffuseModel", "DatasetSpec", "PixelModel", "diffuse_truth", "generate"]
