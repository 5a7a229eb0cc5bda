"""Array-module switch: the pipeline is written against the API numpy and CuPy share.

``get_xp("cpu")`` gives numpy, ``get_xp("cuda:N")`` gives CuPy with device N selected, or a clear error
when CuPy is not importable. Only functions present in both libraries are used in the per-chunk code.
"""

from __future__ import annotations

import numpy as np


class DeviceError(RuntimeError):
    """The requested compute device is not available."""


def parse_device(device: str) -> tuple[str, int]:
    """Split ``'cpu'`` / ``'cuda'`` / ``'cuda:1'`` into (kind, index)."""
    d = (device or "cpu").strip().lower()
    if d == "cpu":
        return "cpu", 0
    if d == "cuda" or d == "gpu":
        return "cuda", 0
    if d.startswith("cuda:"):
        try:
            return "cuda", int(d.split(":", 1)[1])
        except ValueError:
            pass
    raise DeviceError(f"unknown device {device!r}: use 'cpu' or 'cuda:N'")


def get_xp(device: str = "cpu"):
    """Return the array module (numpy or cupy) for ``device``."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return np
    try:
        import cupy  # type: ignore  # optional GPU package; its import initialises CUDA (seconds)
    except Exception as exc:  # ImportError or a broken CUDA install
        raise DeviceError(
            f"--device {device} asks for a GPU but CuPy is not importable ({exc.__class__.__name__}: {exc}); "
            "install cupy-cuda12x (or matching CUDA) or use --device cpu"
        ) from exc
    try:
        cupy.cuda.Device(index).use()
    except Exception as exc:
        raise DeviceError(f"CUDA device {index} is not usable: {exc}") from exc
    return cupy


def to_numpy(a):
    """Bring an array (numpy or cupy) back to host memory as numpy."""
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)
    if get is not None:
        return get()
    return np.asarray(a)
