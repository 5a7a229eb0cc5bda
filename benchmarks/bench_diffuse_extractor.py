"""Benchmark: seconds per PILATUS 6M still on one core, including the HDF5 artifact, and peak memory.

Uses a real thaumatin still (PILATUS3 6M, 2463 x 2527 = 6.2 Mpixel) from ../shared/data with its
own detector and beam models; the crystal is either from ``--expt`` (an indexed still) or a
thaumatin-like P41212 cell in a fixed orientation (skips 30 s of indexing). One process, one
thread (OMP/OPENBLAS/MKL/BLOSC threads = 1). Per still = ``extract_still`` + ``write_still`` (a new
file each time, durable write as in production). Reports CPU and wall seconds of:

- ``cold``: the first still of the process: static pixel geometry and corrections computed, the
  beamstop searched, all memory fresh (modules already imported: ``import_s`` is reported apart),
- ``warm``: later stills of the same geometry (static arrays from the geometry cache; masks, Bragg
  prediction, outliers, hkl and the artifact per still),
- ``new_geometry``: stills of one run whose detector differs slightly (distance +0.05 mm per still, as
  when the stills-processor refines the detector per still): a cache miss each time, so the static
  arrays are recomputed (into recycled memory); the beamstop found on the run's first still is reused,
- ``bus_job``: as on the bus (one job per still): a refined detector per still and a new
  ``GeometryCache`` per job, so the beamstop is searched for in every still too,
- ``bus_job_same_run``: ``bus_job`` for the later stills of a run on one worker (the worker keeps the beamstop
  found in the run's first still, keyed by the run id: ``pipeline.process(run_key=...)``), so no search per still,
- ``bus_job_with_read``: ``bus_job`` plus opening the still's CBF with dxtbx and reading it into arrays
  (what a worker does per job; ``read_cpu_s`` in its row),
- ``read_image``: reading the CBF into arrays (outside the per-still figure, for reference),
- ``bus_job_with_pixel_stats_uncompressed``: the same with the still table written without compression
  (``DIFFUSE_EXTRACTOR_COMPRESSION=none``; ``artifact_uncompressed_mb``),
- ``flow_job_d_min``: ``bus_job_with_pixel_stats`` with the run's ``d_min`` (``--d-min``, default 3.0 Å as the
  thaumatin run), as the diffuse flow runs it: pixels beyond the map's limit are flagged and not extracted,
- ``bus_job_with_pixel_stats``: what the diffuse flow's job does per still (``pipeline.process`` with
  ``pixel_stats`` and ``run_key``): read the CBF, add the still to the run's pixel statistics
  (``core.runstats.update_run_stats``: this worker's part file), HOT/DEAD flags from them (from the run's
  third still on; the median is over those stills), extract with the run's beamstop and a refined
  detector, write the artifact (``stats_cpu_s``, ``hot_dead_cpu_s`` in its row),

Imports (``import_s``) include the start-up warm-up a worker does (``pipeline.warm_up``: loading the
compiled kernels, ``warm_up_cpu_s``), so ``cold`` is the first job of a started worker.

plus the peak RSS of the process (ru_maxrss) and the load average.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_diffuse_extractor.py [--repeats 5] [--expt X.expt --refl X.refl]
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLOSC_NTHREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"  # one core

import argparse  # noqa: E402
import bz2  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from harness import REPO, Clock, load_average, max_rss_bytes, result_path, write_results  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "thaumatin_grid"


def rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss), MiB."""
    return max_rss_bytes() / 2**20


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


def shifted(expt, dz_mm: float):
    """The same still with its detector moved along the beam by ``dz_mm`` (a refined distance)."""
    from dxtbx.model import Experiment
    from dxtbx.model.detector import DetectorFactory

    det = DetectorFactory.from_dict(expt.detector.to_dict())
    for p in det:
        o = p.get_origin()
        p.set_frame(p.get_fast_axis(), p.get_slow_axis(), (o[0], o[1], o[2] - dz_mm))
    return Experiment(imageset=expt.imageset, beam=expt.beam, detector=det, crystal=expt.crystal)


def summary(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    return {k: round(float(np.median([r[k] for r in rows])), 3) for k in keys}


def _engine() -> str:
    """Which per-pixel engine ran: "numba" (fused kernels) or "numpy" (DIFFUSE_EXTRACTOR_KERNELS=numpy)."""
    try:
        from diffuse_extractor.core import kernels
    except ImportError:
        return "numpy"
    return "numba" if kernels.enabled() else "numpy"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="warm stills and new-geometry stills to time")
    ap.add_argument("--expt", default=None)
    ap.add_argument("--refl", default=None)
    ap.add_argument("--out", default=str(result_path("diffuse_extractor")))
    ap.add_argument("--d-min", type=float, default=3.0, help="the d_min (Å) of the flow_job_d_min row: the flow's job "
                    "with the run's resolution limit (3.0: the thaumatin run's)")
    args = ap.parse_args()

    c = Clock().start()
    import h5py  # noqa: F401
    import hdf5plugin  # noqa: F401
    from cctbx import miller  # noqa: F401
    from dials.algorithms.spot_prediction import StillsReflectionPredictor  # noqa: F401
    from dials.array_family import flex  # noqa: F401

    from diffuse_extractor import __version__
    from diffuse_extractor import artifacts as art
    from diffuse_extractor.core.extract import ExtractionParams, GeometryCache, extract_still
    try:
        from diffuse_extractor.core.workspace import WORKSPACE
    except ImportError:  # an older diffuse_extractor (for before/after comparisons)
        WORKSPACE = None

    c_w = Clock().start()
    try:
        from diffuse_extractor.pipeline import warm_up
    except ImportError:  # an older diffuse_extractor (for before/after comparisons)
        warm_up = None
    if warm_up is not None:
        warm_up()
    warm_up_cpu, _ = c_w.lap()
    import_cpu, import_wall = c.lap()

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        expt = load_still(args.expt, tmp)
        c.lap()
        data, fmask = art.read_image(expt, 0)
        read_cpu, read_wall = c.lap()
        image_path = str(expt.imageset.get_path(0))
        refl = art.load_reflections(args.refl, 0) if args.refl else None
        params = ExtractionParams()
        rss0 = rss_mb()
        counter = iter(range(10 ** 6))

        def one_still(experiment, cache, read: bool = False, stats_path=None) -> dict:
            clock = Clock().start()
            if read:  # the job opens its still's image itself (a new imageset: no dxtbx image cache)
                from dxtbx.model import Experiment
                from dxtbx.model.experiment_list import ExperimentListFactory

                iset = ExperimentListFactory.from_filenames([image_path])[0].imageset
                img, fm = art.read_image(Experiment(imageset=iset, beam=experiment.beam,
                                                    detector=experiment.detector, crystal=experiment.crystal), 0)
            else:
                img, fm = data, fmask
            r_cpu, r_wall = clock.lap()
            dyn, s_cpu, h_cpu = None, 0.0, 0.0
            if stats_path is not None:  # as pipeline.process(pixel_stats=...)
                from diffuse_extractor.core import runstats
                from diffuse_extractor.core.masks import untrusted_and_overload

                st = runstats.update_run_stats(stats_path, f"still{next(counter)}", img,
                                               untrusted_and_overload(experiment.detector, img, fm))
                s_cpu, _ = clock.lap()
                if st.n_stills >= 3:
                    dyn = st.hot_dead_flags()
                h_cpu, _ = clock.lap()
                del st
            res = extract_still(experiment, img, refl, params=params, format_mask=fm, geometry_cache=cache,
                                dynamic_flags=dyn)
            e_cpu, e_wall = clock.lap()
            h5 = tmp / f"still_{next(counter):04d}.h5"
            art.write_still(h5, res, experiment, parameters=params.as_dict(), inputs={})
            w_cpu, w_wall = clock.lap()
            row = {"extract_cpu_s": e_cpu, "extract_wall_s": e_wall, "write_cpu_s": w_cpu, "write_wall_s": w_wall,
                   "total_cpu_s": e_cpu + w_cpu, "total_wall_s": e_wall + w_wall}
            if read:
                row.update(read_cpu_s=r_cpu, read_wall_s=r_wall, total_cpu_s=r_cpu + e_cpu + w_cpu,
                           total_wall_s=r_wall + e_wall + w_wall)
            if stats_path is not None:
                row.update(stats_cpu_s=s_cpu, hot_dead_cpu_s=h_cpu, total_cpu_s=row["total_cpu_s"] + s_cpu + h_cpu)
            del img, fm
            one_still.n_used, one_still.size_mb = len(res), h5.stat().st_size / 1e6
            del res
            h5.unlink()
            return row

        cache = GeometryCache()
        cold = one_still(expt, cache)
        rss_cold = rss_mb()
        warm = [one_still(expt, cache) for _ in range(args.repeats)]
        # per-still refined detector: every still is a new geometry for the cache
        run = GeometryCache()
        newg = [one_still(shifted(expt, 0.05 * (k + 1)), run) for k in range(args.repeats)]
        # the bus: one job per still, each with its own GeometryCache (so its own beamstop search)
        # and a per-still refined detector
        bus = [one_still(shifted(expt, 1.0 + 0.05 * k), GeometryCache()) for k in range(args.repeats)]
        # later jobs of one run on a worker: the run's beamstop (found in its first still) is reused
        run_store: dict = {}

        def run_cache():
            gc = GeometryCache()
            gc.beamstop = run_store
            return gc

        one_still(shifted(expt, 3.0), run_cache())  # the run's first still: searches the beamstop
        bus_run = [one_still(shifted(expt, 3.05 + 0.05 * k), run_cache()) for k in range(args.repeats)]
        # the same with the CBF read in each job
        bus_read = [one_still(shifted(expt, 2.0 + 0.05 * k), GeometryCache(), read=True) for k in range(args.repeats)]
        # the flow's job: CBF read, run pixel statistics + HOT/DEAD flags, run beamstop, refined detector
        run_store = {}
        ps = [one_still(shifted(expt, 4.0 + 0.05 * k), run_cache(), read=True, stats_path=tmp / "pixel_stats.h5")
              for k in range(args.repeats + 2)][2:]
        n_used, size_mb = one_still.n_used, one_still.size_mb
        # the same with the still table written without compression (write_still's "none" filter)
        os.environ["DIFFUSE_EXTRACTOR_COMPRESSION"] = "none"
        try:
            run_store = {}
            psu = [one_still(shifted(expt, 5.0 + 0.05 * k), run_cache(), read=True,
                             stats_path=tmp / "pixel_stats_u.h5") for k in range(args.repeats + 2)][2:]
            size_mb_plain = one_still.size_mb
        finally:
            del os.environ["DIFFUSE_EXTRACTOR_COMPRESSION"]
        # the flow's job as the flow runs it: pixels beyond the run's d_min are not extracted (RESOLUTION flags)
        params = ExtractionParams(d_min=args.d_min)
        run_store = {}
        psd = [one_still(shifted(expt, 6.0 + 0.05 * k), run_cache(), read=True, stats_path=tmp / "pixel_stats_d.h5")
               for k in range(args.repeats + 2)][2:]
        n_used_d, size_mb_d = one_still.n_used, one_still.size_mb
        params = ExtractionParams()
        # the statistics' unwritten stills go to their part files now (untimed): otherwise the flush timer can
        # fire while the temporary directory is being removed ("Directory not empty")
        from diffuse_extractor.core import runstats

        if hasattr(runstats, "flush"):
            runstats.flush()
    n_pix = sum(d.size for d in data)
    ws = summary(warm)
    ns = summary(newg)
    bs = summary(bus)
    br = summary(bus_read)
    bsr = summary(bus_run)
    pss = summary(ps)
    psus = summary(psu)
    psds = summary(psd)
    out = {
        "service": "diffuse-extractor",
        "version": __version__,
        "artifact_schema_version": art.SCHEMA_VERSION,
        "code": str(Path(art.__file__).resolve().parent),
        "detector": "PILATUS3 6M (thaumatin_grid image 1)",
        "pixels": int(n_pix),
        "pixels_used": int(n_used),
        "threads": 1,
        "kernels": _engine(),
        "per_still": "extract_still + write_still (new durable HDF5 file); CPU = process time of the one thread",
        "cold_cpu_s": round(cold["total_cpu_s"], 3),
        "cold_wall_s": round(cold["total_wall_s"], 3),
        "warm_cpu_s_median": ws["total_cpu_s"],
        "warm_wall_s_median": ws["total_wall_s"],
        "new_geometry_cpu_s_median": ns["total_cpu_s"],
        "new_geometry_wall_s_median": ns["total_wall_s"],
        "bus_job_cpu_s_median": bs["total_cpu_s"],
        "bus_job_wall_s_median": bs["total_wall_s"],
        "bus_job_same_run_cpu_s_median": bsr["total_cpu_s"],
        "bus_job_same_run_wall_s_median": bsr["total_wall_s"],
        "bus_job_with_read_cpu_s_median": br["total_cpu_s"],
        "bus_job_with_read_wall_s_median": br["total_wall_s"],
        "bus_job_with_pixel_stats_cpu_s_median": pss["total_cpu_s"],
        "bus_job_with_pixel_stats_wall_s_median": pss["total_wall_s"],
        "bus_job_with_pixel_stats_uncompressed_cpu_s_median": psus["total_cpu_s"],
        "flow_job_d_min": args.d_min, "flow_job_d_min_cpu_s_median": psds["total_cpu_s"],
        "flow_job_d_min_wall_s_median": psds["total_wall_s"], "flow_job_d_min_pixels_used": int(n_used_d),
        "flow_job_d_min_artifact_mb": round(size_mb_d, 1), "flow_job_d_min_median": psds,
        "flow_job_d_min_total_cpu_s_all": [round(r["total_cpu_s"], 3) for r in psd],
        "cold": {k: round(v, 3) for k, v in cold.items()},
        "warm_median": ws,
        "new_geometry_median": ns,
        "bus_job_median": bs,
        "bus_job_same_run_median": bsr,
        "bus_job_with_read_median": br,
        "bus_job_with_pixel_stats_median": pss,
        "bus_job_with_pixel_stats_uncompressed_median": psus,
        "bus_job_with_pixel_stats_total_cpu_s_all": [round(r["total_cpu_s"], 3) for r in ps],
        "bus_job_total_cpu_s_all": [round(r["total_cpu_s"], 3) for r in bus],
        "warm_total_cpu_s_all": [round(r["total_cpu_s"], 3) for r in warm],
        "new_geometry_total_cpu_s_all": [round(r["total_cpu_s"], 3) for r in newg],
        "import_cpu_s": round(import_cpu, 3),
        "warm_up_cpu_s": round(warm_up_cpu, 3),
        "import_wall_s": round(import_wall, 3),
        "read_image_cpu_s": round(read_cpu, 3),
        "read_image_wall_s": round(read_wall, 3),
        "artifact_mb": round(size_mb, 1),
        "artifact_uncompressed_mb": round(size_mb_plain, 1),
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_before_extraction_mb": round(rss0, 1),
        "rss_after_cold_still_mb": round(rss_cold, 1),
        "workspace_arrays_reused": WORKSPACE.reused if WORKSPACE else None,
        "workspace_arrays_allocated": WORKSPACE.allocated if WORKSPACE else None,
        "target_s_per_still": 0.5,
        "target_rss_mb": 2048,
        "load_average_1min": load_average(2)[0],
        "cpu_count": os.cpu_count(),
        "note": "wall and CPU seconds on a possibly shared machine: CPU seconds are the fairer figure under load",
    }
    write_results(args.out, out, echo=True)


if __name__ == "__main__":
    main()
