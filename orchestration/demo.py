"""`diffractflow demo`: the platform's main jobs on embedded defaults, end to end, then everything stopped.

- ``diffuse``: start the embedded topology, generate a synthetic run with planted truth, drop its stills
  into the watched directory one by one, let the watcher/dispatcher/flows process and merge them, then
  compare the merged map and the recovered scales with the truth (``summary.json``).
- ``stem``: stem-polar on a generated 4D-STEM dataset with planted domains and fields.
- ``refine``: seed 001's refinement demo (diff-sim-refiner refine-demo).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .embedded import Topology

BIN = Path(sys.executable).parent


def run_demo(what: str, out: Path, console, stills: int = 20) -> int:
    out.mkdir(parents=True, exist_ok=True)
    steps = {"diffuse": lambda: demo_diffuse(out / "diffuse", console, stills),
             "stem": lambda: demo_stem(out / "stem", console),
             "refine": lambda: demo_refine(out / "refine", console)}
    if what not in (*steps, "all"):
        console.print(f"[red]unknown demo {what!r}[/red]: choose all, {', '.join(steps)}")
        return 2
    rc = 0
    for name in (steps if what == "all" else [what]):
        console.rule(f"demo: {name}")
        t = time.monotonic()
        code = steps[name]()
        console.print(f"demo {name}: {'ok' if code == 0 else 'FAILED'} in {time.monotonic() - t:.0f} s")
        rc = rc or code
    return rc


# ------------------------------------------------------------------------------- diffuse
def demo_diffuse(out: Path, console, n_stills: int = 20, run_id: str = "demo") -> int:
    from diff_sim_refiner.diffuse_dataset import DatasetSpec, generate

    from .diffuse import DiffuseRunConfig

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_start = time.monotonic()
    spec = DatasetSpec(n_stills=n_stills)
    console.print(f"generating {n_stills} stills with planted diffuse signal and scales ...")
    truth = generate(out / "dataset", spec)
    topo = Topology(out / ".diffractflow")
    try:
        topo.up(["stills-processor", "diffuse-extractor", "voxel-merger", "scaler"],
                {"stills-processor": 2, "diffuse-extractor": 2}, volume=out / "volume", prefect=True,
                log=console.print)
        topo.apply_env()
        from diffractflow.artifacts import Volume, atomic_write_json

        volume = Volume(out / "volume")
        cfg = DiffuseRunConfig(space_group=spec.space_group, unit_cell=list(spec.unit_cell), d_min=2.0,
                               symmetry=spec.space_group,
                               subdivisions=3, smoother=True, formula=None, expected_stills=n_stills,
                               stills_nproc=1,
                               # the synthetic Bragg spots are broader than DIALS' stills default allows
                               stills_phil=["profile.gaussian_rs.parameters.sigma_b_cutoff=1.0",
                                            # a still cannot pin the distance: keep the known detector fixed
                                            "refinement.parameterisation.detector.fix=all"])
        rdir = volume.resolve(f"runs/{run_id}")
        rdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rdir / "config.json", cfg.model_dump())
        incoming = volume.resolve(f"incoming/{run_id}")
        incoming.mkdir(parents=True, exist_ok=True)
        with topo.prefect_settings():
            asyncio.run(_feed_and_watch(topo, incoming, run_id, n_stills, out / "dataset", console))
        summary_file = rdir / "output" / "run_summary.json"
        if not summary_file.exists():
            console.print("[red]the run did not produce its merged output[/red]")
            return 1
        run_summary = json.loads(summary_file.read_text())
        metrics = evaluate_against_truth(volume, rdir, truth, symmetry=cfg.symmetry)
        summary = {
            "stills_total": run_summary["stills_total"],
            "stills_processed": run_summary["stills_processed"],
            "stills_failed": run_summary["stills_failed"],
            "map_cc_vs_truth": metrics["map_cc_vs_truth"],
            "scale_error_max": metrics["scale_error_max"],
            "scale_error_rms": metrics["scale_error_rms"],
            "n_voxels_compared": metrics["n_voxels"],
            "wall_seconds": round(time.monotonic() - t_start, 1),
            "stage_seconds": _stage_seconds(rdir, run_summary),
            "failed": run_summary.get("failed", {}),
            "outputs": str(rdir / "output"),
        }
        atomic_write_json(out / "summary.json", summary)
        console.print_json(json.dumps(summary))
        console.print(f"merged map, figures and scales: {rdir / 'output'}")
        good = summary["map_cc_vs_truth"] >= 0.95 and summary["scale_error_max"] <= 0.02
        return 0 if good else 1
    finally:
        topo.down(log=console.print)


async def _feed_and_watch(topo: Topology, incoming: Path, run_id: str, n: int, dataset: Path, console) -> None:
    """The dataset's stills land in the incoming directory one by one, as from a detector."""
    from .process import feed_and_dispatch

    await feed_and_dispatch(topo, incoming, run_id, sorted(dataset.glob("*.cbf"))[:n], console, interval_s=0.5)


def _stage_seconds(rdir: Path, run_summary: dict) -> dict:
    per_still: dict[str, list[float]] = {}
    for p in (rdir / "stills").glob("*.json"):
        for k, v in json.loads(p.read_text()).get("stage_seconds", {}).items():
            per_still.setdefault(k, []).append(v)
    out = {f"{k}_per_still_mean": round(float(np.mean(v)), 2) for k, v in per_still.items()}
    out.update(run_summary.get("stage_seconds", {}))
    return out


def evaluate_against_truth(volume, rdir: Path, truth: dict, symmetry: str | None = None) -> dict:
    """Merged map vs the planted diffuse signal, and recovered vs planted per-still scales.

    The reference value of a voxel is the inverse-variance weighted mean of the planted signal over the
    pixels that landed in it (in its symmetry group of voxels when the map was merged with symmetry),
    each evaluated at that pixel's *true* Miller indices from the generator's own orientation. So the
    comparison checks indexing, geometry, corrections, scaling and voxelisation together.
    """
    import h5py
    import hdf5plugin  # noqa: F401  (the extractor's tables are Blosc-compressed)

    from diff_sim_refiner.diffuse_dataset import DiffuseModel, diffuse_truth, pixel_geometry

    out = rdir / "output"
    q_true = None  # the generator's own pixel geometry: truth does not depend on the pipeline's refinement
    with h5py.File(out / "map.h5", "r") as f:
        g = f["entry/map"]
        merged = g["intensity"][()]
        counts = g["counts"][()]
        axes = [g[a][()] for a in ("h", "k", "l")]
    ndiv = int(round(1.0 / (axes[0][1] - axes[0][0])))
    lo = np.array([int(round(a[0] * ndiv)) for a in axes])
    shape = merged.shape
    ops = _laue_rotations(symmetry)
    model = DiffuseModel(**{k: tuple(v) if isinstance(v, list) else v for k, v in truth["spec"]["diffuse"].items()})
    stills = {s["file"]: s for s in truth["stills"]}
    scales = json.loads((out / "scales.json").read_text())
    scales = scales.get("scales", scales)
    # scales.json is keyed by the observation table's still index; statistics.json names each index
    # (the voxel-merger's still id: "<image path>#<image index>")
    index_names = json.loads((out / "statistics.json").read_text()).get("still_names", {})
    names = {Path(v.split("#")[0]).name: k for k, v in index_names.items()}
    sum_wv = np.zeros(merged.size)
    sum_w = np.zeros(merged.size)
    planted, recovered = [], []
    for rec_file in sorted((rdir / "stills").glob("*.json")):
        rec = json.loads(rec_file.read_text())
        if rec["status"] != "ok":
            continue
        st = stills[Path(rec["image"]).name]
        key = names.get(Path(rec["image"]).name)
        b = float(scales[key]) if key in scales else 1.0
        if key in scales:
            planted.append(st["scale"])
            recovered.append(b)
        with h5py.File(volume.resolve(rec["diffuse"]["path"]), "r") as f:
            px = f["entry/pixels"]
            hkl = np.stack([px[c][()].astype(np.float64) for c in ("h", "k", "l")])
            x, y = px["x"][()].astype(np.int64), px["y"][()].astype(np.int64)
            sigma = px["sigma"][()].astype(np.float64)
            if q_true is None:
                q_true = pixel_geometry(f["entry"].attrs["image_path"])[2]
        q = q_true[:, y, x]
        true_hkl = np.linalg.solve(np.asarray(st["A"]), q)
        value = diffuse_truth(true_hkl[0], true_hkl[1], true_hkl[2], np.linalg.norm(q, axis=0), model)
        vox = _canonical(np.rint(hkl * ndiv).astype(np.int64), ops) - lo[:, None]
        ok = np.all((vox >= 0) & (vox < np.array(shape)[:, None]), axis=0)
        flat = np.ravel_multi_index(tuple(vox[:, ok]), shape)
        w = (b / sigma[ok]) ** 2  # the merger's weights: 1/sigma^2 after dividing by the still's scale
        sum_wv += np.bincount(flat, weights=w * value[ok], minlength=merged.size)
        sum_w += np.bincount(flat, weights=w, minlength=merged.size)
    have = (sum_w > 0) & (counts.ravel() > 0) & np.isfinite(merged.ravel())
    ref = sum_wv[have] / sum_w[have]
    cc = float(np.corrcoef(ref, merged.ravel()[have])[0, 1])
    ratio = np.asarray(recovered) / np.asarray(planted)
    ratio /= np.exp(np.mean(np.log(ratio)))  # fix the overall scale
    err = np.abs(ratio - 1.0)
    return {"map_cc_vs_truth": round(cc, 4), "scale_error_max": round(float(err.max()), 4) if err.size else None,
            "scale_error_rms": round(float(np.sqrt(np.mean(err ** 2))), 4) if err.size else None,
            "n_voxels": int(have.sum()), "n_scales_compared": int(err.size)}


def _laue_rotations(symmetry: str | None) -> np.ndarray:
    """Integer rotation matrices (acting on hkl) of the Laue group of ``symmetry`` (identity if None)."""
    if not symmetry:
        return np.eye(3, dtype=np.int64)[None]
    from cctbx import sgtbx

    laue = sgtbx.space_group_info(symmetry).group().build_derived_laue_group()
    return np.array([np.array(op.r().as_double()).reshape(3, 3).T for op in laue.all_ops()]).round().astype(np.int64)


def _canonical(idx: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """One representative per symmetry group of voxel indices (3, N): the lexicographic maximum."""
    cand = np.einsum("oij,jn->oin", ops, idx)  # (n_ops, 3, N)
    span = int(np.abs(cand).max()) + 1
    key = (cand[:, 0] * (2 * span) + cand[:, 1]) * (2 * span) + cand[:, 2]
    best = np.argmax(key, axis=0)
    return cand[best, :, np.arange(idx.shape[1])].T


# ------------------------------------------------------------------------------- stem / refine
def demo_stem(out: Path, console) -> int:
    cmd = [str(BIN / "stem-polar"), "demo", "--out", str(out)]
    console.print(" ".join(cmd))
    return subprocess.run(cmd, env=dict(os.environ)).returncode


def demo_refine(out: Path, console) -> int:
    cmd = [str(BIN / "diff-sim-refiner"), "refine-demo", "--out", str(out)]
    console.print(" ".join(cmd))
    return subprocess.run(cmd, env=dict(os.environ)).returncode
