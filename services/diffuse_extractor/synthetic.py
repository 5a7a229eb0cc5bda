"""Synthetic stills with known diffuse signal and Bragg peaks (tests, benchmarks, demos).

Builds small dxtbx models in memory: a beam, a multi-panel detector (one panel normal to the
beam, one tilted), a crystal, and renders raw counts = planted diffuse / corrections + Bragg peaks.
The forward model uses *independent* references: pixel positions from dxtbx
``get_pixel_lab_coord``, polarisation and efficiency from DIALS' ``Corrections``, and the
analytic flat-panel solid angle ``A d / r^3``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cctbx.eltbx import attenuation_coefficient
from dials.algorithms.integration import Corrections, CorrectionsMulti
from dials.array_family import flex
from dxtbx import flumpy
from dxtbx.model import Beam, Crystal, Detector, Experiment, ParallaxCorrectedPxMmStrategy
from scitbx import matrix

from .core.corrections import air_attenuation_coefficient, reference_solid_angle


def _beam(wavelength, pol_fraction):
    b = Beam(direction=(0.0, 0.0, 1.0), wavelength=wavelength)
    b.set_polarization_normal((0.0, 1.0, 0.0))
    b.set_polarization_fraction(pol_fraction)
    return b


def silicon_mu_per_mm(wavelength: float) -> float:
    """Linear attenuation coefficient of silicon (1/mm) from cctbx's tables, as dxtbx formats do."""
    return attenuation_coefficient.get_table("Si").mu_at_angstrom(wavelength) / 10.0


def make_detector(wavelength: float = 1.0, n: int = 160, pixel: float = 0.172, distance: float = 100.0,
                  tilt_deg: float = 25.0, thickness: float = 0.45, parallax: bool = True):
    """Two panels: panel 0 normal to the beam holding the direct beam, panel 1 tilted about y."""
    det = Detector()
    mu = silicon_mu_per_mm(wavelength)
    # panel 0: beam centre at pixel (40.3, 80.7); lab y up, fast +x, slow -y (PILATUS-like)
    p0 = det.add_panel()
    p0.set_frame((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (-40.3 * pixel, 80.7 * pixel, -distance))
    # panel 1: to the +x side, tilted by tilt_deg about the y axis, away from the sample
    t = np.radians(tilt_deg)
    fast = (np.cos(t), 0.0, -np.sin(t))  # receding: strongly oblique incidence
    origin = ((n - 40.3 + 5) * pixel, 80.7 * pixel, -distance)
    p1 = det.add_panel()
    p1.set_frame(fast, (0.0, -1.0, 0.0), origin)
    for i, p in enumerate((p0, p1)):
        p.set_name(f"panel{i}")
        p.set_image_size((n, n))
        p.set_pixel_size((pixel, pixel))
        p.set_trusted_range((-1.0, 1.0e6))
        p.set_thickness(thickness)
        p.set_material("Si")
        p.set_mu(mu)
        p.set_type("SENSOR_PAD")
        if parallax:
            p.set_px_mm_strategy(ParallaxCorrectedPxMmStrategy(mu, thickness))
    return det


def make_crystal(cell=(40.0, 50.0, 60.0), rot_deg=(20.0, 35.0, 10.0)):
    """A P1 crystal with the given cell (angstrom, 90 degree angles) and a fixed orientation."""
    R = (matrix.col((1, 0, 0)).axis_and_angle_as_r3_rotation_matrix(rot_deg[0], deg=True)
         * matrix.col((0, 1, 0)).axis_and_angle_as_r3_rotation_matrix(rot_deg[1], deg=True)
         * matrix.col((0, 0, 1)).axis_and_angle_as_r3_rotation_matrix(rot_deg[2], deg=True))
    a = R * matrix.col((cell[0], 0, 0))
    b = R * matrix.col((0, cell[1], 0))
    c = R * matrix.col((0, 0, cell[2]))
    return Crystal(a, b, c, space_group_symbol="P 1")


def make_experiment(wavelength: float = 1.0, n: int = 160, **kw):
    return Experiment(beam=_beam(wavelength, 0.999), detector=make_detector(wavelength, n=n, **kw),
                      crystal=make_crystal())


def diffuse_model(qx, qy, qz) -> np.ndarray:
    """The planted smooth diffuse intensity (counts per reference pixel) as a function of q (1/A)."""
    q = np.sqrt(qx * qx + qy * qy + qz * qz)
    return 150.0 + 100.0 * np.exp(-(((q - 0.25) / 0.1) ** 2)) + 40.0 * qx / 0.5


@dataclass
class SyntheticStill:
    experiment: object
    data: list  # raw counts per panel
    diffuse: list  # planted corrected diffuse per panel
    bragg: list  # planted Bragg counts per panel (raw units)
    reflections: object  # DIALS table of "observed" spots (panel, bbox, xyzobs.px.value)
    reference_correction: list  # independent total multiplier per panel


def render(experiment, i0: float = 5000.0, sigma_px: float = 1.0, sigma_psi: float = 3e-4,
           mu_air_per_mm: float | None = None) -> SyntheticStill:
    """Raw image = diffuse / reference corrections + Bragg peaks (2D Gaussians of ``sigma_px``).

    Bragg peak height ``i0 exp(-(eps/|q|)^2 / (2 sigma_psi^2))`` for excitation error ``eps``:
    reflections outside DIALS' |delta psi| < 1.5 mrad prediction window are negligible.
    """
    beam, det, cryst = experiment.beam, experiment.detector, experiment.crystal
    wl = beam.get_wavelength()
    s0 = np.asarray(beam.get_s0())
    mu_air = air_attenuation_coefficient(wl) if mu_air_per_mm is None else mu_air_per_mm
    multi = CorrectionsMulti()
    multi.append(Corrections(beam, det))
    omega_ref = reference_solid_angle(det)
    data, diffuse, bragg_imgs, refcorr = [], [], [], []
    A = np.asarray(cryst.get_A()).reshape(3, 3)
    # reflections near the Ewald sphere, by brute force over a box of indices
    uc = cryst.get_unit_cell().parameters()
    dmin = det.get_max_resolution(beam.get_s0())
    hm = [int(x / dmin) + 1 for x in uc[:3]]
    hh = np.stack(np.meshgrid(*[np.arange(-m, m + 1) for m in hm], indexing="ij"), -1).reshape(-1, 3)
    q = hh @ A.T
    qn = np.linalg.norm(q, axis=1)
    ok = qn > 0
    hh, q, qn = hh[ok], q[ok], qn[ok]
    eps = np.linalg.norm(q + s0, axis=1) - np.linalg.norm(s0)
    amp = i0 * np.exp(-0.5 * (eps / qn / sigma_psi) ** 2)
    keep = amp > 1e-3
    hh, q, amp = hh[keep], q[keep], amp[keep]
    obs_panel, obs_xyz, obs_bbox = [], [], []
    for ip, panel in enumerate(det):
        nx, ny = panel.get_image_size()
        yy, xx = np.mgrid[0:ny, 0:nx]
        px = flex.vec2_double(list(zip((xx.ravel() + 0.5).tolist(), (yy.ravel() + 0.5).tolist())))
        lab = flex.vec3_double(panel.get_lab_coord(panel.pixel_to_millimeter(px)))  # dxtbx, with parallax
        lab = np.asarray(lab).reshape(-1, 3)
        r = np.linalg.norm(lab, axis=1)
        s1 = lab / r[:, None] / wl
        qpix = s1 - s0
        D = diffuse_model(qpix[:, 0], qpix[:, 1], qpix[:, 2])
        s1f = flumpy.vec_from_numpy(np.ascontiguousarray(s1))
        ids = flex.int(len(s1f), 0)
        lp = np.asarray(multi.lp(ids, s1f))  # 1/P multiplier
        qe = np.asarray(multi.qe(ids, s1f, flex.size_t(len(s1f), ip)))  # efficiency (divide by)
        n = np.asarray(panel.get_normal())
        d_perp = abs(float(np.dot(n, panel.get_origin())))
        omega = panel.get_pixel_size()[0] * panel.get_pixel_size()[1] * d_perp / r ** 3
        total = lp / qe * (omega_ref / omega) * np.exp(mu_air * r)
        raw_diffuse = (D / total).reshape(ny, nx)
        # Bragg peaks on this panel
        img_b = np.zeros((ny, nx))
        for hkl, qv, a in zip(hh, q, amp):
            s1v = (s0 + qv)
            s1v = s1v / np.linalg.norm(s1v) / wl
            try:
                x, y = panel.get_ray_intersection_px(tuple(s1v))
            except RuntimeError:
                continue
            if not (-5 <= x < nx + 5 and -5 <= y < ny + 5) or np.dot(s1v, n) * np.dot(n, panel.get_origin()) <= 0:
                continue
            x0, x1 = max(int(x) - 8, 0), min(int(x) + 9, nx)
            y0, y1 = max(int(y) - 8, 0), min(int(y) + 9, ny)
            if x0 >= x1 or y0 >= y1:
                continue
            gy, gx = np.mgrid[y0:y1, x0:x1]
            img_b[y0:y1, x0:x1] += a * np.exp(-(((gx + 0.5 - x) ** 2 + (gy + 0.5 - y) ** 2) / (2 * sigma_px ** 2)))
            if a > 50 and 0 <= x < nx and 0 <= y < ny:  # what a spot finder would see
                h3 = 3 * sigma_px
                obs_panel.append(ip)
                obs_xyz.append((x, y, 0.5))
                obs_bbox.append((int(np.floor(x - h3)), int(np.ceil(x + h3)), int(np.floor(y - h3)),
                                 int(np.ceil(y + h3)), 0, 1))
        data.append(raw_diffuse + img_b)
        diffuse.append(D.reshape(ny, nx))
        bragg_imgs.append(img_b)
        refcorr.append(total.reshape(ny, nx))
    refl = flex.reflection_table()
    refl["panel"] = flex.size_t(obs_panel)
    refl["xyzobs.px.value"] = flex.vec3_double(obs_xyz)
    refl["bbox"] = flex.int6(obs_bbox)
    refl["id"] = flex.int(len(obs_panel), 0)
    return SyntheticStill(experiment, data, diffuse, bragg_imgs, refl, refcorr)
