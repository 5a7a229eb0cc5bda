"""A PILATUS-style rotation sweep with planted diffuse scattering, rendered with nanoBragg's physics.

The crystal, structure factors, background, photon levels, polarisation, solid angle and air absorption are
exactly those of the stills generator (:mod:`.stills`, whose :class:`~.stills.StillsRenderer` this module uses);
what changes is the motion: one crystal on a single-axis goniometer whose axis is the detector's fast axis
(lab +x, dxtbx's default for a mini-CBF), rotated through ``n_frames`` contiguous oscillations.

Frame ``i`` covers ``phi in [start + i osc, start + (i + 1) osc]`` and holds Poisson counts of

    dose * { scale(phi_i) * [ <Bragg>_i + <diffuse>_i ] + background } * air

where ``<.>_i`` is the mean over ``phi_steps`` sub-steps at the sub-step midpoints (nanoBragg's ``-phisteps``,
shifted by half a step so the sub-steps are centred in the frame). For the Bragg term each sub-step uses a
share of the ``mosaic_domains`` (nanoBragg's random domains from the simulator, fixed in the crystal), so a
frame averages ``mosaic_domains`` (sub-step, domain) orientations in all. ``scale(phi)`` is a smooth planted
function of the rotation angle, ``exp(scale_amplitude * sin(2 pi (phi - start) / scale_period_deg +
scale_phase))`` evaluated at the frame centre, as a decaying or wobbling beam/crystal would give. Orientation
convention (dxtbx's): ``q = R(phi) U B h`` with ``R`` the right-handed rotation about the axis.

Blank frames (``blank_NNNN.cbf``: background only, same geometry and exposure) form their own rotation
sequence over the same angular range, as a beamline's background run does, so DIALS and mdx2 import them.

:func:`generate_sweep` writes the frames and a ``truth.json`` that :class:`~.stills.DiffuseTruth` loads.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .cbf import CBFHeader
from .stills import SceneSpec, StillsRenderer, StillsSpec, start_truth, write_frame

#: the goniometer axis: the detector's fast axis in dxtbx's lab frame (FormatCBFMini's single_axis())
ROTATION_AXIS = (1.0, 0.0, 0.0)


@dataclass
class SweepSpec(SceneSpec):
    """What to render: the scene of :class:`~.stills.SceneSpec` (crystal, detector, levels; photons are per frame)
    on a rotation sweep.

    Defaults: 60 frames of 0.5 deg from 0 deg, a 2 x 5 module (981 x 1043 pixel) PILATUS-style detector,
    3 blank frames spanning the same 30 deg.
    """

    modules: tuple[int, int] = (2, 5)
    n_frames: int = 60
    osc_deg: float = 0.5
    start_deg: float = 0.0
    phi_steps: int = 4                        # sub-steps per frame (nanoBragg's -phisteps)
    n_blank_frames: int = 3
    #: oscillation written in the blank frames' headers (default: the sweep's range / n_blank_frames)
    blank_osc_deg: Optional[float] = None
    # smooth planted per-frame scale
    scale_amplitude: float = 0.15
    scale_period_deg: float = 40.0
    scale_phase: float = 0.7

    def __post_init__(self):
        super().__post_init__()
        if self.n_frames < 1 or self.n_blank_frames < 0:
            raise ValueError("n_frames must be >= 1 and n_blank_frames >= 0")
        if self.osc_deg <= 0 or self.phi_steps < 1:
            raise ValueError(f"osc_deg must be > 0 and phi_steps >= 1, got {self.osc_deg}, {self.phi_steps}")

    def stills_spec(self) -> StillsSpec:
        """The stills generator's spec with this sweep's crystal, detector and levels (no stills of its own)."""
        return StillsSpec(n_stills=0, n_background_frames=0,
                          **{f.name: getattr(self, f.name) for f in fields(SceneSpec)})

    @property
    def blank_osc(self) -> float:
        return self.blank_osc_deg if self.blank_osc_deg else self.n_frames * self.osc_deg / max(1, self.n_blank_frames)

    def frame_phi(self, i: int) -> tuple[float, float]:
        """(start, end) of frame i (0-based) in degrees."""
        a = self.start_deg + i * self.osc_deg
        return a, a + self.osc_deg

    def scale_at(self, phi_deg) -> np.ndarray:
        """The planted scale at rotation angle(s) ``phi_deg`` (degrees); 1 on average over a period."""
        x = 2.0 * math.pi * (np.asarray(phi_deg, float) - self.start_deg) / self.scale_period_deg + self.scale_phase
        return np.exp(self.scale_amplitude * np.sin(x))


def rotation(phi_deg: float, axis=ROTATION_AXIS) -> np.ndarray:
    """Right-handed rotation matrix by ``phi_deg`` about ``axis`` (dxtbx's goniometer convention)."""
    from scipy.spatial.transform import Rotation  # scipy (0.2 s): only when orientations are drawn

    a = np.asarray(axis, float)
    return Rotation.from_rotvec(a / np.linalg.norm(a) * math.radians(phi_deg)).as_matrix()


def oscillation_orientations(A0: np.ndarray, phi_start_deg: float, phi_end_deg: float, n_steps: int) -> list[np.ndarray]:
    """U B of a crystal (``A0`` at phi 0, 1/Angstrom) at the midpoints of ``n_steps`` equal sub-steps of the
    oscillation [phi_start_deg, phi_end_deg] (degrees): the orientations a frame's ``<.>_i`` averages over."""
    a, b = float(phi_start_deg), float(phi_end_deg)
    A0 = np.asarray(A0, float)
    return [rotation(a + (b - a) * (j + 0.5) / n_steps) @ A0 for j in range(int(n_steps))]


def crystal_orientation(spec: SweepSpec) -> np.ndarray:
    """U at phi = 0: uniformly random, reproducible from ``seed``."""
    from scipy.spatial.transform import Rotation  # scipy (0.2 s): only when orientations are drawn

    return Rotation.random(random_state=np.random.default_rng([spec.seed, 4])).as_matrix()


def _rotation_angle(M: np.ndarray) -> float:
    return math.acos(min(1.0, max(-1.0, (np.trace(M) - 1.0) / 2.0)))


class SweepRenderer:
    """Noise-free expected photons of a frame (slow, fast) for a crystal with orientation ``A0 = U B`` at phi 0;
    the stills generator's renderer (geometry, structure factors, background) set up once."""

    def __init__(self, spec: SweepSpec, threads: int = 1, stills: Optional[StillsRenderer] = None):
        self.spec = spec
        self.r = stills if stills is not None else StillsRenderer(spec.stills_spec(), threads=threads)
        self.background = self.r.background
        self.gaps = self.r.gaps
        self.B = self.r.B
        self._domains: dict = {}

    def diffuse(self, A0: np.ndarray, phi0: float, osc: float) -> np.ndarray:
        """Diffuse photons (unit scale, dose 1, with P, Omega, air) averaged over [phi0, phi0 + osc] at
        ``phi_steps`` midpoints: one render with the simulator's own spindle rotation."""
        r, s = self.r, self.spec
        torch = r._torch
        n_steps = int(s.phi_steps)
        cr = r._crystal(A0, s.diffuse_cells, "GAUSS", mosaic=False).replace(
            phi_start_deg=phi0 + osc / (2 * n_steps), osc_range_deg=osc, phi_steps=n_steps,
            spindle_axis=ROTATION_AXIS)
        with torch.no_grad(), r._threads():
            p = r._prepare(cr, r.detector, r.beam, r.table, dtype=torch.float32)
            img = r._render(p, r.detector).numpy().astype(np.float64)
        n = float(np.prod(s.diffuse_cells))
        return img * (r.diffuse_peak / (n * n * r.omega_ref)) * r.air

    def mosaic_domains(self, A0: np.ndarray) -> list[np.ndarray]:
        """nanoBragg's domain rotations (the simulator's, seed fixed), as rotations D with A_domain = D A0."""
        key = np.asarray(A0, float).tobytes()
        if key not in self._domains:
            r, s = self.r, self.spec
            torch = r._torch
            cr = r._crystal(A0, s.bragg_cells, "GAUSS", mosaic=True)
            with torch.no_grad():
                M = r._prepare(cr, r.detector, r.beam, None, dtype=torch.float64).A.numpy() * 1e10   # rows a, b, c
            self._domains[key] = [np.linalg.inv(m) @ np.linalg.inv(A0) for m in M]                # D = A_m A0^-1
        return self._domains[key]

    def bragg(self, A0: np.ndarray, phi0: float, osc: float, frame_index: int = 0) -> np.ndarray:
        """Bragg photons (unit scale, dose 1, with P, Omega, air) over [phi0, phi0 + osc]: the mean over
        ``mosaic_domains`` orientations R(phi_p) D_m A0, domain m at sub-step p = (m + frame_index) mod phi_steps,
        each rendered (``bragg_oversample``^2 sub-pixels) only where one of its lattice points is near."""
        r, s = self.r, self.spec
        torch = r._torch
        n = float(np.prod(s.bragg_cells))
        sigma_q = math.sqrt(0.63) / (2.0 * n)
        det = r.detector.replace(oversample=s.bragg_oversample)
        reach = 5.0 * sigma_q + 0.9 * s.pixel_mm / s.distance_mm / s.wavelength_A
        n_steps = int(s.phi_steps)
        phis = phi0 + (np.arange(n_steps) + 0.5) * osc / n_steps
        Rc = rotation(phi0 + 0.5 * osc)
        samples = [rotation(phis[(m + frame_index) % n_steps]) @ D for m, D in enumerate(self.mosaic_domains(A0))]
        theta = max(_rotation_angle(S @ Rc.T) for S in samples)
        # candidates: pixels near a lattice point of the frame-centre orientation, widened by the largest
        # rotation of a sample from it (|A_s h - A_c h| <= theta |A_s h|), so no sample's spot is cut
        q = r.q.reshape(-1, 3)
        qn = r.qmag.reshape(-1)
        Ac = Rc @ A0
        dq = q - np.ceil(q @ np.linalg.inv(Ac).T - 0.5) @ Ac.T
        cand = np.flatnonzero(np.einsum("ij,ij->i", dq, dq) < (reach + theta * (qn + reach)) ** 2)
        qc = q[cand].astype(np.float32)
        img = np.zeros(r.q.shape[:2])
        with torch.no_grad(), r._threads():
            for S in samples:
                A = S @ A0                                                       # columns a*, b*, c*
                Ainv = np.linalg.inv(A)
                d = qc - np.ceil(qc @ Ainv.T.astype(np.float32) - 0.5) @ A.T.astype(np.float32)
                near = cand[np.einsum("ij,ij->i", d, d) < reach * reach]
                if not near.size:
                    continue
                mask = np.zeros(q.shape[0], bool)
                mask[near] = True
                cr = r._crystal(A, s.bragg_cells, "GAUSS", mosaic=False)
                p = r._prepare(cr, det, r.beam, r.table, dtype=torch.float32)
                img += r._render(p, det, pixel_mask=torch.from_numpy(mask.reshape(r.q.shape[:2]))).numpy()
        img /= len(samples)
        return img * (s.bragg_peak_photons / (n * n * r.omega_ref)) * r.air

    def frame(self, A0: np.ndarray, i: int) -> np.ndarray:
        """Expected photons of frame i (0-based) at the spec's dose, scale, background included."""
        s = self.spec
        a, b = s.frame_phi(i)
        scale = float(s.scale_at(0.5 * (a + b)))
        return s.dose * (scale * (self.diffuse(A0, a, s.osc_deg) + self.bragg(A0, a, s.osc_deg, i)) + self.background)


def _timestamp(seconds: float) -> str:
    t = _dt.datetime(2026, 1, 1) + _dt.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def generate_sweep(out_dir: str | Path, spec: Optional[SweepSpec] = None,
                   progress: Optional[Callable[[int, int], None]] = None,
                   renderer: Optional[SweepRenderer] = None) -> dict:
    """Write ``sweep_NNNN.cbf`` (n_frames, numbered from 1), ``blank_NNNN.cbf`` (n_blank_frames),
    ``structure_factors.npz`` and ``truth.json`` into ``out_dir``; return the truth dict.

    The truth dict has the stills generator's keys (so :class:`~.stills.DiffuseTruth` loads it or its
    directory) plus ``rotation_axis``, ``scan`` (start, oscillation, frames), ``U0``/``A0`` (orientation at
    phi 0, dxtbx convention: ``q = R(phi) A0 h``), ``scale_model`` and per frame its file, angles, planted
    scale and ``A`` at the frame centre. Same spec -> identical files. ``progress(done, total)`` after each frame.
    """
    spec = spec or SweepSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sr = renderer if renderer is not None else SweepRenderer(spec)
    r = sr.r
    U0 = crystal_orientation(spec)
    A0 = U0 @ sr.B
    noise = np.random.default_rng([spec.seed, 5, spec.noise_seed])
    truth = start_truth(out, "diff_sim_refiner.datasets.sweep", spec, r.spec, r,
                        units="photons per reference pixel (pixel^2/distance^2 sr) per frame, polarisation and air "
                              "removed, unit scale, background and Bragg excluded, at this dose",
                        conventions="dxtbx lab frame (beam along -z); q = s1 - s0 (1/Angstrom) = R(phi) A0 h, R "
                                    "right-handed about rotation_axis; columns of A are a*, b*, c*")
    truth.update({
        "rotation_axis": list(ROTATION_AXIS),
        "scan": {"start_deg": spec.start_deg, "osc_deg": spec.osc_deg, "n_frames": spec.n_frames,
                 "phi_steps": spec.phi_steps, "template": "sweep_####.cbf"},
        "U0": U0.tolist(),
        "A0": A0.tolist(),
        "scale_model": {"formula": "exp(amplitude * sin(2 pi (phi - start_deg) / period_deg + phase)) at the "
                                   "frame centre", "amplitude": spec.scale_amplitude,
                        "period_deg": spec.scale_period_deg, "phase": spec.scale_phase},
        "frames": [],
        "stills": [],
        "background_frames": [],
    })
    (out / "truth.json").write_text(json.dumps(truth, indent=2))
    total = spec.n_frames + spec.n_blank_frames

    def header(phi0: float, osc: float, t: float) -> CBFHeader:
        return CBFHeader(pixel_mm=spec.pixel_mm, distance_mm=spec.distance_mm, wavelength_A=spec.wavelength_A,
                         beam_xy_px=r.spec.beam_xy_px, exposure_s=spec.exposure_s,
                         start_angle_deg=phi0, angle_increment_deg=osc, polarization=spec.polarization_fraction,
                         timestamp=_timestamp(t))

    for i in range(spec.n_frames):
        a, b = spec.frame_phi(i)
        expected = sr.frame(A0, i)
        name = f"sweep_{i + 1:04d}.cbf"
        write_frame(out / name, expected, sr.gaps, noise, header(a, spec.osc_deg, i * spec.exposure_s))
        truth["frames"].append({"file": name, "phi_start_deg": a, "phi_end_deg": b,
                                "scale": float(spec.scale_at(0.5 * (a + b))),
                                "A": (rotation(0.5 * (a + b)) @ A0).tolist()})
        if progress:
            progress(i + 1, total)
    bkg = spec.dose * sr.background
    for j in range(spec.n_blank_frames):
        name = f"blank_{j + 1:04d}.cbf"
        phi0 = spec.start_deg + j * spec.blank_osc
        write_frame(out / name, bkg, sr.gaps, noise, header(phi0, spec.blank_osc, 3600.0 + j * spec.exposure_s))
        truth["background_frames"].append(name)
        if progress:
            progress(spec.n_frames + j + 1, total)
    (out / "truth.json").write_text(json.dumps(truth, indent=2))
    return truth


__all__ = ["SweepSpec", "SweepRenderer", "generate_sweep", "crystal_orientation", "rotation", "ROTATION_AXIS"]
