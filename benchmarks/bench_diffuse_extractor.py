"""Benchmark: seconds per PILATUS 6M still on one core, and peak memory.

Uses a real thaumatin still (PILATUS3 6M, 2463 x 2527) from ../shared/data with its own
detector and beam models; the crystal is either from ``--expt`` (an indexed still) or a
thaumatin-like P41212 cell in a fixed orientation (skips 30 s of indexing). Reports:
- cold: first still (pixel geometry and static corrections computed),
- warm: later stills of the same run (geometry cached; masks, Bragg prediction, hkl per still),
- write: the compressed HDF5 artifact,
- peak RSS of the process (ru_maxrss) and its growth during extraction.

    .venv/bin/python benchmarks/bench_diffuse_extractor.py [--repeats 3] [--expt X.expt --refl X.refl]
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"  # one core

import argparse  # noqa: E402
import bz2  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "thaumatin_grid"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_still(expt_path: str | None, tmp: Path):
    from dxtbx.model import Crystal, Experiment
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory
    from scitbx import matrix

    if expt_path:
        el = ExperimentList.from_file(expt_path)
        return el[0]
    cbf = tmp / "thau_0001.cbf"
    cbf.write_bytes(bz2.decompress((DATA / "thau_3_2_0001.cbf.bz2").read_bytes()))
    e = ExperimentListFactory.from_filenames([str(cbf)])[0]
    R = matrix.col((1, 0, 0)).axis_and_angle_as_r3_rotation_matrix(30, deg=True) * \
        matrix.col((0, 1, 0)).axis_and_angle_as_r3_rotation_matrix(20, deg=True)
    cr = Crystal(R * matrix.col((57.8, 0, 0)), R * matrix.col((0, 57.8, 0)), R * matrix.col((0, 0, 150.3)),
                 space_group_symbol="P 41 21 2")
    return Experiment(imageset=e.imageset, beam=e.beam, detector=e.detector, crystal=cr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="warm stills to time")
    ap.add_argument("--expt", default=None)
    ap.add_argument("--refl", default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "diffuse_extractor.json"))
    args = ap.parse_args()

    from diffuse_extractor import __version__
    from diffuse_extractor import artifacts as art
    from diffuse_extractor.core.extract import ExtractionParams, GeometryCache, extract_still

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        expt = load_still(args.expt, tmp)
        data, fmask = art.read_image(expt, 0)
        refl = art.load_reflections(args.refl, 0) if args.refl else None
        params = ExtractionParams()
        rss0 = rss_mb()
        cache = GeometryCache()
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        res = extract_still(expt, data, refl, params=params, format_mask=fmask, geometry_cache=cache)
        cold = time.perf_counter() - t0
        cold_cpu = time.process_time() - cpu0
        warm, warm_cpu = [], []
        for _ in range(args.repeats):
            del res
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            res = extract_still(expt, data, refl, params=params, format_mask=fmask, geometry_cache=cache)
            warm.append(time.perf_counter() - t0)
            warm_cpu.append(time.process_time() - cpu0)
        rss_extract = rss_mb()
        t0 = time.perf_counter()
        h5 = tmp / "still.h5"
        art.write_still(h5, res, expt, parameters=params.as_dict(), inputs={})
        write = time.perf_counter() - t0
        size_mb = h5.stat().st_size / 1e6
        n_used = len(res)
    n_pix = sum(d.size for d in data)
    out = {
        "service": "diffuse-extractor",
        "version": __version__,
        "detector": "PILATUS3 6M (thaumatin_grid image 1)",
        "pixels": int(n_pix),
        "pixels_used": int(n_used),
        "threads": 1,
        "cold_s": round(cold, 3),
        "cold_cpu_s": round(cold_cpu, 3),
        "warm_s_median": round(float(np.median(warm)), 3),
        "warm_cpu_s_median": round(float(np.median(warm_cpu)), 3),
        "warm_s_all": [round(w, 3) for w in warm],
        "write_hdf5_s": round(write, 3),
        "artifact_mb": round(size_mb, 1),
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_before_extraction_mb": round(rss0, 1),
        "rss_growth_extraction_mb": round(rss_extract - rss0, 1),
        "target_s_per_still": 1.0,
        "load_average_1min": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "note": "wall and CPU seconds on a shared 2-core machine; CPU seconds are the fairer figure under load",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
