"""Inputs and outputs of diff-sim-refiner jobs: simulation configs (YAML/JSON) and HDF5 image artifacts.

Config file (paths relative to the file)::

    crystal: {cell_a: 100, ..., N_cells: [5, 5, 5], misset_deg: [5, 3, -2], mosaic_spread_deg: 0.8, ...}
    detector: {distance_mm: 100, pixel_size_mm: 0.1, fpixels: 64, spixels: 64, detector_convention: MOSFLM}
    beam: {wavelength_A: 1.0, fluence: 1.0e28}
    mat: A.mat          # optional MOSFLM matrix (divided by the wavelength at render time)
    hkl: scaled.hkl     # optional h k l F file

or ``nanobragg: [-cell, 100, ...]`` with nanoBragg's flags instead of the three sections.

The HDF5 artifact (schema ``diffractflow.diff_sim_refiner.simulation`` v1) is a NeXus-style
``/entry`` (NXentry) with ``/entry/data/image`` (float32 photons/pixel, slow x fast, NXdata signal),
the configs as JSON attributes and the provenance of the run.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from diffractflow.artifacts import atomic_write_path, nexus_data_group, sha256_file, write_provenance
from diffractflow.errors import InputError

from . import __version__
from .core.config import BeamConfig, CrystalConfig, DetectorConfig
from .core.io import FormatError, HKLTable, read_hkl, read_mosflm_raw
from .core.params import check_section
from .nbargs import build_job, parse_args
from .nbrun import load_structure_factors

SCHEMA = "diffractflow.diff_sim_refiner.simulation"
SCHEMA_VERSION = 1


@dataclass
class SimJob:
    crystal: CrystalConfig
    detector: DetectorConfig
    beam: BeamConfig
    hkl: Optional[HKLTable] = None
    inputs: dict = dataclasses.field(default_factory=dict)   # name -> path


class ConfigError(InputError):
    """A simulation config (mapping or file) that cannot give a model: unknown section or key, a value the
    simulator's config refuses, or an input file (``hkl``, ``mat``) that does not hold its format (message names it).
    An input error: the worker rejects the job, the CLI exits 2."""


def _section(section: str, d: dict, cls):
    """The config dataclass ``cls`` built from the user's section ``d``."""
    try:
        check_section(section, d, cls)
        # the dataclasses validate their values in __post_init__ and raise ValueError (TypeError: a key given a value
        # of the wrong kind, e.g. a string for a number); only the construction from user data is translated here
        return cls(**d)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"'{section}': {exc}") from exc


def job_from_mapping(cfg: dict, base: Path = Path("."), inputs: Optional[dict] = None) -> SimJob:
    """Build a :class:`SimJob` from a parsed config mapping; ``inputs`` overrides file paths (worker)."""
    inputs = dict(inputs or {})
    if not isinstance(cfg, dict):
        raise ConfigError("config must be a mapping with crystal/detector/beam sections or a 'nanobragg' list")
    if "nanobragg" in cfg:
        argv = [str(x) for x in cfg["nanobragg"]]
        cwd = os.getcwd()
        try:
            os.chdir(base)
            nb = build_job(parse_args(argv))       # FlagError (an InputError) names the flag
            table = load_structure_factors(nb, write_dump=False, log=lambda m: None)
        except FormatError as exc:
            raise ConfigError(str(exc)) from exc
        finally:
            os.chdir(cwd)
        return SimJob(nb.crystal, nb.detector, nb.beam, table, inputs)
    unknown = sorted(set(cfg) - {"crystal", "detector", "beam", "mat", "hkl"})
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(unknown)} (allowed: beam, crystal, detector, hkl, mat, "
                          "nanobragg)")
    c = dict(cfg.get("crystal") or {})
    d = dict(cfg.get("detector") or {})
    b = dict(cfg.get("beam") or {})
    mat = inputs.get("mat") or (base / cfg["mat"] if cfg.get("mat") else None)
    try:
        if mat is not None:
            c["mosflm_matrix"] = read_mosflm_raw(mat)
            inputs["mat"] = Path(mat)
        crystal = _section("crystal", c, CrystalConfig)
        detector = _section("detector", d, DetectorConfig)
        beam = _section("beam", b, BeamConfig)
        hkl_path = inputs.get("hkl") or (base / cfg["hkl"] if cfg.get("hkl") else None)
        table = None
        if hkl_path is not None:
            table = read_hkl(hkl_path, default_F=float(crystal.default_F))
            inputs["hkl"] = Path(hkl_path)
    except FormatError as exc:   # the readers' error (core.io) is not an InputError subclass; the message names the file
        raise ConfigError(str(exc)) from exc
    return SimJob(crystal, detector, beam, table, inputs)


def job_from_params(params, inputs: dict, base: Path = Path(".")) -> SimJob:
    """The model of a bus job (:class:`~.core.params.SimulateParams` or :class:`~.core.params.RefineParams`): its
    sections or nanoBragg flags, whose ``-hkl``/``-mat`` name the job's ``inputs`` (name -> path); refuses a detector
    larger than ``params.max_pixels``. Raises input errors only (:class:`ConfigError`, :class:`~.nbargs.FlagError`)."""
    files = {k: v for k, v in inputs.items() if k in ("hkl", "mat")}
    if params.nanobragg is not None:
        argv = list(params.nanobragg)
        for i, tok in enumerate(argv[:-1]):
            if tok in ("-hkl", "-mat"):
                if tok[1:] not in files:
                    raise ConfigError(f"flag {tok} needs the job input {tok[1:]!r}")
                argv[i + 1] = str(files[tok[1:]])
        cfg: dict = {"nanobragg": argv}
    else:
        cfg = {"crystal": params.crystal, "detector": params.detector, "beam": params.beam}
    job = job_from_mapping(cfg, base=base, inputs=files)
    npx = job.detector.fpixels * job.detector.spixels
    if npx > params.max_pixels:
        raise ConfigError(f"detector has {npx} pixels, more than max_pixels={params.max_pixels}")
    return job


def load_job_config(path: str | os.PathLike) -> SimJob:
    """Read a YAML or JSON simulation config."""
    p = Path(path)
    if not p.is_file():
        raise FormatError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{p}: invalid JSON ({exc})") from exc
    else:
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise FormatError(f"{p}: invalid YAML ({exc})") from exc
    return job_from_mapping(cfg, base=p.parent)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "detach"):
        return _jsonable(obj.detach().cpu().numpy())
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def config_json(job: SimJob) -> dict[str, str]:
    return {name: json.dumps(_jsonable(getattr(job, name))) for name in ("crystal", "detector", "beam")}


def write_simulation(path: str | os.PathLike, image: np.ndarray, job: SimJob, job_id: Optional[str] = None,
                     extra_metrics: Optional[dict] = None) -> Path:
    """Write the rendered image (photons/pixel) and its configs as an HDF5 artifact, atomically."""
    # h5py only when writing or reading an artifact: the CLI imports this module at start-up
    import h5py

    path = Path(path)
    cfgs = config_json(job)
    inputs = {name: sha256_file(p) for name, p in job.inputs.items() if p is not None and Path(p).is_file()}
    with atomic_write_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            write_provenance(fh, schema=SCHEMA, schema_version=SCHEMA_VERSION, producer="diff-sim-refiner",
                             producer_version=__version__, job_id=job_id,
                             parameters={k: json.loads(v) for k, v in cfgs.items()}, inputs=inputs)
            data = nexus_data_group(fh, "data", signal="image")
            entry = fh["entry"]
            ds = data.create_dataset("image", data=np.asarray(image, dtype=np.float32), compression="gzip",
                                     compression_opts=4, chunks=True)
            ds.attrs["units"] = "photons"
            ds.attrs["long_name"] = "photons per pixel (slow, fast)"
            sim = entry.create_group("simulation")
            sim.attrs["NX_class"] = "NXcollection"
            for k, v in cfgs.items():
                sim.attrs[k] = v
            img = np.asarray(image, dtype=np.float64)
            sim.attrs["sum_photons"] = float(img.sum())
            sim.attrs["max_photons"] = float(img.max()) if img.size else 0.0
            for k, v in (extra_metrics or {}).items():
                sim.attrs[k] = v
    return path


def read_simulation(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """(image, {crystal, detector, beam} dicts) from an artifact written by :func:`write_simulation`."""
    import h5py  # only when reading an artifact (see write_simulation)

    with h5py.File(path, "r") as fh:
        if fh.attrs.get("schema") not in (SCHEMA, SCHEMA.encode()):
            raise FormatError(f"{path} is not a {SCHEMA} artifact (schema={fh.attrs.get('schema')!r})")
        img = fh["entry/data/image"][()]
        sim = fh["entry/simulation"].attrs
        cfg = {k: json.loads(sim[k]) for k in ("crystal", "detector", "beam")}
    return img, cfg


__all__ = ["ConfigError", "SimJob", "job_from_mapping", "job_from_params", "load_job_config", "write_simulation", "read_simulation", "SCHEMA",
           "SCHEMA_VERSION"]
