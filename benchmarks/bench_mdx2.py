"""Side by side with mdx2 (Meisburger & Ando) on a rendered rotation sweep with planted diffuse truth.

1. The sweep: ``diff_sim_refiner.datasets.sweep`` (60 frames of 0.5 deg, 981 x 1043 PILATUS-style detector,
   P4(3)2(1)2 crystal, Bragg + diffuse halos + water/air background + Poisson noise, 3 blank frames), rendered
   into ``--work``/data unless ``--data DIR`` names one already rendered.
2. mdx2 in its own virtual environment ``.bench/mdx2-venv`` (built here when missing): a venv over Debian's
   ``/usr/bin/python3`` with the system site packages (Debian's DIALS/dxtbx/cctbx, numpy 1.24.2) and the
   ``lib/cctbx`` link, then ``pip install --no-deps mdx2 nexusformat numexpr joblib simple-parsing loguru
   docstring-parser colored hdf5plugin`` under the project's constraints.
3. DIALS as mdx2's tutorial does: ``dials.import``, ``dials.find_spots``, ``dials.index`` with the known
   symmetry, ``dials.refine`` scan-varying; ``dials.import`` of the blank frames.
4. mdx2's own chain on one core (``taskset -c 0``, ``--nproc 1``), each step under ``/usr/bin/time -v``:
   import_geometry, import_data, find_peaks, mask_peaks, import_data + bin_image_series (blanks), integrate,
   correct (background from the binned blanks), scale, merge. Seconds per frame = sum of these / frames;
   peak memory = the largest maximum resident set of a step.
5. The merged map against the planted truth (:class:`DiffuseTruth` averaged over each voxel): Pearson CC, the
   fit map = a truth + b; with ``--ours RUN_OUTPUT_DIR`` (a ``diffractflow process diffuse`` output holding
   ``map.nxs`` or any ``*.nxs`` with ``/entry/map``) also ours vs truth and ours vs mdx2 where both measured
   (:func:`compare_maps`). Both maps are also judged against the truth as each one sampled it (the mean over the
   pixels it merged in a voxel: :func:`ours_sampled_reference`, :func:`mdx2_sampled_truth`), which separates how
   faithfully a map measures what it saw from which pixels its masks let it see.

6. With ``--cpu``: our diffuse steps' CPU seconds per frame on one core, per stage (:func:`cpu_per_frame`: the
   run's frames replayed job by job through the platform runtime, each service in one warm process).

Writes benchmarks/results/mdx2_side_by_side.json (``--case tetragonal``, the default sweep) or
benchmarks/results/mdx2_side_by_side_<case>.json (another sweep of :data:`CASES`). Usage:
    .venv/bin/python benchmarks/bench_mdx2.py [--case orthorhombic] [--data DIR] [--work DIR] [--ours RUN_OUTPUT_DIR] [--ndiv 3] [--cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "mdx2_side_by_side.json"
#: the rendered sweeps (SweepSpec overrides); "tetragonal" is the default sweep, its figures in RESULTS, the
#: others' in mdx2_side_by_side_<case>.json
CASES = {
    "tetragonal": {},
    # another crystal, lattice, orientation and geometry: orthorhombic, 1 deg frames over 60 deg, beam on the
    # other side of the array centre, longer distance, sharper mosaicity, stronger diffuse halos
    "orthorhombic": {"unit_cell": (52.0, 64.0, 78.0, 90.0, 90.0, 90.0), "space_group": "P 21 21 21",
                     "osc_deg": 1.0, "n_frames": 60, "seed": 7, "noise_seed": 3,
                     "beam_centre_frac": (0.58, 0.44), "distance_mm": 180.0, "mosaic_spread_deg": 0.25,
                     "bragg_cells": (10, 8, 7), "diffuse_cells": (3, 3, 3), "scale_phase": 2.1},
}
MDX2_VENV = REPO / ".bench" / "mdx2-venv"
MDX2_PACKAGES = ["mdx2", "nexusformat", "numexpr", "joblib", "simple-parsing", "loguru", "docstring-parser",
                 "colored", "hdf5plugin"]
DIALS_BIN = Path(sys.executable).parent          # the project's venv sees Debian's DIALS programs
MDX2_STEPS = ["import_geometry", "import_data", "find_peaks", "mask_peaks", "import_blanks", "bin_image_series",
              "integrate", "correct", "scale", "merge"]


# ----------------------------------------------------------------------------- environment
def ensure_mdx2_venv(venv: Path = MDX2_VENV) -> Path:
    """Build mdx2's venv when missing; return its bin directory (every ``mdx2.*`` command answers --help)."""
    py = venv / "bin" / "python"
    if not (venv / "bin" / "mdx2.merge").exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        if not py.exists():
            subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
        link = venv / "lib" / "cctbx"
        if not link.exists():
            link.symlink_to("/usr/lib/cctbx")
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "-c", str(REPO / "constraints.txt"),
                        *MDX2_PACKAGES], check=True)
    for step in ("import_data", "import_geometry", "find_peaks", "mask_peaks", "bin_image_series", "integrate",
                 "correct", "scale", "merge"):
        subprocess.run([str(venv / "bin" / f"mdx2.{step}"), "--help"], check=True, capture_output=True)
    return venv / "bin"


def _env(extra_path: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{extra_path}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = env["NUMEXPR_MAX_THREADS"] = env["NUMEXPR_NUM_THREADS"] = "1"
    env["OPENBLAS_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    return env


def timed(cmd: list[str], cwd: Path, log: Path, env: dict, one_core: bool = True) -> dict:
    """Run ``cmd`` under /usr/bin/time -v (and taskset -c 0): wall seconds and maximum resident set (GB)."""
    full = ["/usr/bin/time", "-v"] + (["taskset", "-c", "0"] if one_core else []) + cmd
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(full, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t
    text = log.read_text(errors="replace")
    if rc:
        raise SystemExit(f"{' '.join(cmd[:2])} failed (exit {rc}); log: {log}\n{text[-3000:]}")
    return _parse_time(text, wall)


def _parse_time(text: str, wall) -> dict:
    """Seconds (wall, else /usr/bin/time's elapsed), CPU seconds and maximum resident set (GB) of a -v log."""
    if wall is None:
        e = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
        wall = sum(float(v) * 60 ** i for i, v in enumerate(reversed(e.group(1).split(":")))) if e else 0.0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    u = re.search(r"User time \(seconds\): ([\d.]+)", text)
    s = re.search(r"System time \(seconds\): ([\d.]+)", text)
    return {"seconds": round(wall, 2), "cpu_seconds": round(float(u.group(1)) + float(s.group(1)), 2) if u and s
            else None, "max_rss_gb": round(int(m.group(1)) / 1024 ** 2, 3) if m else None}


# ----------------------------------------------------------------------------- the runs
def render(data: Path, case: str = "tetragonal") -> dict:
    from diff_sim_refiner.datasets.sweep import SweepSpec, generate_sweep

    t = time.perf_counter()
    generate_sweep(data, SweepSpec(**CASES[case]), progress=lambda d, n: print(f"  rendered {d}/{n}", flush=True))
    return {"render_seconds": round(time.perf_counter() - t, 1)}


def run_dials(data: Path, work: Path, truth: dict) -> dict:
    """DIALS as mdx2's tutorial: import, find_spots, index (known symmetry), scan-varying refine; blanks imported."""
    d = work / "dials"
    d.mkdir(parents=True, exist_ok=True)
    env = _env(DIALS_BIN)
    cell = ",".join(f"{x:g}" for x in truth["unit_cell"])
    sg = truth["space_group"].replace(" ", "")
    frames = sorted(str(p) for p in data.glob("sweep_*.cbf"))
    blanks = sorted(str(p) for p in data.glob("blank_*.cbf"))
    steps = {
        "import": ["dials.import", *frames],
        "find_spots": ["dials.find_spots", "imported.expt", "nproc=1"],
        "index": ["dials.index", "imported.expt", "strong.refl", f"space_group={sg}", f"unit_cell={cell}"],
        "refine": ["dials.refine", "indexed.expt", "indexed.refl", "scan_varying=True"],
        "import_blanks": ["dials.import", *blanks, "output.experiments=background.expt"],
    }
    out = {}
    for name, cmd in steps.items():
        out[name] = timed(cmd, d, d / f"{name}.log", env, one_core=False)
        print(f"  dials {name}: {out[name]['seconds']} s", flush=True)
    for expt in ("refined.expt", "background.expt"):
        mark_pixel_array_detector(d / expt)
    return out


def mark_pixel_array_detector(expt: Path) -> None:
    """mdx2 accepts only panels of type SENSOR_PAD; dxtbx reads a mini-CBF without a sensor line (the rendered
    frames have none on purpose: no absorption, no parallax) as SENSOR_UNKNOWN. The panel is a PILATUS-style
    pixel array, so say so in the experiment file (nothing else changes; thickness stays 0)."""
    doc = json.loads(expt.read_text())
    for det in doc.get("detector", []):
        for panel in det.get("panels", []):
            if panel.get("type") == "SENSOR_UNKNOWN":
                panel["type"] = "SENSOR_PAD"
    expt.write_text(json.dumps(doc, indent=2))


#: Debian's dxtbx 3.11 knows PILATUS arrays 1, 3 or 5 modules wide (487, 1475, 2463 pixels), not the 2-module
#: PILATUS 1M (981 x 1043) that mdx2's detector check looks up; newer dxtbx lists it. Added here, in mdx2's process.
_PILATUS_1M = ("import dataclasses, dxtbx.format.FormatPilatusHelpers as fph; p = fph._DetectorDatabase['Pilatus']; "
               "fph._DetectorDatabase['Pilatus'] = dataclasses.replace(p, module_configs_fast=tuple(sorted(set("
               "p.module_configs_fast) | {2})))")
#: mdx2 maps pixel index i to dxtbx's pixel coordinate i (a pixel corner); dxtbx puts pixel i's centre at i + 0.5
_HALF_PIXEL = ("import numpy as np, mdx2.dxtbx_machinery as m; f = m.index_grid_to_lab; "
               "m.index_grid_to_lab = lambda panel, ix, iy: f(panel, np.asarray(ix) + 0.5, np.asarray(iy) + 0.5)")


def mdx2_command(bin_dir: Path, step: str, args: list[str], half_pixel: bool = False) -> list[str]:
    """``mdx2.<step> args`` run through mdx2's own entry point in its venv, after the detector-database addition
    (and, with ``half_pixel``, the pixel-centre mapping)."""
    code = "; ".join([_PILATUS_1M] + ([_HALF_PIXEL] if half_pixel else []) + [
        f"import sys; from mdx2.command_line.{step} import run; sys.argv = ['mdx2.{step}'] + sys.argv[1:]; run()"])
    return [str(bin_dir / "python"), "-c", code, *args]


def run_mdx2(work: Path, bin_dir: Path, n_frames: int, ndiv: int, count_threshold: float,
             blank_bin_deg: float, half_pixel: bool = False, resume: bool = False) -> dict:
    """mdx2's chain as its tutorial, one core; returns per-step time and memory. ``half_pixel``: in
    ``work/mdx2-halfpixel``, with mdx2's pixel-to-hkl mapping moved to dxtbx's pixel centres (data imported once)."""
    m = work / ("mdx2-halfpixel" if half_pixel else "mdx2")
    m.mkdir(parents=True, exist_ok=True)
    env = _env(bin_dir)
    refined = str(work / "dials" / "refined.expt")
    background = str(work / "dials" / "background.expt")
    steps = {
        "import_geometry": ["import_geometry", refined],
        "import_data": ["import_data", refined, "--nproc", "1"],
        "find_peaks": ["find_peaks", "geometry.nxs", "data.nxs", "--count_threshold", f"{count_threshold:g}",
                       "--nproc", "1"],
        "mask_peaks": ["mask_peaks", "geometry.nxs", "data.nxs", "peaks.nxs", "--sigma_cutoff", "3",
                       "--nproc", "1"],
        "import_blanks": ["import_data", background, "--outfile", "bkg_data.nxs", "--nproc", "1"],
        "bin_image_series": ["bin_image_series", "bkg_data.nxs", "1", "20", "20",
                             "--valid_range", "0", "200", "--outfile", "bkg_binned.nxs", "--nproc", "1"],
        "integrate": ["integrate", "geometry.nxs", "data.nxs", "--mask", "mask.nxs", "--subdivide",
                      str(ndiv), str(ndiv), str(ndiv), "--nproc", "1"],
        # the frames carry no sensor (zero thickness): dxtbx's efficiency 1 - exp(-mu t / cos) would be 0
        "correct": ["correct", "geometry.nxs", "integrated.nxs", "--background", "bkg_binned.nxs",
                    "--efficiency", "False"],
        "scale": ["scale", "corrected.nxs"],
        "merge": ["merge", "corrected.nxs", "--scale", "scales.nxs"],
    }
    # bin_image_series bins in phi by images: each blank (one frame over blank_bin_deg) is its own bin
    out = {}
    for name in MDX2_STEPS:
        log = m / f"{name}.log"
        if resume and log.exists() and "Exit status: 0" in log.read_text(errors="replace"):
            out[name] = _parse_time(log.read_text(errors="replace"), None)
            continue
        if half_pixel and name in ("import_data", "import_blanks"):
            src = work / "mdx2" / ("data.nxs" if name == "import_data" else "bkg_data.nxs")
            (m / src.name).unlink(missing_ok=True)
            (m / src.name).symlink_to(src)
            continue
        cmd = mdx2_command(bin_dir, steps[name][0], steps[name][1:], half_pixel and name == "import_geometry")
        out[name] = timed(cmd, m, m / f"{name}.log", env, one_core=True)
        print(f"  mdx2 {name}: {out[name]['seconds']} s, {out[name]['max_rss_gb']} GB", flush=True)
    # the merged table, read by mdx2's own reader in its venv
    dump = ("import numpy as np; from mdx2.io import loadobj; T = loadobj('merged.nxs', 'hkl_table'); "
            "np.savez('merged_table.npz', h=T.h, k=T.k, l=T.l, intensity=T.intensity, "
            "intensity_error=T.intensity_error, count=T.count, ndiv=np.asarray(T.ndiv))")
    subprocess.run([str(bin_dir / "python"), "-c", dump], cwd=m, check=True, env=env)
    total = sum(v["seconds"] for v in out.values())
    cpu = sum(v["cpu_seconds"] or 0.0 for v in out.values())
    return {"steps": out, "seconds_total": round(total, 1), "seconds_per_frame": round(total / n_frames, 3),
            "cpu_seconds_per_frame": round(cpu / n_frames, 3),
            "peak_memory_gb": max(v["max_rss_gb"] or 0.0 for v in out.values()),
            "merged_table": str(m / "merged_table.npz")}


# ----------------------------------------------------------------------------- map comparison
def _load_mdx2(mdx2_map) -> dict:
    if isinstance(mdx2_map, dict):
        return mdx2_map
    z = np.load(mdx2_map)
    return {k: z[k] for k in z.files}


def _load_ours(ours_nxs) -> dict:
    """Our merged map: ``/entry/map`` with ``intensity``, ``counts`` and voxel-centre axes ``h``, ``k``, ``l``."""
    import h5py

    p = Path(ours_nxs)
    if p.is_dir():
        cands = [c for c in [p / "map.h5", *sorted(p.rglob("*.nxs"))] if c.is_file() and _has_map(c)]
        if not cands:
            raise FileNotFoundError(f"{p}: no NeXus file with /entry/map")
        p = cands[0]
    with h5py.File(p, "r") as f:
        g = f["entry/map"]
        I = np.asarray(g["intensity"], float)
        n = np.asarray(g["counts"], float) if "counts" in g else np.isfinite(I).astype(float)
        h, k, l = (np.asarray(g[a], float) for a in ("h", "k", "l"))
    if I.shape != (len(h), len(k), len(l)):
        raise ValueError(f"{p}: /entry/map/intensity has shape {I.shape}, axes give {(len(h), len(k), len(l))}")
    return {"file": str(p), "intensity": I, "counts": n, "h": h, "k": k, "l": l}


def _has_map(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "entry/map/intensity" in f
    except OSError:
        return False


def _fit(m: np.ndarray, t: np.ndarray) -> dict:
    ok = np.isfinite(m) & np.isfinite(t)
    m, t = m[ok], t[ok]
    if m.size < 3:
        return {"n_voxels": int(m.size), "cc": None}
    a, b = np.polyfit(t, m, 1)
    return {"n_voxels": int(m.size), "cc": round(float(np.corrcoef(m, t)[0, 1]), 4),
            "slope": float(a), "offset_fraction_of_mean": round(float(b / m.mean()), 4)}


def _to_asu(H: np.ndarray, space_group: str) -> np.ndarray:
    """Integer voxel indices (n, 3) mapped to the reciprocal asymmetric unit of the Laue group (cctbx's, the
    convention mdx2's to_asu follows)."""
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    cs = crystal.symmetry(unit_cell=(1, 1, 1, 90, 90, 90), space_group_symbol=space_group)
    ms = miller.set(cs, flex.miller_index([tuple(int(v) for v in r) for r in H]), anomalous_flag=False)
    return np.asarray(ms.map_to_asu().indices(), dtype=np.int64).reshape(-1, 3)


def mdx2_sampled_truth(mdx2_dir: Path, truth_dir: Path, ndiv: int, centre: bool = False) -> dict:
    """The planted truth as mdx2's map sampled it: per voxel of mdx2's grid (asymmetric unit), the mean of the truth
    over the pixels mdx2 binned there (its peak mask ``mask.nxs`` and the detector's invalid pixels out).

    mdx2 puts each pixel of a frame in the voxel of its Miller index at the frame's mid angle, evaluated at the
    pixel's corner (dxtbx coordinate i, see ``_HALF_PIXEL``; ``centre``: at dxtbx's centre i + 0.5 instead); the
    truth is taken at the pixel's true centre, averaged over the frame's oscillation (``phi_steps`` sub-steps),
    with the generator's geometry (no refinement error). Pixels weigh equally (mdx2 sums counts over a voxel).
    Returns ``keys`` (voxel keys, :func:`_vkey` of ASU indices) and ``mean`` (same order)."""
    import h5py

    from diff_sim_refiner.datasets.stills import DiffuseTruth, detector_frame, pixel_q
    from diff_sim_refiner.datasets.sweep import SweepSpec, rotation

    tr = json.loads((Path(truth_dir) / "truth.json").read_text())
    T = DiffuseTruth.load(truth_dir)
    spec = SweepSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in tr["spec"].items()})
    sspec = spec.stills_spec()
    q = pixel_q(sspec)[1]
    if centre:
        qa = q
    else:
        g = detector_frame(sspec)
        nf, ns = sspec.image_size
        pos = (g["origin_mm"] + (np.arange(ns) * sspec.pixel_mm)[:, None, None] * g["slow"]
               + (np.arange(nf) * sspec.pixel_mm)[None, :, None] * g["fast"])
        qa = (pos / np.linalg.norm(pos, axis=-1, keepdims=True) - g["beam"]) / sspec.wavelength_A
    A0 = np.asarray(tr["A0"], float)
    n_sub = max(int(spec.phi_steps), 4)
    keys, sums, cnts = [], [], []
    with h5py.File(Path(mdx2_dir) / "mask.nxs", "r") as fm, h5py.File(Path(mdx2_dir) / "data.nxs", "r") as fd:
        mask, img = fm["entry/mask/signal"], fd["entry/image_series/data"]
        for i, fr in enumerate(tr["frames"]):
            a, b = fr["phi_start_deg"], fr["phi_end_deg"]
            ok = (np.asarray(img[i]) >= 0) & ~np.asarray(mask[i], bool)
            qt = q[ok]
            t = np.zeros(len(qt))
            for j in range(n_sub):
                hkl = np.linalg.solve(rotation(a + (b - a) * (j + 0.5) / n_sub) @ A0, qt.T).T
                t += T(hkl[:, 0], hkl[:, 1], hkl[:, 2])
            H = np.rint(np.linalg.solve(rotation(0.5 * (a + b)) @ A0, qa[ok].T).T * ndiv).astype(np.int64)
            u, inv = np.unique(_vkey(H), return_inverse=True)
            keys.append(u)
            sums.append(np.bincount(inv, weights=t / n_sub))
            cnts.append(np.bincount(inv).astype(float))
    u, inv = np.unique(np.concatenate(keys), return_inverse=True)
    s, n = np.bincount(inv, weights=np.concatenate(sums)), np.bincount(inv, weights=np.concatenate(cnts))
    ua, inva = np.unique(_vkey(_to_asu(_unkey(u), tr["space_group"])), return_inverse=True)
    return {"keys": ua, "mean": np.bincount(inva, weights=s) / np.bincount(inva, weights=n)}


def _vkey(H: np.ndarray) -> np.ndarray:
    """One int64 per integer voxel index triple (each within +-2^19)."""
    H = np.asarray(H, np.int64) + (1 << 19)
    return (H[:, 0] << 40) | (H[:, 1] << 20) | H[:, 2]


def _unkey(k: np.ndarray) -> np.ndarray:
    return np.stack([(k >> 40) & 0xFFFFF, (k >> 20) & 0xFFFFF, k & 0xFFFFF], -1) - (1 << 19)


def _lookup(keys: np.ndarray, values: np.ndarray, want: np.ndarray) -> np.ndarray:
    pos = np.clip(np.searchsorted(keys, want), 0, max(len(keys) - 1, 0))
    out = np.full(len(want), np.nan)
    if len(keys):
        f = keys[pos] == want
        out[f] = values[pos[f]]
    return out


def ours_sampled_reference(run_out: Path, truth_dir: Path) -> np.ndarray:
    """The planted truth as our map sampled it (shape of our map, NaN where nothing was merged): per voxel, the
    exposure-weighted mean of the truth at the true indices of the merged pixels
    (:func:`orchestration.validation.sampled_reference`, as ``evaluate_run`` uses)."""
    from diff_sim_refiner.datasets.stills import DiffuseTruth, pixel_q
    from diff_sim_refiner.datasets.sweep import SweepSpec, rotation
    from orchestration.validation import recovered_scales, sampled_reference

    tr = json.loads((Path(truth_dir) / "truth.json").read_text())
    summary = json.loads((Path(run_out) / "summary.json").read_text())
    vol = Path(run_out) / ".diffractflow" / "volume"
    rdir = vol / "runs" / summary["run_id"]
    spec = SweepSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in tr["spec"].items()})
    n = max(int(spec.phi_steps), 4)
    A0 = np.asarray(tr["A0"], float)
    As = {fr["file"]: [rotation(fr["phi_start_deg"] + (fr["phi_end_deg"] - fr["phi_start_deg"]) * (j + 0.5) / n)
                       @ A0 for j in range(n)] for fr in tr["frames"]}
    rec = recovered_scales(rdir / "output" / "scales.json")
    stills = []
    for p in sorted((rdir / "stills").glob("*.json")):
        r = json.loads(p.read_text())
        name = Path(r["image"]).name
        if r["status"] == "ok" and name in As:
            stills.append({"table": vol / r["diffuse"]["path"], "A": As[name], "scale": rec.get(name, 1.0)})
    return sampled_reference(rdir / "output" / "map.h5", stills, DiffuseTruth.load(truth_dir),
                             pixel_q(spec.stills_spec())[1], tr["space_group"])


def compare_maps(ours_nxs, mdx2_map, truth, ours_ref: np.ndarray | None = None,
                 mdx2_ref: dict | None = None) -> dict:
    """CC of each map against the planted truth (voxel-averaged :class:`DiffuseTruth`) and CC between the two
    where both measured.

    ``ours_nxs``: our merged NeXus map (file, or run output directory), or None; ``mdx2_map``: mdx2's merged
    table (npz with h, k, l, intensity, ndiv as :func:`run_mdx2` writes, or such a dict), or None; ``truth``: the
    sweep's truth dict or directory. The two maps meet on mdx2's grid (voxels 1/ndiv wide, asymmetric unit of
    the Laue group): our measured voxels are binned onto it (mean of those falling in a voxel) after mapping to
    the asymmetric unit.

    Two truths, each the same for both maps: ``*_vs_truth`` the truth averaged uniformly over the voxel, and, when
    ``ours_ref`` (:func:`ours_sampled_reference`) and ``mdx2_ref`` (:func:`mdx2_sampled_truth`) are given,
    ``*_vs_sampled_truth`` the truth averaged over the pixels that map merged in each voxel. A map can only be
    as close to the uniform average as its pixels cover the voxel: both tools mask pixels around Bragg peaks,
    where the halos peak, so the uniform average is higher there than anything either map measured."""
    from diff_sim_refiner.datasets.stills import DiffuseTruth

    T = DiffuseTruth.load(truth)
    tr = truth if isinstance(truth, dict) else json.loads((Path(truth) / "truth.json").read_text())
    sg = tr["space_group"]
    res: dict = {}
    md = None
    if mdx2_map is not None:
        md = _load_mdx2(mdx2_map)
        nd = int(np.asarray(md["ndiv"]).ravel()[0])
        c = np.stack([md["h"], md["k"], md["l"]], -1).astype(float)
        ok = np.isfinite(md["intensity"])
        md["centres"], md["I"], md["nd"] = c[ok], np.asarray(md["intensity"], float)[ok], nd
        res["mdx2_vs_truth"] = _fit(md["I"], T.on_voxels(md["centres"], nd))
        res["mdx2_ndiv"] = nd
        if mdx2_ref is not None:
            md["S"] = _lookup(mdx2_ref["keys"], mdx2_ref["mean"], _vkey(np.round(md["centres"] * nd)))
            res["mdx2_vs_sampled_truth"] = _fit(md["I"], md["S"])
    if ours_nxs is not None:
        o = _load_ours(ours_nxs)
        meas = (o["counts"] > 0) & np.isfinite(o["intensity"])
        ii = np.nonzero(meas)
        c = np.stack([o["h"][ii[0]], o["k"][ii[1]], o["l"][ii[2]]], -1)
        step = np.array([np.median(np.diff(o[a])) for a in ("h", "k", "l")])
        nd_o = 1.0 / step
        I = o["intensity"][meas]
        res["ours_file"] = o["file"]
        res["ours_ndiv"] = [round(float(v), 3) for v in nd_o]
        res["ours_vs_truth"] = _fit(I, T.on_voxels(c, nd_o))
        R = None
        if ours_ref is not None:
            R = np.asarray(ours_ref, float)[meas]
            res["ours_vs_sampled_truth"] = _fit(I, R)
        if md is not None:
            nd = md["nd"]
            H = _to_asu(np.round(c * nd).astype(np.int64), sg)
            Hm = np.round(md["centres"] * nd).astype(np.int64)
            keys_o, inv = np.unique(H, axis=0, return_inverse=True)
            sums = np.bincount(inv.ravel(), weights=I, minlength=len(keys_o))
            cnts = np.bincount(inv.ravel(), minlength=len(keys_o))
            ours_binned = {tuple(k): s / n for k, s, n in zip(keys_o, sums, cnts)}
            pairs = [(ours_binned[tuple(k)], v, i) for i, (k, v) in enumerate(zip(Hm, md["I"]))
                     if tuple(k) in ours_binned]
            if pairs:
                a = np.array([p[0] for p in pairs])
                b = np.array([p[1] for p in pairs])
                idx = np.array([p[2] for p in pairs])
                t = T.on_voxels(md["centres"][idx], nd)
                res["common"] = {"n_voxels": len(pairs), "cc_ours_vs_mdx2": round(float(np.corrcoef(a, b)[0, 1]), 4),
                                 "ours_vs_truth": _fit(a, t), "mdx2_vs_truth": _fit(b, t)}
                if R is not None and "S" in md:
                    ok = np.isfinite(R)
                    rs = np.bincount(inv.ravel()[ok], weights=R[ok], minlength=len(keys_o))
                    rn = np.bincount(inv.ravel()[ok], minlength=len(keys_o))
                    pos = {tuple(k): j for j, k in enumerate(keys_o)}
                    ro = np.array([rs[pos[tuple(Hm[i])]] / rn[pos[tuple(Hm[i])]] if rn[pos[tuple(Hm[i])]] else np.nan
                                   for i in idx])
                    sm = md["S"][idx]
                    res["common"]["ours_vs_sampled_truth"] = _fit(a, ro)
                    res["common"]["mdx2_vs_sampled_truth"] = _fit(b, sm)
                    both = np.isfinite(ro) & np.isfinite(sm)
                    # how much each tool's sampling departs from the uniform voxel average (slope < 1: the
                    # voxel's brightest part, the halo centre under the Bragg peak, was masked)
                    res["common"]["ours_sampled_vs_uniform"] = _fit(ro[both], t[both])
                    res["common"]["mdx2_sampled_vs_uniform"] = _fit(sm[both], t[both])
            else:
                res["common"] = {"n_voxels": 0}
    return res


# ----------------------------------------------------------------------------- our CPU per frame
def _cpu_plan(run_out: Path, scratch: Path) -> dict:
    """What :func:`cpu_per_frame` replays from a ``process diffuse`` output: each merged frame's experiment list,
    the run's background artifact and configuration, copied into a scratch volume (frames are read where the
    experiment lists point)."""
    summary = json.loads((run_out / "summary.json").read_text())
    vol = run_out / ".diffractflow" / "volume"
    rdir = vol / "runs" / summary["run_id"]
    cfg = json.loads((rdir / "config.json").read_text())
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "volume" / "src").mkdir(parents=True)
    frames = []
    for rp in sorted((rdir / "stills").glob("*.json")):
        r = json.loads(rp.read_text())
        if r.get("status") != "ok":
            continue
        dst = scratch / "volume" / "src" / f"{rp.stem}.expt"
        shutil.copy(vol / r["experiments"]["path"], dst)
        frames.append({"stem": rp.stem, "experiments": str(dst)})
    bkg = None
    if (rdir / "background.json").exists():
        bkg = scratch / "volume" / "src" / "background.h5"
        shutil.copy(vol / json.loads((rdir / "background.json").read_text())["artifact"]["path"], bkg)
    plan = {"frames": frames, "background": str(bkg) if bkg else None, "config": cfg,
            "scales": str(rdir / "output" / "scales.json"), "volume": str(scratch / "volume")}
    (scratch / "plan.json").write_text(json.dumps(plan, indent=1))
    return plan


def _cpu_stage(stage: str, scratch: Path) -> dict:
    """One service's jobs of the run, in this process (meant to be pinned to one core), through the platform
    runtime (``run_inline``: input hash checks, outputs hashed, manifest), after the service's warm-up: CPU
    seconds per job (``process_time``). ``merge``: the run's two merges (unscaled, then with its scales)."""
    from diffractflow.artifacts import Volume
    from diffractflow.config import Settings
    from diffractflow.messages import JobRequest
    from diffractflow.runtime import run_inline

    plan = json.loads((scratch / "plan.json").read_text())
    cfg, root = plan["config"], Path(plan["volume"])
    vol, settings = Volume(root), Settings(volume=root)
    run = "cpu"
    spec = {"unit_cell": cfg["unit_cell"], "space_group": cfg["space_group"], "d_min": cfg["d_min"],
            "subdivisions": cfg["subdivisions"]}
    cpu, jobs = [], []
    if stage == "extract":
        from diffuse_extractor.worker import STAGE

        params = {**cfg.get("extractor", {}), "pngs": False, "bragg_radius_px": cfg.get("bragg_radius_px") or 6.0,
                  "beamstop_record": f"runs/{run}/beamstop.npz"}
        params.setdefault("d_min", cfg["d_min"])  # as the flow: pixels beyond the map's limit are not extracted
        if cfg.get("hot_dead_pixels", True):
            params["pixel_stats"] = f"runs/{run}/pixel_stats.h5"
        for f in plan["frames"]:
            inputs = {"experiments": vol.ref(f["experiments"])}
            if plan["background"]:
                inputs["background"] = vol.ref(plan["background"])
            jobs.append(JobRequest(job_id=f"{run}.extract.{f['stem']}", run_id=run, service="diffuse-extractor",
                                   inputs=inputs, params=params))
    elif stage == "accumulate":
        from voxel_merger.worker import STAGE

        for f in plan["frames"]:
            still = next((root / "jobs" / "diffuse-extractor" / f"{run}.extract.{f['stem']}").glob("*.h5"))
            jobs.append(JobRequest(job_id=f"{run}.accumulate.{f['stem']}", run_id=run, service="voxel-merger",
                                   inputs={"still": vol.ref(still)}, params={"mode": "accumulate", "grid_spec": spec}))
    elif stage == "merge":
        from voxel_merger.worker import STAGE

        parts = sorted((root / "jobs" / "voxel-merger").glob(f"{run}.accumulate.*/partial.h5"))
        partials = {f"partial{i:05d}": vol.ref(p) for i, p in enumerate(parts)}
        merge = {"mode": "merge", "symmetry": cfg.get("symmetry"), "reject_sigma": cfg.get("reject_sigma"),
                 "exclude_bragg_voxels": bool(cfg.get("exclude_bragg_voxels")) and cfg["subdivisions"] >= 3}
        scales = root / "src" / "scales.json"
        shutil.copy(plan["scales"], scales)
        jobs = [JobRequest(job_id=f"{run}.merge.warm", run_id=run, service="voxel-merger", inputs=partials,
                           params={**merge, "reject_sigma": None}),
                JobRequest(job_id=f"{run}.merge.unscaled", run_id=run, service="voxel-merger", inputs=partials,
                           params={**merge, "reject_sigma": None, "figures": False, "table_only": True}),  # as the flow
                JobRequest(job_id=f"{run}.merge.scaled", run_id=run, service="voxel-merger",
                           inputs={**partials, "scales": vol.ref(scales)}, params=merge)]
    else:
        raise SystemExit(f"unknown stage {stage}")
    if STAGE.warm_up is not None:  # as `serve` does before taking jobs
        STAGE.warm_up()
    for job in jobs:
        t = time.process_time()
        run_inline(STAGE, job, settings)
        cpu.append(time.process_time() - t)
        if job.job_id.endswith(".merge.warm"):  # a run's first merge maps its voxels onto the ASU itself
            from voxel_merger.core import merge as merge_module

            merge_module._SHARED_MEMO.clear()
    out = {"jobs": [j.job_id for j in jobs], "cpu_seconds": [round(c, 4) for c in cpu]}
    (scratch / f"cpu_{stage}.json").write_text(json.dumps(out))
    return out


def cpu_per_frame(run_out: Path, scratch: Path) -> dict:
    """Our diffuse steps' CPU seconds per frame on one core: the run's frames replayed job by job
    (:func:`_cpu_stage`), each service in one warm process pinned to core 0 (``taskset -c 0``), as a long-lived
    worker handles them; the worker's one-off imports are excluded (its warm-up), its first job is not."""
    plan = _cpu_plan(run_out, scratch)
    res = {}
    for stage in ("extract", "accumulate", "merge"):
        subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--cpu-stage", stage, "--cpu-dir",
                        str(scratch)], check=True, env=_env(DIALS_BIN))
        res[stage] = json.loads((scratch / f"cpu_{stage}.json").read_text())["cpu_seconds"]
    n = len(plan["frames"])
    ex, acc = np.asarray(res["extract"]), np.asarray(res["accumulate"])
    _, unscaled, scaled = res["merge"]
    out = {"how": "each service's jobs of the run through the platform runtime (run_inline: input hashes checked, "
                  "outputs hashed, manifest) in one process pinned to one core (taskset -c 0) after the worker's "
                  "warm-up, CPU time (process_time); merges: the run's unscaled merge (only the scaler's "
                  "observation table, as the flow) and scaled merge (the first, unmeasured merge warms the process's "
                  "imports); scaling not included (~0.05-0.1)",
           "frames": n, "extraction": round(float(ex.mean()), 3),
           "extraction_first_job": round(float(ex[0]), 3),
           "accumulate": round(float(acc.mean()), 3), "accumulate_first_job": round(float(acc[0]), 3),
           "merge_unscaled_cpu_s": round(unscaled, 2), "merge_scaled_cpu_s": round(scaled, 2),
           "merges": round((unscaled + scaled) / n, 3)}
    out["diffuse_steps_total"] = round(out["extraction"] + out["accumulate"] + out["merges"], 3)
    return out


# ----------------------------------------------------------------------------- main
def describe_ours(out: Path, data: Path, truth: dict) -> dict:
    """Our run's figures: wall time, seconds per stage (per frame and end of run) and the map against the truth at
    the merged pixels' true Miller indices (orchestration.demo.evaluate_run, averaged over each frame's oscillation)."""
    from orchestration.demo import evaluate_run

    summary = json.loads((out / "summary.json").read_text())
    vol = out / ".diffractflow" / "volume"
    tr = {**truth, "out_dir": str(data)}
    return {"wall_seconds": summary.get("wall_seconds"), "frames_processed": summary.get("stills_processed"),
            "stage_seconds": summary.get("stage_seconds"),
            "vs_truth_at_merged_pixels": evaluate_run(vol / "runs" / summary["run_id"], vol, tr, truth["space_group"])}


def run_ours(data: Path, out: Path, n_frames: int, truth: dict) -> dict:
    """`diffractflow process diffuse` on the sweep (the platform's own command, embedded topology), then
    :func:`describe_ours`."""
    from orchestration.demo import demo_run_config

    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = out.parent / "ours-config.json"
    cfg.write_text(json.dumps(demo_run_config(truth, n_frames)))
    shutil.rmtree(out, ignore_errors=True)
    with open(out.parent / "ours.log", "w") as log:
        subprocess.run([str(Path(sys.executable).parent / "diffractflow"), "process", "diffuse", str(data), "--config",
                        str(cfg), "--out", str(out), "--pattern", "sweep_*.cbf", "--background", "blank_*.cbf",
                        "--run-id", "sweep"], stdout=log, stderr=subprocess.STDOUT, check=True)
    return describe_ours(out, data, truth)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="a rendered sweep (sweep_*.cbf, blank_*.cbf, truth.json)")
    ap.add_argument("--case", choices=sorted(CASES), default="tetragonal",
                    help="which sweep to render (see CASES); figures of a case other than 'tetragonal' go to "
                    "benchmarks/results/mdx2_side_by_side_<case>.json")
    ap.add_argument("--work", type=Path, help="work directory (default benchmarks/work/mdx2[-CASE])")
    ap.add_argument("--ours", type=Path, help="our `diffractflow process diffuse` output (or its merged .nxs)")
    ap.add_argument("--run-ours", action="store_true", help="also run `diffractflow process diffuse` on the sweep "
                    "(into WORK/ours) and compare")
    ap.add_argument("--ndiv", type=int, default=3, help="mdx2 integrate --subdivide (voxels per unit cell edge)")
    ap.add_argument("--count-threshold", type=float, default=100.0, help="mdx2 find_peaks --count_threshold")
    ap.add_argument("--skip-mdx2", action="store_true", help="reuse the work dir's mdx2 results")
    ap.add_argument("--skip-dials", action="store_true", help="reuse the work dir's DIALS results")
    ap.add_argument("--resume", action="store_true", help="keep mdx2 steps whose log says they succeeded")
    ap.add_argument("--half-pixel", action="store_true",
                    help="also run mdx2 with its pixel-to-hkl mapping at dxtbx's pixel centres")
    ap.add_argument("--cpu", action="store_true", help="with --ours (or --run-ours): replay our run's frame jobs "
                    "and merges on one core and record CPU seconds per frame per stage (:func:`cpu_per_frame`)")
    ap.add_argument("--cpu-stage", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cpu_stage:  # one stage of cpu_per_frame, in its own pinned process
        return _cpu_stage(args.cpu_stage, args.cpu_dir)
    global RESULTS
    if args.case != "tetragonal":
        RESULTS = RESULTS.with_name(f"mdx2_side_by_side_{args.case}.json")
    work = args.work or REPO / "benchmarks" / "work" / ("mdx2" if args.case == "tetragonal" else f"mdx2-{args.case}")
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "mdx2 side by side on a rendered rotation sweep",
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "platform": platform.platform()},
                    "date": time.strftime("%Y-%m-%d %H:%M")}
    data = args.data
    if data is None:
        data = work / "data"
        if not (data / "truth.json").exists() or not any(data.glob("blank_*.cbf")):
            result["render"] = render(data, args.case)
    truth = json.loads((data / "truth.json").read_text())
    n_frames = len(truth["frames"])
    result["sweep"] = {"case": args.case, "dir": str(data), "frames": n_frames, "osc_deg": truth["scan"]["osc_deg"],
                       "image_size_fast_slow": truth["image_size_fast_slow"], "space_group": truth["space_group"],
                       "unit_cell": truth["unit_cell"], "blank_frames": len(truth["background_frames"]),
                       "generator": truth["generator"]}
    merged = work / "mdx2" / "merged_table.npz"
    if not args.skip_mdx2:
        bin_dir = ensure_mdx2_venv()
        version = subprocess.run([str(bin_dir / "mdx2.version")], capture_output=True, text=True).stdout
        result["mdx2_version"] = (re.search(r"mdx2: (\S+)", version) or [None, None])[1]
        if not args.skip_dials:
            result["dials"] = run_dials(data, work, truth)
        blank_osc = float(truth["spec"]["blank_osc_deg"] or truth["scan"]["osc_deg"] * n_frames
                          / max(1, len(truth["background_frames"])))
        result["mdx2"] = run_mdx2(work, bin_dir, n_frames, args.ndiv, args.count_threshold, blank_osc,
                                  resume=args.resume)
        result["mdx2"]["commands"] = "see bench_mdx2.run_mdx2; one core (taskset -c 0, --nproc 1)"
    if args.half_pixel:
        bin_dir = ensure_mdx2_venv()
        blank_osc = float(truth["spec"]["blank_osc_deg"] or truth["scan"]["osc_deg"] * n_frames
                          / max(1, len(truth["background_frames"])))
        hp = run_mdx2(work, bin_dir, n_frames, args.ndiv, args.count_threshold, blank_osc, half_pixel=True)
        result["mdx2_half_pixel"] = {"maps": compare_maps(None, hp["merged_table"], data),
                                     "note": "mdx2 with pixel i mapped at dxtbx's pixel centre i + 0.5"}
    if (args.skip_mdx2 or args.skip_dials) and RESULTS.exists():  # what this run reused keeps its recorded figures
        prev = json.loads(RESULTS.read_text())
        reused = ("mdx2_version", "dials", "mdx2", "render", "mdx2_half_pixel", "ours_bragg_radius_3px") \
            if args.skip_mdx2 else ("dials", "render")
        for k in reused:
            if k in prev and k not in result:
                result[k] = prev[k]
    if args.run_ours:
        args.ours = work / "ours"
        result["ours_run"] = run_ours(data, args.ours, n_frames, truth)
    elif args.ours is not None and (Path(args.ours) / "summary.json").is_file():
        result["ours_run"] = describe_ours(Path(args.ours), data, truth)
    elif args.skip_mdx2 and RESULTS.exists() and "ours_run" in json.loads(RESULTS.read_text()):
        result["ours_run"] = json.loads(RESULTS.read_text())["ours_run"]
    if args.cpu and args.ours is not None and (Path(args.ours) / "summary.json").is_file():
        result["ours_cpu_seconds_per_frame_one_core"] = cpu_per_frame(Path(args.ours), work / "cpu")
        mdx2_cpu = (result.get("mdx2") or {}).get("cpu_seconds_per_frame")
        if mdx2_cpu:
            c = result["ours_cpu_seconds_per_frame_one_core"]
            c["mdx2_cpu_seconds_per_frame"] = mdx2_cpu
            c["ratio_to_mdx2"] = round(c["diffuse_steps_total"] / mdx2_cpu, 3)
            c["target_ratio"] = 0.5
    elif args.skip_mdx2 and RESULTS.exists() and "ours_cpu_seconds_per_frame_one_core" in json.loads(RESULTS.read_text()):
        result["ours_cpu_seconds_per_frame_one_core"] = json.loads(RESULTS.read_text())["ours_cpu_seconds_per_frame_one_core"]
    mref = oref = None
    if merged.exists() and (work / "mdx2" / "mask.nxs").exists():
        cache = work / "mdx2" / "sampled_truth.npz"  # the truth as mdx2 sampled it (minutes): kept beside its map
        if cache.exists() and cache.stat().st_mtime > merged.stat().st_mtime:
            z = np.load(cache)
            mref = {k: z[k] for k in z.files}
        else:
            mref = mdx2_sampled_truth(work / "mdx2", data, args.ndiv)
            np.savez(cache, **mref)
    if args.ours is not None and (Path(args.ours) / "summary.json").is_file():
        cache = Path(args.ours) / "sampled_reference.npy"  # minutes on 60 frames: kept beside the run's map
        if cache.exists() and cache.stat().st_mtime > (Path(args.ours) / "summary.json").stat().st_mtime:
            oref = np.load(cache)
        else:
            oref = ours_sampled_reference(Path(args.ours), data)
            np.save(cache, oref)
    result["maps"] = compare_maps(args.ours, merged if merged.exists() else None, data, ours_ref=oref, mdx2_ref=mref)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["maps"], indent=2))
    return result


if __name__ == "__main__":
    main()
