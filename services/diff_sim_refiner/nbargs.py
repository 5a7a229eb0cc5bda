"""nanoBragg command-line flags -> simulator configuration (torch-free, so the CLI starts fast).

Flags are matched exactly (nanoBragg itself matches by substring, which makes e.g. ``-twotheta_axis``
also set ``-twotheta``); every nanoBragg flag that affects the physics modelled here is accepted,
with nanoBragg's defaults and its auto-selection rules (phi steps, divergence/dispersion steps,
mosaic domains, pivots per convention, beam centres per convention).  Differences, on purpose:
``-pix0_vector`` (metres) and ``-pix0_vector_mm`` (mm) are used as the pixel-(0,0) vector only when no
beam centre flag (-Xbeam/-Ybeam/-ORGX/-ORGY/-Xclose/-Yclose) is given (the reference build always
overwrites pix0 with the pivot's value, so with a beam centre the result is identical to it), nanoBragg's
re-use of the previous phi step for a step at exactly phi = 0 is reproduced, and unknown flags are errors.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from diffractflow.errors import InputError

from .core import io as nbio
from .core.config import (
    resolve_steps,
    DEFAULT_FLUENCE,
    BeamConfig,
    CrystalConfig,
    CrystalShape,
    DetectorConfig,
    DetectorConvention,
    DetectorPivot,
)


class FlagError(InputError):
    """A bad command line (message names the flag): an input error (the worker rejects the job, the CLI exits 2)."""


def _config(cls, kw: dict):
    """``cls(**kw)``: a value the simulator's config refuses (its __post_init__ raises ValueError) is a FlagError."""
    try:
        return cls(**kw)
    except ValueError as exc:
        raise FlagError(f"inconsistent flags: {exc}") from exc


@dataclass
class NanoBraggArgs:
    """The raw values of the flags, with nanoBragg's sentinels (-1 / None = not given)."""

    # crystal
    cell: Optional[list[float]] = None
    mat: Optional[str] = None
    hkl: Optional[str] = None
    dump: str = "Fdump.bin"
    default_F: float = 0.0
    Na: float = 1.0
    Nb: float = 1.0
    Nc: float = 1.0
    xtalsize_mm: Optional[list[Optional[float]]] = None
    misset: Optional[tuple] = None          # (x, y, z) degrees or "random"
    misset_seed: Optional[int] = None
    mosaic_deg: float = -1.0
    mosaic_domains: int = -1
    mosaic_seed: int = 12345678
    phi_deg: float = 0.0
    osc_deg: float = -1.0
    phistep_deg: float = -1.0
    phisteps: int = -1
    shape: CrystalShape = CrystalShape.SQUARE
    fudge: float = 1.0
    interpolate: Optional[bool] = None
    # beam
    lambda_A: float = 1.0
    fluence: float = DEFAULT_FLUENCE
    flux: float = 0.0
    exposure: float = 1.0
    beamsize_mm: float = 0.1
    polar: float = 0.0
    nopolar: bool = False
    dispersion_pct: float = 0.0
    dispstep_pct: float = -1.0
    dispsteps: int = -1
    hdivrange: float = -1.0
    vdivrange: float = -1.0
    hdivstep: float = -1.0
    vdivstep: float = -1.0
    hdivsteps: int = -1
    vdivsteps: int = -1
    round_div: bool = True
    dmin_A: float = 0.0
    # detector
    convention: DetectorConvention = DetectorConvention.MOSFLM
    pivot: DetectorPivot = DetectorPivot.BEAM
    distance_mm: float = 100.0
    close_distance_mm: Optional[float] = None
    pixel_mm: float = 0.1
    detsize_f_mm: float = 102.4
    detsize_s_mm: float = 102.4
    fpixels: int = 0
    spixels: int = 0
    Xbeam: Optional[float] = None
    Ybeam: Optional[float] = None
    Xclose: Optional[float] = None
    Yclose: Optional[float] = None
    ORGX: Optional[float] = None
    ORGY: Optional[float] = None
    rotx: float = 0.0
    roty: float = 0.0
    rotz: float = 0.0
    twotheta: float = 0.0
    vectors: dict = field(default_factory=dict)  # fdet/sdet/odet/beam/polar/spindle/twotheta_axis/pix0 (m)
    point_pixel: bool = False
    curved: bool = False
    oversample: int = -1
    oversample_omega: bool = False
    oversample_polar: bool = False
    roi: Optional[tuple[int, int, int, int]] = None
    # outputs
    floatfile: str = "floatimage.bin"
    intfile: str = "intimage.img"
    noisefile: str = "noiseimage.img"
    pgmfile: str = "image.pgm"
    write_noise: bool = True
    write_pgm: bool = True
    intfile_scale: float = 0.0
    pgm_scale: float = 0.0
    adc: float = 40.0
    seed: Optional[int] = None
    progress: bool = True
    # extensions
    spot_cutoff: Optional[float] = None
    spot_local: Optional[float] = None    # render only pixels near reflections (K fringes), see spot_local_mask
    float64: bool = False
    threads: int = 0
    given: set = field(default_factory=set)


Handler = Callable[[NanoBraggArgs, list[str]], None]


def _num(flag: str, tok: str, kind=float):
    try:
        if kind is int:
            v = float(tok)
            if not v.is_integer():
                raise ValueError
            return int(v)
        v = float(tok)
        if not math.isfinite(v):
            raise ValueError
        return v
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise FlagError(f"flag {flag} expects {what}, got {tok!r}") from None


def _set(attr: str, kind=float, scale: float = 1.0, then: Optional[Callable[[NanoBraggArgs], None]] = None):
    def h(a: NanoBraggArgs, vals: list[str], flag: str):
        v = _num(flag, vals[0], kind)
        setattr(a, attr, v * scale if kind is float else v)
        if then:
            then(a)
    return (1, h)


def _flag(fn: Callable[[NanoBraggArgs], None]):
    return (0, lambda a, vals, flag: fn(a))


def _vec(name: str, scale: float = 1.0, custom: bool = True):
    def h(a: NanoBraggArgs, vals: list[str], flag: str):
        a.vectors[name] = tuple(_num(flag, v) * scale for v in vals)
        if custom:
            a.convention = DetectorConvention.CUSTOM
    return (3, h)


def _pivot(p: DetectorPivot):
    def f(a: NanoBraggArgs):
        a.pivot = p
    return f


def _conv(c: DetectorConvention, p: DetectorPivot):
    def f(a: NanoBraggArgs):
        a.convention = c
        a.pivot = p
    return (0, lambda a, vals, flag: f(a))


def _str(attr: str):
    def h(a, vals, flag):
        setattr(a, attr, vals[0])
    return (1, h)


def _N(a: NanoBraggArgs, vals, flag):
    a.Na = a.Nb = a.Nc = _num(flag, vals[0], int)


def _detsize(a, vals, flag):
    a.detsize_f_mm = a.detsize_s_mm = _num(flag, vals[0])


def _detpixels(a, vals, flag):
    a.fpixels = a.spixels = _num(flag, vals[0], int)


def _roi(a, vals, flag):
    a.roi = tuple(_num(flag, v, int) for v in vals)


def _pivot_word(a, vals, flag):
    w = vals[0].lower()
    if w not in ("sample", "beam"):
        raise FlagError(f"flag {flag} expects 'sample' or 'beam', got {vals[0]!r}")
    a.pivot = DetectorPivot.SAMPLE if w == "sample" else DetectorPivot.BEAM


def _xtalsize(which: str):
    def h(a, vals, flag):
        v = _num(flag, vals[0])
        if a.xtalsize_mm is None:
            a.xtalsize_mm = [None, None, None]
        idx = {"all": (0, 1, 2), "x": (0,), "y": (1,), "z": (2,)}[which]
        for i in idx:
            a.xtalsize_mm[i] = v
    return (1, h)


def _shape(s: CrystalShape):
    def f(a):
        a.shape = s
    return _flag(f)


def _seed(attr: str):
    def h(a, vals, flag):
        setattr(a, attr, _num(flag, vals[0], int))
    return (1, h)


def _printout_pixel(a, vals, flag):
    _num(flag, vals[0], int)
    _num(flag, vals[1], int)


# flag -> (number of values, handler(args, values, flag)); -cell and -misset are parsed specially
FLAGS: dict[str, tuple[int, Callable]] = {
    # crystal
    "-mat": _str("mat"), "-hkl": _str("hkl"), "-dump": _str("dump"),
    "-default_F": _set("default_F"),
    "-N": (1, _N), "-Na": _set("Na", int), "-Nb": _set("Nb", int), "-Nc": _set("Nc", int),
    "-xtalsize": _xtalsize("all"), "-xtal_size": _xtalsize("all"), "-samplesize": _xtalsize("all"),
    "-sample_size": _xtalsize("all"), "-xtal_x": _xtalsize("x"), "-xtal_y": _xtalsize("y"), "-xtal_z": _xtalsize("z"),
    "-misset_seed": _seed("misset_seed"),
    "-mosaic": _set("mosaic_deg"), "-mosaicity": _set("mosaic_deg"), "-mosaic_spread": _set("mosaic_deg"),
    "-mosaic_dom": _set("mosaic_domains", int), "-mosaic_domains": _set("mosaic_domains", int),
    "-mosaic_seed": _seed("mosaic_seed"),
    "-phi": _set("phi_deg"), "-osc": _set("osc_deg"), "-phistep": _set("phistep_deg"),
    "-phisteps": _set("phisteps", int),
    "-spindle_axis": _vec("spindle"),
    "-square_xtal": _shape(CrystalShape.SQUARE), "-round_xtal": _shape(CrystalShape.ROUND),
    "-gauss_xtal": _shape(CrystalShape.GAUSS), "-tophat_spots": _shape(CrystalShape.TOPHAT),
    "-binary_spots": _shape(CrystalShape.TOPHAT), "-fudge": _set("fudge"),
    "-interpolate": _flag(lambda a: setattr(a, "interpolate", True)),
    "-nointerpolate": _flag(lambda a: setattr(a, "interpolate", False)),
    # beam
    "-lambda": _set("lambda_A"), "-wave": _set("lambda_A"), "-wavelength": _set("lambda_A"),
    "-energy": (1, lambda a, v, f: setattr(a, "lambda_A", 12398.42 / _num(f, v[0]))),
    "-fluence": _set("fluence"), "-flux": _set("flux"), "-exposure": _set("exposure"),
    "-beamsize": _set("beamsize_mm"),
    "-polar": (1, lambda a, v, f: (setattr(a, "polar", _num(f, v[0])), setattr(a, "nopolar", False))),
    "-nopolar": _flag(lambda a: setattr(a, "nopolar", True)),
    "-polar_vector": _vec("polar"), "-beam_vector": _vec("beam"),
    "-dispersion": _set("dispersion_pct"), "-dispstep": _set("dispstep_pct"), "-dispsteps": _set("dispsteps", int),
    "-divergence": (1, lambda a, v, f: (setattr(a, "hdivrange", _num(f, v[0])), setattr(a, "vdivrange", _num(f, v[0])))),
    "-hdivrange": _set("hdivrange"), "-vdivrange": _set("vdivrange"),
    "-hdivstep": _set("hdivstep"), "-vdivstep": _set("vdivstep"),
    "-hdivsteps": _set("hdivsteps", int), "-vdivsteps": _set("vdivsteps", int),
    "-divsteps": (1, lambda a, v, f: (setattr(a, "hdivsteps", _num(f, v[0], int)),
                                      setattr(a, "vdivsteps", _num(f, v[0], int)))),
    "-round_div": _flag(lambda a: setattr(a, "round_div", True)),
    "-square_div": _flag(lambda a: setattr(a, "round_div", False)),
    "-dmin": _set("dmin_A"),
    # detector
    "-distance": _set("distance_mm", then=_pivot(DetectorPivot.BEAM)),
    "-close_distance": _set("close_distance_mm", then=_pivot(DetectorPivot.SAMPLE)),
    "-detsize": (1, _detsize), "-detsize_f": _set("detsize_f_mm"), "-detsize_s": _set("detsize_s_mm"),
    "-detpixels": (1, _detpixels),
    "-detpixels_f": _set("fpixels", int), "-detpixels_x": _set("fpixels", int),
    "-detpixels_s": _set("spixels", int), "-detpixels_y": _set("spixels", int),
    "-pixel": _set("pixel_mm"),
    "-Xbeam": _set("Xbeam", then=_pivot(DetectorPivot.BEAM)), "-Ybeam": _set("Ybeam", then=_pivot(DetectorPivot.BEAM)),
    "-Xclose": _set("Xclose", then=_pivot(DetectorPivot.SAMPLE)),
    "-Yclose": _set("Yclose", then=_pivot(DetectorPivot.SAMPLE)),
    "-ORGX": _set("ORGX", then=_pivot(DetectorPivot.SAMPLE)), "-ORGY": _set("ORGY", then=_pivot(DetectorPivot.SAMPLE)),
    "-pivot": (1, _pivot_word),
    "-mosflm": _conv(DetectorConvention.MOSFLM, DetectorPivot.BEAM),
    "-xds": _conv(DetectorConvention.XDS, DetectorPivot.SAMPLE),
    "-adxv": _conv(DetectorConvention.ADXV, DetectorPivot.BEAM),
    "-denzo": _conv(DetectorConvention.DENZO, DetectorPivot.BEAM),
    "-dials": _conv(DetectorConvention.DIALS, DetectorPivot.BEAM),
    "-fdet_vector": _vec("fdet"), "-sdet_vector": _vec("sdet"), "-odet_vector": _vec("odet"),
    "-twotheta_axis": _vec("twotheta_axis"),
    "-pix0_vector": _vec("pix0"), "-pix0_vector_mm": _vec("pix0", 1e-3),
    "-detector_rotx": _set("rotx"), "-detector_roty": _set("roty"), "-detector_rotz": _set("rotz"),
    "-twotheta": _set("twotheta", then=_pivot(DetectorPivot.SAMPLE)),
    "-point_pixel": _flag(lambda a: setattr(a, "point_pixel", True)),
    "-curved_det": _flag(lambda a: setattr(a, "curved", True)),
    "-oversample": _set("oversample", int),
    "-oversample_omega": _flag(lambda a: setattr(a, "oversample_omega", True)),
    "-oversample_polar": _flag(lambda a: setattr(a, "oversample_polar", True)),
    "-roi": (4, _roi),
    # outputs
    "-floatfile": _str("floatfile"), "-floatimage": _str("floatfile"),
    "-intfile": _str("intfile"), "-intimage": _str("intfile"),
    "-noisefile": (1, lambda a, v, f: (setattr(a, "noisefile", v[0]), setattr(a, "write_noise", True))),
    "-noiseimage": (1, lambda a, v, f: (setattr(a, "noisefile", v[0]), setattr(a, "write_noise", True))),
    "-pgmfile": (1, lambda a, v, f: (setattr(a, "pgmfile", v[0]), setattr(a, "write_pgm", True))),
    "-pgmimage": (1, lambda a, v, f: (setattr(a, "pgmfile", v[0]), setattr(a, "write_pgm", True))),
    "-nonoise": _flag(lambda a: setattr(a, "write_noise", False)),
    "-nopgm": _flag(lambda a: setattr(a, "write_pgm", False)),
    "-scale": _set("intfile_scale"),
    "-pgmscale": (1, lambda a, v, f: (setattr(a, "pgm_scale", _num(f, v[0])), setattr(a, "write_pgm", True))),
    "-adc": _set("adc"), "-seed": _seed("seed"),
    "-noprogress": _flag(lambda a: setattr(a, "progress", False)),
    "-progress": _flag(lambda a: setattr(a, "progress", True)),
    "-printout": _flag(lambda a: None), "-printout_pixel": (2, _printout_pixel),
    # extensions of this implementation
    "-spot_cutoff": _set("spot_cutoff"),
    "-spot_local": _set("spot_local"),
    "-float64": _flag(lambda a: setattr(a, "float64", True)),
    "-threads": _set("threads", int),
}

UNSUPPORTED = {
    "-water", "-detector_abs", "-detector_absorb", "-detector_thick", "-detector_thicksteps", "-thicksteps",
    "-stol", "-4stol", "-Q", "-stolout", "-sourcefile", "-img", "-mask", "-coherent", "-sample_thick",
    "-sample_width", "-sample_height", "-density", "-MW", "-source_distance",
}


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def parse_args(argv: list[str]) -> NanoBraggArgs:
    """Parse nanoBragg flags; raise :class:`FlagError` naming the first bad or unknown flag."""
    a = NanoBraggArgs()
    i = 0
    n = len(argv)
    while i < n:
        flag = argv[i]
        if not flag.startswith("-") or _is_number(flag):
            raise FlagError(f"unexpected argument {flag!r} (flags start with '-', e.g. -distance 100)")
        if flag == "-cell":
            vals = []
            j = i + 1
            while j < n and len(vals) < 6 and not argv[j].startswith("-"):
                vals.append(_num(flag, argv[j]))
                j += 1
            if not vals:
                raise FlagError("flag -cell expects 1 to 6 numbers: a b c alpha beta gamma (Angstrom, degrees)")
            a.cell = vals
            a.given.add(flag)
            i = j
            continue
        if flag == "-misset":
            if i + 1 < n and argv[i + 1].startswith("rand"):
                a.misset = "random"
                i += 2
                continue
            if i + 3 >= n:
                raise FlagError("flag -misset expects 3 angles (degrees) or 'random'")
            a.misset = tuple(_num(flag, v) for v in argv[i + 1:i + 4])
            a.given.add(flag)
            i += 4
            continue
        if flag in UNSUPPORTED:
            raise FlagError(f"flag {flag} is a nanoBragg flag that diff-sim-refiner does not model")
        if flag not in FLAGS:
            raise FlagError(f"unknown flag {flag}")
        nvals, handler = FLAGS[flag]
        vals = argv[i + 1:i + 1 + nvals]
        for k, tok in enumerate(vals):
            if tok.startswith("-") and not _is_number(tok):
                vals = vals[:k]  # the next flag: too few values
                break
        if len(vals) < nvals:
            raise FlagError(f"flag {flag} expects {nvals} value{'s' if nvals > 1 else ''}, got {len(vals)}")
        handler(a, vals, flag)
        a.given.add(flag)
        i += 1 + nvals
    return a


@dataclass
class NanoBraggJob:
    """Configs plus file names for one nanoBragg-style run."""

    crystal: CrystalConfig
    detector: DetectorConfig
    beam: BeamConfig
    args: NanoBraggArgs
    hkl_source: Optional[str]      # "hkl", "dump" or None (default_F only)


def _phi_steps(a: NanoBraggArgs) -> tuple[float, float, int]:
    """nanoBragg's (osc, phistep, phisteps) auto-selection, degrees."""
    osc, step, steps = a.osc_deg, a.phistep_deg, a.phisteps
    if steps < 0:
        if osc < 0.0:
            if step <= 0.0:
                return 0.0, 0.0, 1
            return step, step, 2
        if step <= 0.0:
            return osc, osc / 2.0, 2
        return osc, step, int(math.ceil(osc / step))
    if steps == 0:
        steps = 1
    if osc < 0.0:
        if step <= 0.0:
            return 1.0, 1.0 / steps, steps
        return step, step, 2
    if step < 0.0:
        return osc, osc / steps, steps
    return osc, step, steps


def _sane(t: tuple[float, float, int]) -> tuple[float, float, int]:
    r, s, n = t
    if r <= 0.0 or s <= 0.0 or n <= 0:
        return 0.0, 0.0, 1
    return r, s, n


def build_job(a: NanoBraggArgs, read_tables: bool = True) -> NanoBraggJob:
    """Apply nanoBragg's defaults and rules to parsed flags and build the configs."""
    if a.mat is None and a.cell is None:
        raise FlagError("no crystal: give -mat A.mat or -cell a b c alpha beta gamma")
    hkl_source = None
    if a.hkl is not None:
        hkl_source = "hkl"
    elif a.default_F == 0.0 and read_tables:
        if Path(a.dump).is_file():
            hkl_source = "dump"
        else:
            raise FlagError("no structure factors: give -hkl Fs.hkl or -default_F F (no dump file "
                            f"{a.dump} to re-read either)")

    px = a.pixel_mm
    det_f = px * a.fpixels if a.fpixels else a.detsize_f_mm
    det_s = px * a.spixels if a.spixels else a.detsize_s_mm
    fpixels = int(math.ceil(det_f / px - 0.5))
    spixels = int(math.ceil(det_s / px - 0.5))

    Fclose = (a.ORGX - 0.5) * px if a.ORGX is not None else det_f / 2.0
    Sclose = (a.ORGY - 0.5) * px if a.ORGY is not None else det_s / 2.0
    Xclose = a.Xclose if a.Xclose is not None else Fclose
    Yclose = a.Yclose if a.Yclose is not None else Sclose
    conv = a.convention
    if conv in (DetectorConvention.MOSFLM, DetectorConvention.DENZO):
        Xbeam = a.Xbeam if a.Xbeam is not None else (det_s + px) / 2.0
        Ybeam = a.Ybeam if a.Ybeam is not None else (det_f + px) / 2.0
        bc_f, bc_s, pivot = Ybeam, Xbeam, DetectorPivot.BEAM
    elif conv == DetectorConvention.ADXV:
        Xbeam = a.Xbeam if a.Xbeam is not None else (det_f + px) / 2.0
        Ybeam = a.Ybeam if a.Ybeam is not None else (det_s - px) / 2.0
        bc_f, bc_s, pivot = Xbeam, Ybeam, DetectorPivot.BEAM
    elif conv in (DetectorConvention.XDS, DetectorConvention.DIALS):
        bc_f, bc_s, pivot = Fclose, Sclose, DetectorPivot.SAMPLE
    else:  # CUSTOM
        Xbeam = a.Xbeam if a.Xbeam is not None else Xclose
        Ybeam = a.Ybeam if a.Ybeam is not None else Yclose
        bc_f, bc_s, pivot = Xbeam, Ybeam, a.pivot

    v = a.vectors
    det_kw = dict(
        distance_mm=a.distance_mm, close_distance_mm=a.close_distance_mm, pixel_size_mm=px,
        fpixels=fpixels, spixels=spixels, beam_center_f=bc_f, beam_center_s=bc_s, detector_convention=conv,
        detector_pivot=pivot, detector_rotx_deg=a.rotx, detector_roty_deg=a.roty, detector_rotz_deg=a.rotz,
        detector_twotheta_deg=a.twotheta, oversample=a.oversample if a.oversample > 0 else None,
        oversample_omega=a.oversample_omega, oversample_polar=a.oversample_polar, point_pixel=a.point_pixel,
        curved_detector=a.curved, roi=_roi_c(a.roi, fpixels, spixels),
    )
    if conv == DetectorConvention.CUSTOM:
        det_kw.update(custom_fdet_vector=v.get("fdet"), custom_sdet_vector=v.get("sdet"),
                      custom_odet_vector=v.get("odet"), custom_beam_vector=v.get("beam"),
                      custom_polar_vector=v.get("polar"), custom_spindle_vector=v.get("spindle"),
                      twotheta_axis=v.get("twotheta_axis"), pix0_override_m=_pix0(a))
    detector = _config(DetectorConfig, det_kw)

    osc, phistep, phisteps = _phi_steps(a)
    hr, hs, hn = _sane(resolve_steps(a.hdivrange, a.hdivstep, a.hdivsteps))
    vr, vs, vn = _sane(resolve_steps(a.vdivrange, a.vdivstep, a.vdivsteps))
    dr, ds, dn = _sane(resolve_steps(a.dispersion_pct, a.dispstep_pct, a.dispsteps))
    beam = _config(BeamConfig, dict(
        wavelength_A=a.lambda_A, fluence=a.fluence, flux=a.flux, exposure=a.exposure, beamsize_mm=a.beamsize_mm,
        polarization_factor=a.polar, nopolar=a.nopolar,
        hdiv_range_mrad=hr, hdiv_step_mrad=hs if hn > 1 else None, hdiv_steps=hn,
        vdiv_range_mrad=vr, vdiv_step_mrad=vs if vn > 1 else None, vdiv_steps=vn,
        dispersion_pct=dr, dispersion_step_pct=ds if dn > 1 else None, dispersion_steps=dn,
        round_div=a.round_div, dmin_A=a.dmin_A,
    ))

    if a.mosaic_domains <= 0:
        domains = 1 if a.mosaic_deg <= 0.0 else 10
    else:
        domains = a.mosaic_domains if a.mosaic_deg > 0.0 else 1
    cryst_kw = dict(
        N_cells=(a.Na, a.Nb, a.Nc), phi_start_deg=a.phi_deg, osc_range_deg=osc, phi_steps=phisteps,
        phi_step_deg=phistep, mosaic_spread_deg=max(a.mosaic_deg, 0.0), mosaic_domains=domains,
        mosaic_seed=a.mosaic_seed, shape=a.shape, fudge=a.fudge, default_F=a.default_F, interpolate=a.interpolate,
        spindle_axis=v.get("spindle") if conv == DetectorConvention.CUSTOM else None,
        nanobragg_phi_quirk=True,
    )
    if a.cell is not None:
        c = list(a.cell)
        b_ = c[1] if len(c) > 1 and c[1] > 0 else c[0]
        c_ = c[2] if len(c) > 2 and c[2] > 0 else c[0]
        ang = [(c[i] if len(c) > i and c[i] > 0 else 90.0) for i in (3, 4, 5)]
        cryst_kw.update(cell_a=c[0], cell_b=b_, cell_c=c_, cell_alpha=ang[0], cell_beta=ang[1], cell_gamma=ang[2])
    if a.mat is not None:
        cryst_kw["mosflm_matrix"] = nbio.read_mosflm_raw(a.mat)
        cryst_kw["rescale_to_cell"] = a.cell is not None
    if a.misset == "random":
        cryst_kw.update(misset_random=True, misset_seed=a.misset_seed if a.misset_seed is not None
                        else (a.seed if a.seed is not None else int(time.time())))
    elif a.misset is not None:
        cryst_kw["misset_deg"] = a.misset
    crystal = _config(CrystalConfig, cryst_kw)
    if a.xtalsize_mm is not None:
        lens = _cell_lengths(crystal, a.lambda_A)
        N = [a.Na, a.Nb, a.Nc]
        for i in range(3):
            if a.xtalsize_mm[i] is not None and a.xtalsize_mm[i] > 0:
                N[i] = math.ceil(a.xtalsize_mm[i] * 1e7 / lens[i])
        crystal = crystal.replace(N_cells=tuple(float(max(n, 1)) for n in N))
    return NanoBraggJob(crystal=crystal, detector=detector, beam=beam, args=a, hkl_source=hkl_source)


def _pix0(a: NanoBraggArgs):
    """The -pix0_vector to honour: nanoBragg recomputes pix0 from the pivot (its flag has no effect); here
    it is used when no beam centre (-Xbeam/-Ybeam/-ORGX/-ORGY/-Xclose/-Yclose) pins the detector instead."""
    pix0 = a.vectors.get("pix0")
    if pix0 is None:
        return None
    if {"-Xbeam", "-Ybeam", "-ORGX", "-ORGY", "-Xclose", "-Yclose"} & a.given:
        return None
    return pix0


def _cell_lengths(crystal: CrystalConfig, lam: float) -> list[float]:
    if crystal.mosflm_matrix is not None:
        recip = np.asarray(crystal.mosflm_matrix, float).T / lam
        real = np.linalg.inv(recip).T
        return [float(np.linalg.norm(r)) for r in real]
    return [float(crystal.cell_a), float(crystal.cell_b), float(crystal.cell_c)]


def _roi_c(roi, fpixels: int, spixels: int):
    """nanoBragg keeps pixels with xmin <= f <= xmax and ymin <= s <= ymax."""
    if roi is None:
        return None
    return tuple(roi)


__all__ = ["FlagError", "NanoBraggArgs", "NanoBraggJob", "parse_args", "build_job", "FLAGS"]
