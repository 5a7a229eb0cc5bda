"""A small PILATUS-style mini-CBF writer (byte-offset compressed int32), written from the CBF specification.

Only what a beamline PILATUS writes and dxtbx's ``FormatCBFMiniPilatus`` reads: the ``PILATUS_1.2`` header
convention (``# Key value`` lines), one ``x-CBF_BYTE_OFFSET`` binary section of little-endian signed 32-bit
pixels, fast dimension first. No sensor line is written on purpose: the stills carry no sensor absorption
or parallax, so a reader must not correct for them (dxtbx then gives the panel zero thickness).
"""
from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: PILATUS's counter limit (20 bits); larger values are clipped, as the detector saturates
COUNT_CUTOFF = 1_048_500
_BINARY_START = b"\x0c\x1a\x04\xd5"
_PADDING = 4095


@dataclass(frozen=True)
class CBFHeader:
    """Header values of one frame: lengths in mm, wavelength in Angstrom, beam centre in pixels (fast, slow)
    measured from the outer corner of pixel (0, 0), exposure in seconds, angles in degrees."""

    pixel_mm: float
    distance_mm: float
    wavelength_A: float
    beam_xy_px: tuple[float, float]
    exposure_s: float = 0.1
    start_angle_deg: float = 0.0
    angle_increment_deg: float = 0.0
    transmission: float = 1.0
    polarization: float = 0.999
    detector: str = "PILATUS 1M-sim, S/N 99-0000"
    timestamp: str = "2026-01-01T00:00:00.000"


def byte_offset_encode(values: np.ndarray) -> bytes:
    """CBF byte-offset compression of integers (row-major): each difference to the previous value is one
    signed byte, or 0x80 + int16, or 0x80 + 0x8000 + int32 (little-endian); the first value's predecessor is 0."""
    v = np.ascontiguousarray(values, dtype=np.int64).ravel()
    if v.size and (v.min() < -(2 ** 31) or v.max() >= 2 ** 31):
        raise ValueError("byte_offset_encode: values outside int32")
    d = np.diff(v, prepend=np.int64(0))
    ad = np.abs(d)
    one = ad <= 127
    three = ~one & (ad <= 32767)
    seven = ~(one | three)
    length = np.where(one, 1, np.where(three, 3, 7))
    pos = np.cumsum(length) - length
    out = np.zeros(int(length.sum()), np.uint8)
    out[pos[one]] = d[one].astype(np.int8).view(np.uint8)
    p = pos[three]
    b = d[three].astype("<i2").view(np.uint8).reshape(-1, 2)
    out[p] = 0x80
    out[p + 1], out[p + 2] = b[:, 0], b[:, 1]
    p = pos[seven]
    b = d[seven].astype("<i4").view(np.uint8).reshape(-1, 4)
    out[p], out[p + 1], out[p + 2] = 0x80, 0x00, 0x80
    for i in range(4):
        out[p + 3 + i] = b[:, i]
    return out.tobytes()


def write_minicbf(path: str | Path, counts: np.ndarray, header: CBFHeader) -> Path:
    """Write ``counts`` (slow, fast) int32 as a PILATUS mini-CBF at ``path``, atomically (temporary file in the
    same directory, then renamed, so a watcher never sees half a frame). Values above the counter limit clip."""
    path = Path(path)
    data = np.asarray(counts)
    if data.ndim != 2:
        raise ValueError(f"{path}: a frame must be 2-D (slow, fast), got shape {data.shape}")
    data = np.minimum(data.astype(np.int64), COUNT_CUTOFF)
    ns, nf = data.shape
    binary = byte_offset_encode(data)
    md5 = base64.b64encode(hashlib.md5(binary).digest()).decode()
    h = header
    text = (
        "###CBF: VERSION 1.5, CBFlib v0.7.8 - PILATUS detectors\n\n"
        f"data_{path.stem}\n\n"
        '_array_data.header_convention "PILATUS_1.2"\n'
        "_array_data.header_contents\n;\n"
        f"# Detector: {h.detector}\n"
        f"# {h.timestamp}\n"
        f"# Pixel_size {h.pixel_mm * 1000:g}e-6 m x {h.pixel_mm * 1000:g}e-6 m\n"
        f"# Exposure_time {h.exposure_s:.7f} s\n"
        f"# Exposure_period {h.exposure_s:.7f} s\n"
        "# Tau = 0 s\n"
        f"# Count_cutoff {COUNT_CUTOFF} counts\n"
        f"# Threshold_setting: {12398.4 / h.wavelength_A / 2:.0f} eV\n"
        "# N_excluded_pixels = 0\n"
        f"# Wavelength {h.wavelength_A:.6f} A\n"
        f"# Detector_distance {h.distance_mm / 1000:.7f} m\n"
        f"# Beam_xy ({h.beam_xy_px[0]:.3f}, {h.beam_xy_px[1]:.3f}) pixels\n"
        "# Flux 0.000000\n"
        f"# Transmission {h.transmission:.4f}\n"
        f"# Filter_transmission {h.transmission:.4f}\n"
        f"# Start_angle {h.start_angle_deg:.4f} deg.\n"
        f"# Angle_increment {h.angle_increment_deg:.4f} deg.\n"
        f"# Polarization {h.polarization:.3f}\n"
        "# Detector_2theta 0.0000 deg.\n"
        f"# Phi {h.start_angle_deg:.4f} deg.\n"
        ";\n\n"
        "_array_data.data\n;\n"
        "--CIF-BINARY-FORMAT-SECTION--\n"
        "Content-Type: application/octet-stream;\n"
        '     conversions="x-CBF_BYTE_OFFSET"\n'
        "Content-Transfer-Encoding: BINARY\n"
        f"X-Binary-Size: {len(binary)}\n"
        "X-Binary-ID: 1\n"
        'X-Binary-Element-Type: "signed 32-bit integer"\n'
        "X-Binary-Element-Byte-Order: LITTLE_ENDIAN\n"
        f"Content-MD5: {md5}\n"
        f"X-Binary-Number-of-Elements: {ns * nf}\n"
        f"X-Binary-Size-Fastest-Dimension: {nf}\n"
        f"X-Binary-Size-Second-Dimension: {ns}\n"
        f"X-Binary-Size-Padding: {_PADDING}\n\n"
    )
    tail = b"\x00" * _PADDING + b"\n--CIF-BINARY-FORMAT-SECTION----\n;\n\n"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(text.replace("\n", "\r\n").encode("ascii"))
        fh.write(_BINARY_START)
        fh.write(binary)
        fh.write(tail)
    os.replace(tmp, path)
    return path


__all__ = ["CBFHeader", "byte_offset_encode", "write_minicbf", "COUNT_CUTOFF"]
