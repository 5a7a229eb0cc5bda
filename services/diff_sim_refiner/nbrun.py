"""Run a nanoBragg-style job end to end: read inputs, render, write nanoBragg's output files."""
from __future__ import annotations

import ctypes
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .core import io as nbio
from .nbargs import FlagError, NanoBraggJob, build_job, parse_args


def load_structure_factors(job: NanoBraggJob, write_dump: bool = True, log: Callable[[str], None] = print):
    """The HKL table for a job (``-hkl`` file, or nanoBragg's dump file), or None for default_F only."""
    a = job.args
    if job.hkl_source == "hkl":
        table = nbio.read_hkl(a.hkl, default_F=a.default_F)
        log(f"read {table.n_reflections} reflections from {a.hkl}: h {table.h_min}..{table.h_max} "
            f"k {table.k_min}..{table.k_max} l {table.l_min}..{table.l_max}")
        if write_dump:
            try:
                nbio.write_fdump(a.dump, table)
            except OSError as exc:
                log(f"WARNING: unable to write dump file {a.dump}: {exc.strerror}")
        return table
    if job.hkl_source == "dump":
        log(f"reading Fs from {a.dump}")
        return nbio.read_fdump(a.dump, default_F=a.default_F)
    return None


def header_fields(job: NanoBraggJob, geom) -> dict:
    """SMV header keys as nanoBragg writes them."""
    a = job.args
    px = float(geom.pixel_size)
    Fbeam, Sbeam = float(geom.Fbeam), float(geom.Sbeam)
    det_s = px * job.detector.spixels
    pix0 = geom.pix0.detach().numpy()
    dials = (1000 * pix0[2], 1000 * pix0[1], -1000 * pix0[0])
    bc_s = job.detector.beam_center_s
    bc_f = job.detector.beam_center_f
    return {
        "PIXEL_SIZE": px * 1000.0, "DISTANCE": float(geom.distance) * 1000.0, "WAVELENGTH": float(a.lambda_A),
        "BEAM_CENTER_X": float(bc_s if job.detector.detector_convention.value in ("MOSFLM", "DENZO") else bc_f),
        "BEAM_CENTER_Y": float(bc_f if job.detector.detector_convention.value in ("MOSFLM", "DENZO") else bc_s),
        "ADXV_CENTER_X": Fbeam * 1000.0, "ADXV_CENTER_Y": (det_s - Sbeam) * 1000.0,
        "MOSFLM_CENTER_X": (Sbeam - 0.5 * px) * 1000.0, "MOSFLM_CENTER_Y": (Fbeam - 0.5 * px) * 1000.0,
        "DENZO_X_BEAM": Sbeam * 1000.0, "DENZO_Y_BEAM": Fbeam * 1000.0,
        "DIALS_ORIGIN": f"{dials[0]:g},{dials[1]:g},{dials[2]:g}",
        "XDS_ORGX": geom.orgx, "XDS_ORGY": geom.orgy, "CLOSE_DISTANCE": float(geom.close_distance) * 1000.0,
        "PHI": float(job.crystal.phi_start_deg), "OSC_START": float(job.crystal.phi_start_deg),
        "OSC_RANGE": float(job.crystal.osc_range_deg), "TWOTHETA": float(a.twotheta),
        "DETECTOR_SN": "000", "BEAMLINE": "fake",
    }


def roi_mask(shape, roi) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    if roi is None:
        m[:] = True
        return m
    fmin, fmax, smin, smax = roi
    m[max(smin, 0):smax + 1, max(fmin, 0):fmax + 1] = True
    return m


def roi_box(shape, roi) -> tuple[slice, slice]:
    """(slow, fast) slices of the ROI rectangle (the whole image without a ROI)."""
    if roi is None:
        return slice(0, shape[0]), slice(0, shape[1])
    fmin, fmax, smin, smax = roi
    return slice(max(smin, 0), smax + 1), slice(max(fmin, 0), fmax + 1)


def int_image(img: np.ndarray, mask: np.ndarray, scale: float, adc: float) -> np.ndarray:
    """nanoBragg's noiseless SMV pixels: floor(I * scale + adc + 0.5) clipped to 0..65535; 0 outside the ROI.

    Evaluated in place in float64 (one temporary) on the ROI's bounding box only."""
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    out = np.zeros(img.shape, dtype=np.uint16)
    if ys.size == 0:
        return out
    box = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    v = img[box].astype(np.float64)
    v *= scale
    v += adc
    np.clip(v, 0.0, 65535.0, out=v)
    v += 0.5
    np.floor(v, out=v)
    out[box] = v
    if not mask[box].all():
        out[~mask] = 0
    return out


def noise_image(img: np.ndarray, mask: np.ndarray, adc: float, seed: int) -> tuple[np.ndarray, int, float]:
    """Poisson-noise SMV pixels (numpy generator seeded by -seed, not nanoBragg's own deviates)."""
    rng = np.random.default_rng(seed)
    lam = np.clip(img.astype(np.float64), 0.0, None)
    big = lam > 1e6
    counts = np.empty_like(lam)
    counts[~big] = rng.poisson(lam[~big])
    counts[big] = np.floor(lam[big] + np.sqrt(lam[big]) * rng.standard_normal(int(big.sum())))
    counts[~mask] = 0
    total = float(counts[mask].sum())
    v = counts + adc
    overloads = int(np.count_nonzero((v > 65535.0) & mask))
    v = np.clip(v, 0, 65535.0)
    out = v.astype(np.uint16)
    out[~mask] = 0
    return out, overloads, total


def write_pgm(path: str, img: np.ndarray, mask: np.ndarray, scale: float) -> None:
    v = np.clip(img.astype(np.float64) * scale, 0, 255.0).astype(np.uint8)
    v[~mask] = 0
    spixels, fpixels = img.shape
    with open(path, "wb") as fh:
        fh.write(f"P5\n{fpixels} {spixels}\n# pixels scaled by {scale:g}\n255\n".encode())
        fh.write(v.tobytes())


def tune_malloc() -> None:
    """glibc malloc settings for chunked rendering.

    One arena: chunk buffers are re-used instead of fragmenting per-thread arenas, which otherwise lets the
    resident memory of long renders creep up with the number of chunks.  Buffers up to 32 MB come from the
    heap and up to 256 MB of freed heap is kept: each chunk's temporaries (a few MB) re-use the previous
    chunk's pages instead of being mapped, faulted in and unmapped again (that page-fault traffic cost
    about as much system time as the 1 x 1 render itself).  Peak memory is unchanged (freed memory is only
    kept for re-use, never added to the peak)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 1)            # M_ARENA_MAX
        libc.mallopt(-3, 32 << 20)     # M_MMAP_THRESHOLD (fixed: no dynamic adjustment)
        libc.mallopt(-1, 256 << 20)    # M_TRIM_THRESHOLD
        libc.mallopt(-2, 16 << 20)     # M_TOP_PAD
    except (OSError, AttributeError):
        pass


def choose_threads(requested: int) -> int:
    """-threads N, else torch's default unless the machine is already saturated (load >= CPUs): then 1,
    because OpenMP threads spinning against other processes cost more than they gain."""
    if requested > 0:
        return requested
    try:
        if os.getloadavg()[0] >= (os.cpu_count() or 1):
            return 1
    except OSError:
        pass
    return 0


def run_nanobragg(argv: list[str], out=None, progress_factory=None) -> dict:
    """Parse, render and write files; returns a small summary dict.  Raises FlagError / FormatError."""
    out = out or sys.stdout

    def log(msg: str) -> None:
        print(msg, file=out)

    a = parse_args(argv)
    job = build_job(a)
    table = load_structure_factors(job, log=log)

    tune_malloc()
    # CPU only: skip torch's scan of every installed distribution's entry points for out-of-tree device
    # backends (~60 ms of start-up with Debian's system site-packages); an explicit setting still wins
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    import torch  # here, after the setting above, and not at the top: the CLI imports this module at start-up

    nthreads = choose_threads(a.threads)
    if nthreads:
        torch.set_num_threads(nthreads)
    # the simulator imports torch: only when rendering (see above)
    from .core import native
    from .core.simulator import native_ok, prepare, render, spot_local_bound, spot_local_mask

    dtype = torch.float64 if a.float64 else torch.float32
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        p = prepare(job.crystal, job.detector, job.beam, table, dtype=dtype, spot_cutoff=a.spot_cutoff)
        geom = p.geom
        conv = job.detector.detector_convention.value.lower()
        log(f"{conv} convention selected; pivoting detector around "
            f"{'sample' if job.detector.pivot.value == 'SAMPLE' else 'direct beam spot'}")
        a_, b_, c_, al, be, ga = p.lattice.cell_parameters()
        log(f"Unit Cell: {a_:g} {b_:g} {c_:g} {al:g} {be:g} {ga:g}")
        log(f"  {job.detector.fpixels}x{job.detector.spixels} pixels, {torch.get_num_threads()} threads, "
            f"{p.oversample}x{p.oversample} oversample, "
            f"{p.n_orient // max(1, job.crystal.effective_mosaic_domains())} phi steps, "
            f"{job.crystal.effective_mosaic_domains()} mosaic domains, {int(p.src_dirs.shape[0])} sources")
        log(f"  distance={float(geom.distance):.6g} m, close_distance={float(geom.close_distance):.6g} m, "
            f"Fbeam={float(geom.Fbeam):.6g} Sbeam={float(geom.Sbeam):.6g} m, ORGX={geom.orgx:.6g} ORGY={geom.orgy:.6g}")
        mask = None
        if a.spot_local:
            mask = spot_local_mask(p, job.detector, a.spot_local)
            bound = spot_local_bound(p, a.spot_local)
            log(f"  spot-local: {float(mask.double().mean()):.4f} of the pixels (left out: each term below "
                f"{bound['per_term']:.3g} of its peak, about {bound['total']:.3g} of the photons at most)")
        log(f"  kernel: {'compiled (native.c)' if native_ok(p) else 'torch'}"
            + ("" if native_ok(p) or not p.native else f" (native {native.status()})"))
        cb = None
        bar = None
        if a.progress and progress_factory is not None:
            bar, cb = progress_factory()
        try:
            img_t = render(p, job.detector, progress=cb, pixel_mask=mask)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    img = img_t.to(torch.float32).numpy()
    mask = roi_mask(img.shape, job.detector.roi)

    nbio.write_floatfile(a.floatfile, img)
    log(f"writing {a.floatfile} as {img.size} 4-byte floats")
    vals = img[roi_box(img.shape, job.detector.roi)].reshape(-1)   # the ROI is a rectangle: no masked copy
    max_I = float(vals.max()) if vals.size else 0.0
    mean = float(vals.mean()) if vals.size else 0.0
    log(f"max_I = {max_I:g}  mean= {mean:g}  sum= {float(vals.sum(dtype=np.float64)):g}  "
        f"render {elapsed:.2f} s ({cpu:.2f} s CPU)")
    fields = header_fields(job, geom)
    scale = a.intfile_scale if a.intfile_scale > 0 else (55000.0 / max_I if max_I > 0 else 1.0)
    nbio.write_smv(a.intfile, int_image(img, mask, scale, a.adc), fields)
    log(f"writing {a.intfile} (intfile_scale = {scale:g})")
    if a.write_pgm:
        rmsd = float(np.sqrt(((vals - mean) ** 2).sum() / max(vals.size - 1, 1))) if vals.size else 0.0
        pgm_scale = a.pgm_scale if a.pgm_scale > 0 else (250.0 / (5.0 * rmsd) if rmsd > 0 else scale)
        write_pgm(a.pgmfile, img, mask, pgm_scale)
        log(f"writing {a.pgmfile}")
    summary = dict(max_I=max_I, mean=mean, seconds=elapsed, shape=list(img.shape))
    if a.write_noise:
        seed = a.seed if a.seed is not None else int(time.time())
        noisy, overloads, total = noise_image(img, mask, a.adc, seed)
        nbio.write_smv(a.noisefile, noisy, fields)
        log(f"{total:.0f} photons on noise image ({overloads} overloads); writing {a.noisefile}")
        summary["noise_photons"] = total
    return summary


__all__ = ["run_nanobragg", "load_structure_factors", "int_image", "noise_image", "FlagError"]
