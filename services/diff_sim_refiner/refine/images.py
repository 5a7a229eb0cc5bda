"""Reading target images and masks for refinement (numpy only; formats chosen by suffix)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..core.io import FormatError, read_floatfile, read_smv


def read_image(path, shape: Optional[tuple[int, int]] = None, dataset: Optional[str] = None) -> np.ndarray:
    """2-D image (slow, fast) from .npy, .h5/.hdf5/.nxs (``dataset`` or /entry/data/image or the first 2-D
    dataset), .tif/.tiff, .img/.smv (SMV) or raw float32 .bin/.raw/.float (needs ``shape``)."""
    p = Path(path)
    if not p.is_file():
        raise FormatError(f"image file {p} does not exist")
    suf = p.suffix.lower()
    if suf == ".npy":
        arr = np.load(p, allow_pickle=False)
    elif suf in (".h5", ".hdf5", ".nxs"):
        import h5py  # format readers only for the format given (h5py, tifffile: 0.1-0.2 s each)

        with h5py.File(p, "r") as fh:
            name = dataset
            if name is None:
                for cand in ("entry/data/image", "entry/data/data", "entry/data/model", "image", "data", "mask"):
                    if cand in fh and getattr(fh[cand], "ndim", 0) == 2:
                        name = cand
                        break
            if name is None:
                found = []
                fh.visititems(lambda n, o: found.append(n) if hasattr(o, "ndim") and o.ndim == 2 else None)
                if not found:
                    raise FormatError(f"{p}: no 2-D dataset found")
                name = found[0]
            if name not in fh:
                raise FormatError(f"{p}: no dataset {name!r}")
            arr = fh[name][()]
    elif suf in (".tif", ".tiff"):
        import tifffile  # see h5py above

        arr = tifffile.imread(p)
    elif suf in (".img", ".smv"):
        _, arr = read_smv(p)
    elif suf in (".bin", ".raw", ".float"):
        if shape is None:
            raise FormatError(f"{p}: a raw float image needs the detector size")

        arr = read_floatfile(p, shape[1], shape[0])
    else:
        raise FormatError(f"{p}: unknown image format {suf!r} (use .npy, .h5, .tif, .img/.smv or raw .bin)")
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise FormatError(f"{p}: expected a 2-D image, got shape {arr.shape}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise FormatError(f"{p}: image is {arr.shape[0]}x{arr.shape[1]} (slow x fast) but the detector is "
                          f"{shape[0]}x{shape[1]}")
    return arr


def read_mask(path, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask (True = use the pixel) from any format :func:`read_image` reads (non-zero = True)."""
    return read_image(path, shape, dataset=None) != 0


__all__ = ["read_image", "read_mask"]
