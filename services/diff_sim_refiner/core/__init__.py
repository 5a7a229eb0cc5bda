"""Science core of diff-sim-refiner: a differentiable simulator with nanoBragg's physics (PyTorch).

Names are imported lazily (PEP 562) so that torch-free parts (config, io, rng) load without torch.
"""
import importlib

_WHERE = {
    "config": ["BeamConfig", "CrystalConfig", "CrystalShape", "DetectorConfig", "DetectorConvention",
               "DetectorPivot", "DEFAULT_FLUENCE", "R_E_SQR"],
    "geometry": ["DetectorGeometry", "LatticeVectors", "detector_geometry", "lattice_vectors"],
    "io": ["FormatError", "HKLTable", "read_fdump", "read_floatfile", "read_hkl", "read_hkl_file",
           "read_mosflm_matrix", "read_smv", "reciprocal_to_real_cell", "write_fdump", "write_floatfile",
           "write_smv"],
    "rng": ["Ran1", "mosaic_domain_axes"],
    "simulator": ["Crystal", "Detector", "Prepared", "Simulator", "prepare", "render", "render_loss", "simulate",
                  "spot_local_mask", "spot_local_bound"],
}
_INDEX = {name: mod for mod, names in _WHERE.items() for name in names}


def __getattr__(name):
    mod = _INDEX.get(name)
    if mod is None:
        raise AttributeError(f"module 'diff_sim_refiner.core' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


__all__ = sorted(_INDEX)
