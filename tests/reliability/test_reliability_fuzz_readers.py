"""Fuzzing (hypothesis) of every service's artifact readers: valid files mutated at the byte level (truncated,
bytes flipped, junk inserted, replaced outright) and HDF5 files of arbitrary structure. A reader either returns
or raises its service's documented input error naming the file; never any other exception."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), min_size=1,
                                        max_size=12)),
    st.tuples(st.just("insert"), st.floats(0.0, 1.0), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("replace"), st.binary(max_size=4096)),
)


def mutate(raw: bytes, m) -> bytes:
    kind = m[0]
    if kind == "truncate":
        return raw[: int(len(raw) * m[1])]
    if kind == "flip":
        b = bytearray(raw)
        for pos, val in m[1]:
            if b:
                b[min(int(pos * len(b)), len(b) - 1)] = val
        return bytes(b)
    if kind == "insert":
        i = int(m[1] * len(raw))
        return raw[:i] + m[2] + raw[i:]
    return m[1]


def reads_or_refuses(read, path: Path, errors):
    """Call ``read(path)``: fine if it returns; if it raises, only ``errors``, naming the file."""
    try:
        return read(path)
    except errors as exc:
        assert path.name in str(exc), f"error does not name the file: {exc!r}"
        return None


def _fuzz_bytes(make_valid, read, errors, suffix: str):
    """Mutations of the valid file ``make_valid(path)`` through ``read``."""
    with tempfile.TemporaryDirectory() as d:
        good = Path(d) / f"good{suffix}"
        make_valid(good)
        assert read(good) is not None  # the unmutated file reads
        raw = good.read_bytes()

    @FUZZ
    @given(m=mutations)
    def check(m):
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / f"fuzzed{suffix}"
            p.write_bytes(mutate(raw, m))
            reads_or_refuses(read, p, errors)

    check()


# ------------------------------------------------------------------------------------------- text / binary
def test_fuzz_diff_sim_refiner_hkl_and_matrix_and_smv():
    from diff_sim_refiner.core.io import FormatError, read_hkl, read_mosflm_matrix, read_smv, write_smv

    def hkl(p):
        p.write_text("".join(f"{h} {k} {l} {100 + h * 3 + k:.2f}\n" for h in range(-2, 3) for k in range(-2, 3)
                             for l in range(0, 3)))

    _fuzz_bytes(hkl, lambda p: read_hkl(p, cache=False), FormatError, ".hkl")

    def amat(p):
        p.write_text(" -0.0123  0.0045  0.0101\n  0.0067 -0.0111  0.0034\n  0.0021  0.0032 -0.0140\n"
                     " 0.0 0.0 0.0\n 1.0 0.0 0.0\n 0.0 1.0 0.0\n 0.0 0.0 1.0\n 57.8 57.8 150.3 90 90 90\n"
                     " 0.0 0.0 0.0\n")

    _fuzz_bytes(amat, lambda p: read_mosflm_matrix(p, 0.9768), FormatError, ".mat")

    def smv(p):
        write_smv(p, np.arange(48 * 40, dtype=np.float32).reshape(40, 48), {"PIXEL_SIZE": "0.1"})

    _fuzz_bytes(smv, read_smv, FormatError, ".img")


def test_fuzz_stem_polar_labels():
    from stem_polar.artifacts import DataError, load_labels

    _fuzz_bytes(lambda p: np.save(p, np.arange(64) % 3), load_labels, DataError, ".npy")
    _fuzz_bytes(lambda p: np.savez(p, labels=np.arange(64) % 3, n_clusters=3), load_labels, DataError, ".npz")


def test_fuzz_voxel_merger_grid_and_scales():
    from voxel_merger.artifacts import InputError, read_grid, read_scales

    def grid(p):
        p.write_text(json.dumps({"ndiv": 3, "lo": [-9, -9, -9], "shape": [19, 19, 19],
                                 "unit_cell": [50, 60, 70, 90, 90, 90], "space_group": "P 21 21 21"}))

    _fuzz_bytes(grid, read_grid, InputError, ".json")
    _fuzz_bytes(lambda p: p.write_text(json.dumps({"still_a": 1.1, "still_b": 0.9})), read_scales, InputError,
                ".json")


def test_fuzz_diffuse_extractor_experiment_list():
    from diffuse_extractor.artifacts import InputError, load_experiments
    from diffuse_extractor.synthetic import make_experiment
    from dxtbx.model.experiment_list import ExperimentList

    def expt(p):
        ExperimentList([make_experiment(n=32)]).as_file(str(p))

    _fuzz_bytes(expt, load_experiments, InputError, ".expt")


def test_fuzz_platform_manifest(tmp_path):
    """A corrupted manifest never counts as complete work (it is recomputed) and never raises."""
    from diffractflow.artifacts import Volume, load_valid_manifest, write_manifest

    vol = Volume(tmp_path)
    job = vol.job_dir("echo", "j1")
    (job / "out.txt").write_text("result")
    write_manifest(job, {"out": vol.ref(job / "out.txt")}, {"n": 1})
    assert load_valid_manifest(vol, job) is not None
    raw = (job / "manifest.json").read_bytes()

    @FUZZ
    @given(m=mutations)
    def check(m):
        data = mutate(raw, m)
        (job / "manifest.json").write_bytes(data)
        got = load_valid_manifest(vol, job)
        if got is not None:  # only an intact manifest (same outputs, same hashes) may be accepted
            assert got["outputs"]["out"].sha256 == vol.ref(job / "out.txt").sha256

    check()


# ----------------------------------------------------------------------------------- HDF5 of any structure
def _dataset_strategy(names):
    shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
    dtypes = st.sampled_from(["i1", "u2", "i4", "i8", "f4", "f8", "c8", "S3", "bool"])
    values = st.sampled_from([0.0, 1.0, -1.0, np.nan, np.inf, 1e30])
    spec = st.tuples(shapes, dtypes, values)
    return st.dictionaries(st.sampled_from(names), spec, max_size=len(names))


def _write_h5(path: Path, datasets: dict, attrs: dict | None = None):
    with h5py.File(path, "w") as f:
        for name, (shape, dtype, value) in datasets.items():
            arr = np.full(shape, value).astype(dtype) if dtype not in ("S3",) else np.full(shape, b"abc", dtype="S3")
            f.create_dataset(name, data=arr)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


def _fuzz_h5(read, errors, names, attrs=None):
    @FUZZ
    @given(ds=_dataset_strategy(names))
    def check(ds):
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "fuzzed.h5"
            _write_h5(p, ds, attrs)
            reads_or_refuses(read, p, errors)

    check()


def test_fuzz_scaler_observation_table():
    from scaler.artifacts import InputError, read_observations, stream_observations

    _fuzz_h5(read_observations, InputError, ["still_id", "voxel_id", "q_magnitude", "intensity", "sigma",
                                            "still_names"])

    def valid(p):
        from scaler.artifacts import write_observations

        n = 50
        write_observations(p, np.arange(n) % 5, np.arange(n) % 7, np.linspace(0.1, 0.5, n), np.ones(n), np.ones(n))

    _fuzz_bytes(valid, read_observations, InputError, ".h5")
    _fuzz_h5(lambda p: stream_observations(p, chunk=7), InputError, ["still_id", "voxel_id", "q_magnitude",
                                                                      "intensity", "sigma"])
    _fuzz_bytes(valid, lambda p: stream_observations(p, chunk=7), InputError, ".h5")


def test_fuzz_stem_polar_patterns():
    from stem_polar.artifacts import DataError, open_source

    def read(p):
        src = open_source(p, "patterns", None)
        try:
            return src.read(0, min(src.n_frames, 4)) if src.n_frames else src
        finally:
            getattr(src, "close", lambda: None)()

    _fuzz_h5(read, DataError, ["patterns"])


def test_fuzz_voxel_merger_still_artifact():
    from voxel_merger.artifacts import InputError, open_still, write_still

    def read(p):
        with open_still(p) as s:
            return [len(c.h) for c in s.iter_chunks(16)]

    def valid(p):
        n = 40
        write_still(p, "s1", np.arange(n) * 0.1, np.zeros(n), np.ones(n), np.ones(n), np.ones(n) * 0.1)

    _fuzz_bytes(valid, read, InputError, ".h5")
