"""nanoBragg file formats: MOSFLM ``A.mat``, ``h k l F`` text (with a binary cache), nanoBragg's
``Fdump.bin``, raw float images and SMV (ADSC) images.  numpy only (no torch import)."""
from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from diffractflow.errors import InputError
from diffractflow.reading import reader


class FormatError(InputError):
    """A file does not hold what its format promises (message names the file)."""


# --------------------------------------------------------------------------- MOSFLM matrix
@reader("MOSFLM orientation matrix (A.mat)", FormatError)
def read_mosflm_raw(path: str | os.PathLike) -> np.ndarray:
    """First nine numbers of a MOSFLM matrix file as a 3x3 array (rows x, y, z; columns a*, b*, c* times lambda)."""
    p = Path(path)
    try:
        tokens = p.read_text().split()
    except OSError as exc:
        raise FormatError(f"cannot read MOSFLM matrix {p}: {exc.strerror}") from exc
    vals = []
    for t in tokens:
        try:
            vals.append(float(t))
        except ValueError:
            break
        if len(vals) == 9:
            break
    if len(vals) < 9:
        raise FormatError(f"{p}: a MOSFLM matrix needs 9 numbers at the start, found {len(vals)}")
    return np.array(vals, dtype=np.float64).reshape(3, 3)


def read_mosflm_matrix(path: str | os.PathLike, wavelength_A: float):
    """(a*, b*, c*) reciprocal vectors in 1/Angstrom from ``A.mat``, divided by the wavelength as nanoBragg does."""
    m = read_mosflm_raw(path) / float(wavelength_A)
    return m[:, 0].copy(), m[:, 1].copy(), m[:, 2].copy()


def reciprocal_to_real_cell(a_star, b_star, c_star) -> tuple[float, float, float, float, float, float]:
    """Cell (a, b, c in Angstrom; alpha, beta, gamma in degrees) from reciprocal vectors in 1/Angstrom."""
    A = np.array([np.asarray(a_star, float), np.asarray(b_star, float), np.asarray(c_star, float)])
    real = np.linalg.inv(A).T  # rows a, b, c
    a, b, c = (np.linalg.norm(v) for v in real)
    al = math.degrees(math.acos(np.dot(real[1], real[2]) / (b * c)))
    be = math.degrees(math.acos(np.dot(real[0], real[2]) / (a * c)))
    ga = math.degrees(math.acos(np.dot(real[0], real[1]) / (a * b)))
    return float(a), float(b), float(c), al, be, ga


# --------------------------------------------------------------------------- structure factors
@dataclass
class HKLTable:
    """Dense structure-factor grid F[h - h_min, k - k_min, l - l_min] with nanoBragg's semantics.

    Entries absent from the file hold ``default_F`` (nanoBragg initialises the grid to it);
    indices outside the grid also give ``default_F``.
    """

    F: np.ndarray
    h_min: int
    k_min: int
    l_min: int
    default_F: float = 0.0
    n_reflections: int = 0

    @property
    def h_max(self) -> int:
        return self.h_min + self.F.shape[0] - 1

    @property
    def k_max(self) -> int:
        return self.k_min + self.F.shape[1] - 1

    @property
    def l_max(self) -> int:
        return self.l_min + self.F.shape[2] - 1

    def metadata(self) -> dict:
        return dict(h_min=self.h_min, h_max=self.h_max, k_min=self.k_min, k_max=self.k_max,
                    l_min=self.l_min, l_max=self.l_max, h_range=self.F.shape[0], k_range=self.F.shape[1],
                    l_range=self.F.shape[2], default_F=self.default_F, n_reflections=self.n_reflections)

    @classmethod
    def from_grid(cls, grid, meta: dict, default_F: Optional[float] = None) -> "HKLTable":
        arr = grid.detach().cpu().numpy() if hasattr(grid, "detach") else np.asarray(grid)
        return cls(F=np.asarray(arr, dtype=np.float64), h_min=int(meta["h_min"]), k_min=int(meta["k_min"]),
                   l_min=int(meta["l_min"]),
                   default_F=float(meta.get("default_F", 0.0) if default_F is None else default_F),
                   n_reflections=int(meta.get("n_reflections", 0)))

    @classmethod
    def from_reflections(cls, hkl: np.ndarray, F: np.ndarray, default_F: float = 0.0) -> "HKLTable":
        hkl = np.asarray(hkl)
        if hkl.size == 0:
            raise FormatError("no reflections")
        hi = np.ceil(hkl - 0.4).astype(np.int64)  # nanoBragg reads the indices as integers
        lo = hi.min(axis=0)
        hi_max = hi.max(axis=0)
        shape = tuple(int(x) for x in (hi_max - lo + 1))
        grid = np.full(shape, float(default_F), dtype=np.float64)
        idx = hi - lo
        grid[idx[:, 0], idx[:, 1], idx[:, 2]] = np.asarray(F, dtype=np.float64)
        return cls(F=grid, h_min=int(lo[0]), k_min=int(lo[1]), l_min=int(lo[2]), default_F=float(default_F),
                   n_reflections=int(len(hkl)))


def _parse_hkl_text(p: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        text = p.read_text()
    except OSError as exc:
        raise FormatError(f"cannot read HKL file {p}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise FormatError(f"{p} is not a text 'h k l F' file") from exc
    try:
        vals = np.array(text.split(), dtype=np.float64)
        if vals.size % 4:
            raise ValueError
        data = vals.reshape(-1, 4)
    except ValueError:
        try:
            data = np.loadtxt(p, usecols=(0, 1, 2, 3), ndmin=2, comments=("#", "!"))
        except Exception as exc:  # numpy raises ValueError / IndexError on bad rows
            raise FormatError(f"{p}: expected lines of 'h k l F' numbers ({exc})") from exc
    if data.shape[0] == 0:
        raise FormatError(f"{p}: no reflections")
    return data[:, :3], data[:, 3]


def hkl_cache_dir() -> Path:
    root = os.environ.get("DIFF_SIM_REFINER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffractflow", "diff_sim_refiner")
    return Path(root)


@reader("HKL file", FormatError)
def read_hkl(path: str | os.PathLike, default_F: float = 0.0, cache: bool = True) -> HKLTable:
    """Read an ``h k l F`` text file into an :class:`HKLTable`.

    With ``cache`` the parsed grid is kept as ``.npz`` in a cache directory keyed by the file's
    absolute path, size and modification time, so a re-read costs milliseconds.
    """
    p = Path(path)
    if not p.is_file():
        raise FormatError(f"HKL file {p} does not exist")
    key = None
    if cache:
        st = p.stat()
        key = hashlib.sha1(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{default_F!r}".encode()).hexdigest()[:20]
        cpath = hkl_cache_dir() / f"hkl-{key}.npz"
        if cpath.is_file():
            try:
                z = np.load(cpath)
                return HKLTable(F=z["F"], h_min=int(z["mins"][0]), k_min=int(z["mins"][1]), l_min=int(z["mins"][2]),
                                default_F=float(z["default_F"]), n_reflections=int(z["n"]))
            except Exception:
                pass  # corrupt cache: re-parse
    hkl, F = _parse_hkl_text(p)
    table = HKLTable.from_reflections(hkl, F, default_F)
    if cache and key is not None:
        try:
            d = hkl_cache_dir()
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".hkl-{key}.{os.getpid()}.npz"
            np.savez(tmp, F=table.F, mins=np.array([table.h_min, table.k_min, table.l_min]),
                     default_F=table.default_F, n=table.n_reflections)
            os.replace(tmp, d / f"hkl-{key}.npz")
        except OSError:
            pass
    return table


def read_hkl_file(path: str | os.PathLike, default_F: float = 0.0):
    """Seed-style helper: (grid tensor, metadata dict) for an ``h k l F`` file."""
    import torch  # io stays torch-free for the CLI and the readers; only this helper returns a tensor

    t = read_hkl(path, default_F=default_F)
    return torch.from_numpy(t.F.copy()), t.metadata()


def write_fdump(path: str | os.PathLike, table: HKLTable) -> None:
    """nanoBragg's binary ``Fdump.bin``: a text header of the index ranges, then doubles (one padding row per axis)."""
    hr, kr, lr = table.F.shape
    padded = np.zeros((hr + 1, kr + 1, lr + 1), dtype="<f8")
    padded[:hr, :kr, :lr] = table.F
    with open(path, "wb") as fh:
        fh.write(f"{table.h_min} {table.h_max} {table.k_min} {table.k_max} {table.l_min} {table.l_max}\n\f".encode())
        fh.write(padded.tobytes())


@reader("HKL binary cache (Fdump)", FormatError)
def read_fdump(path: str | os.PathLike, default_F: float = 0.0) -> HKLTable:
    """Read nanoBragg's ``Fdump.bin`` (as written by nanoBragg or :func:`write_fdump`)."""
    p = Path(path)
    raw = p.read_bytes()
    cut = raw.find(b"\f")
    if cut < 0:
        raise FormatError(f"{p} is not a nanoBragg Fdump file (no form-feed after the header)")
    try:
        h_min, h_max, k_min, k_max, l_min, l_max = (int(x) for x in raw[:cut].split())
    except ValueError as exc:
        raise FormatError(f"{p}: bad Fdump header {raw[:cut][:80]!r}") from exc
    hr, kr, lr = h_max - h_min + 1, k_max - k_min + 1, l_max - l_min + 1
    n = (hr + 1) * (kr + 1) * (lr + 1)
    body = np.frombuffer(raw[cut + 1: cut + 1 + 8 * n], dtype="<f8")
    if body.size != n:
        raise FormatError(f"{p}: Fdump holds {body.size} values, header needs {n}")
    F = body.reshape(hr + 1, kr + 1, lr + 1)[:hr, :kr, :lr].astype(np.float64)
    return HKLTable(F=F, h_min=h_min, k_min=k_min, l_min=l_min, default_F=default_F,
                    n_reflections=int(np.count_nonzero(F)))


# --------------------------------------------------------------------------- images
def write_floatfile(path: str | os.PathLike, image: np.ndarray) -> None:
    """nanoBragg's ``-floatfile``: raw native-endian float32, slow-major, full detector."""
    arr = np.ascontiguousarray(np.asarray(image, dtype=np.float32))
    with open(path, "wb") as fh:
        fh.write(memoryview(arr.reshape(-1)).cast("B"))   # no intermediate bytes copy


@reader("raw float image", FormatError)
def read_floatfile(path: str | os.PathLike, fpixels: int, spixels: int) -> np.ndarray:
    """Read a raw float32 image written by nanoBragg (shape (spixels, fpixels))."""
    p = Path(path)
    data = np.fromfile(p, dtype=np.float32)
    if data.size != fpixels * spixels:
        raise FormatError(f"{p}: {data.size} floats, expected {fpixels}x{spixels}={fpixels * spixels}")
    return data.reshape(spixels, fpixels)


def smv_header(fpixels: int, spixels: int, fields: dict) -> bytes:
    """A 512-byte SMV header as nanoBragg writes it."""
    order = "little_endian" if sys.byteorder == "little" else "big_endian"
    body = f"DIM=2;\nBYTE_ORDER={order};\nTYPE=unsigned_short;\nSIZE1={fpixels};\nSIZE2={spixels};\n"
    for k, v in fields.items():
        if isinstance(v, float):
            v = f"{v:g}"
        body += f"{k}={v};\n" if not k.startswith("DIALS_ORIGIN") else f"{k}={v}\n"
    nbytes = 512
    while True:  # nanoBragg assumes 512 bytes; grow in 512-byte blocks if the keys do not fit
        raw = f"{{\nHEADER_BYTES={nbytes:5d};\n{body}}}\f".encode()
        if len(raw) <= nbytes:
            return raw + b" " * (nbytes - len(raw))
        nbytes += 512


def write_smv(path: str | os.PathLike, image: np.ndarray, fields: dict) -> None:
    """Write an unsigned-short SMV image (slow-major) with nanoBragg's header keys."""
    img = np.asarray(image)
    spixels, fpixels = img.shape
    with open(path, "wb") as fh:
        fh.write(smv_header(fpixels, spixels, fields))
        fh.write(memoryview(np.ascontiguousarray(img, dtype=np.uint16).reshape(-1)).cast("B"))


@reader("SMV image", FormatError)
def read_smv(path: str | os.PathLike) -> tuple[dict, np.ndarray]:
    """Read an SMV image: (header dict of strings, uint16 array (SIZE2, SIZE1))."""
    p = Path(path)
    raw = p.read_bytes()
    if not raw.startswith(b"{\nHEADER_BYTES="):
        raise FormatError(f"{p} is not an SMV image (no '{{ HEADER_BYTES=' header)")
    end = raw.find(b"}")
    hdr: dict[str, str] = {}
    for line in raw[:end].decode(errors="replace").splitlines():
        if "=" in line:
            k, _, v = line.partition("=")
            hdr[k.strip()] = v.strip().rstrip(";")
    nbytes = int(hdr.get("HEADER_BYTES", "512"))
    w, h = int(hdr["SIZE1"]), int(hdr["SIZE2"])
    dtype = np.dtype("<u2" if hdr.get("BYTE_ORDER", "little_endian").startswith("little") else ">u2")
    data = np.frombuffer(raw[nbytes: nbytes + 2 * w * h], dtype=dtype)
    if data.size != w * h:
        raise FormatError(f"{p}: truncated SMV image ({data.size} of {w * h} pixels)")
    return hdr, data.reshape(h, w).astype(np.uint16)


__all__ = [
    "FormatError", "HKLTable", "read_hkl", "read_hkl_file", "read_fdump", "write_fdump", "read_mosflm_raw",
    "read_mosflm_matrix", "reciprocal_to_real_cell", "write_floatfile", "read_floatfile", "write_smv",
    "read_smv", "smv_header",
]
