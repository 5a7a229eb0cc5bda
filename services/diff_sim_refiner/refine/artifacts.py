"""Refinement outputs: the refined model as an HDF5 artifact, history JSON and convergence plots.

HDF5 schema ``diffractflow.diff_sim_refiner.refinement`` v1 (NeXus-style)::

    /entry (NXentry, default=data)
      /data (NXdata, signal=model): model (float32 photons, slow x fast, mask bounding box; zeros elsewhere),
                                    target (float32), mask (uint8)
      /model (NXcollection): attrs crystal/detector/beam (JSON of the refined configs), scale;
             datasets <label> (refined value, attr units, initial)
      /history (NXcollection): iteration, loss, <label> (one entry per optimiser step + final state)
      /refinement (NXcollection): attrs params, optimizer, loss_initial, loss_final, iterations, evaluations,
                                  wall_seconds, settings (JSON)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from diffractflow.artifacts import atomic_write_path, write_provenance

from .. import __version__
from ..artifacts import _jsonable
from ..core.io import FormatError

SCHEMA = "diffractflow.diff_sim_refiner.refinement"
SCHEMA_VERSION = 1


def write_refinement(path, result, model: np.ndarray, target: np.ndarray, mask: np.ndarray, *,
                     job_id: Optional[str] = None, inputs: Optional[dict] = None,
                     extra: Optional[dict] = None) -> Path:
    """Write the refined model, its image, the target, the mask and the history, atomically."""
    path = Path(path)
    cfgs = {name: json.dumps(_jsonable(getattr(result, name))) for name in ("crystal", "detector", "beam")}
    settings = dataclasses.asdict(result.settings)
    with atomic_write_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            write_provenance(fh, schema=SCHEMA, schema_version=SCHEMA_VERSION, producer="diff-sim-refiner",
                             producer_version=__version__, job_id=job_id,
                             parameters={"params": result.params, "settings": settings,
                                         "initial": result.initial},
                             inputs=dict(inputs or {}))
            entry = fh.create_group("entry")
            entry.attrs["NX_class"] = "NXentry"
            entry.attrs["default"] = "data"
            data = entry.create_group("data")
            data.attrs["NX_class"] = "NXdata"
            data.attrs["signal"] = "model"
            for name, arr, dt in (("model", model, np.float32), ("target", target, np.float32),
                                  ("mask", mask, np.uint8)):
                ds = data.create_dataset(name, data=np.asarray(arr, dtype=dt), compression="gzip",
                                         compression_opts=4, chunks=True)
                if name != "mask":
                    ds.attrs["units"] = "photons"
            data["model"].attrs["long_name"] = "refined model photons per pixel (slow, fast)"
            mod = entry.create_group("model")
            mod.attrs["NX_class"] = "NXcollection"
            for k, v in cfgs.items():
                mod.attrs[k] = v
            mod.attrs["scale"] = float(result.scale)
            for lab in result.labels:
                ds = mod.create_dataset(lab, data=float(result.final[lab]))
                ds.attrs["units"] = result.units[lab]
                ds.attrs["initial"] = float(result.initial[lab])
            hist = entry.create_group("history")
            hist.attrs["NX_class"] = "NXcollection"
            for k, v in result.history.items():
                hist.create_dataset(k, data=np.asarray(v))
            ref = entry.create_group("refinement")
            ref.attrs["NX_class"] = "NXcollection"
            ref.attrs["params"] = json.dumps(result.params)
            ref.attrs["optimizer"] = result.settings.optimizer
            ref.attrs["settings"] = json.dumps(settings)
            for k in ("loss_initial", "loss_final", "wall_seconds"):
                ref.attrs[k] = float(getattr(result, k))
            ref.attrs["iterations"] = int(result.iterations)
            ref.attrs["evaluations"] = int(result.evaluations)
            for k, v in (extra or {}).items():
                ref.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
    return path


def read_refinement(path) -> dict:
    """{'final': {label: value}, 'history': {...}, 'crystal'/'detector'/'beam': dicts, 'model': image, ...}."""
    with h5py.File(path, "r") as fh:
        schema = fh.attrs.get("schema")
        if isinstance(schema, bytes):
            schema = schema.decode()
        if schema != SCHEMA:
            raise FormatError(f"{path} is not a {SCHEMA} artifact (schema={schema!r})")
        mod = fh["entry/model"]
        out = {
            "final": {k: float(mod[k][()]) for k in mod.keys()},
            "initial": {k: float(mod[k].attrs["initial"]) for k in mod.keys()},
            "scale": float(mod.attrs["scale"]),
            "history": {k: fh["entry/history"][k][()].tolist() for k in fh["entry/history"].keys()},
            "model": fh["entry/data/model"][()],
            "target": fh["entry/data/target"][()],
            "mask": fh["entry/data/mask"][()].astype(bool),
            "loss_initial": float(fh["entry/refinement"].attrs["loss_initial"]),
            "loss_final": float(fh["entry/refinement"].attrs["loss_final"]),
            "iterations": int(fh["entry/refinement"].attrs["iterations"]),
        }
        for k in ("crystal", "detector", "beam"):
            out[k] = json.loads(mod.attrs[k])
    return out


def write_history(path, history: dict) -> Path:
    path = Path(path)
    with atomic_write_path(path) as tmp:
        Path(tmp).write_text(json.dumps(history, indent=2))
    return path


def plot_convergence(result, path, truth: Optional[dict] = None) -> Path:
    """Loss (log) and every refined component against the iteration, one panel each, as PNG."""
    # matplotlib (about 2 s to import) only for the figure; a headless backend before pyplot loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    h = result.history
    n = 1 + len(result.labels)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    ax = axes.flat[0]
    ax.semilogy(h["iteration"], np.maximum(np.asarray(h["loss"], float), 1e-300))
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    for ax, lab in zip(list(axes.flat)[1:], result.labels):
        ax.plot(h["iteration"], h[lab])
        if truth and lab in truth:
            ax.axhline(truth[lab], color="r", linestyle="--", label="truth")
            ax.legend()
        ax.set_xlabel("iteration")
        ax.set_title(f"{lab} ({result.units[lab]})", fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


__all__ = ["write_refinement", "read_refinement", "write_history", "plot_convergence", "SCHEMA", "SCHEMA_VERSION"]
