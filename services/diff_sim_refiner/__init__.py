"""diff-sim-refiner: a differentiable simulator with nanoBragg's physics, in PyTorch.

The public API (``simulate``, ``Simulator``, ``CrystalConfig``, ``DetectorConfig``, ``BeamConfig`` ...)
is re-exported lazily so that importing the package (e.g. for the CLI's start-up) does not import torch.
"""
from . import core  # light: core resolves its names lazily, torch loads only with the simulator

__version__ = "0.1.0"

_LAZY = {
    "simulate", "Simulator", "Crystal", "Detector", "prepare", "render", "CrystalConfig", "DetectorConfig",
    "BeamConfig", "DetectorConvention", "DetectorPivot", "CrystalShape", "HKLTable", "read_hkl", "read_hkl_file",
    "read_mosflm_matrix", "reciprocal_to_real_cell", "detector_geometry", "lattice_vectors",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(core, name)
    raise AttributeError(f"module 'diff_sim_refiner' has no attribute {name!r}")


__all__ = ["__version__", *sorted(_LAZY)]
