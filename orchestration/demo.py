"""`diffractflow demo`: the platform's main jobs on embedded defaults, end to end, then everything stopped.

- ``diffuse``: render stills with the simulator's nanoBragg physics (planted diffuse halos, Bragg spots, a water
  ring and air background, background-only frames, per-still scales, gaps, Poisson noise), process them with
  ``diffractflow process diffuse`` (embedded topology, watcher, Prefect flows, services), then judge the merged
  map and the recovered scales against the truth computed in reciprocal space (``summary.json``).
- ``stem``: stem-polar on a generated 4D-STEM dataset with planted domains and fields.
- ``refine``: seed 001's refinement demo (diff-sim-refiner refine-demo).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from diff_sim_refiner.datasets.planted import planted_images, stills_spec
from diff_sim_refiner.datasets.stills import DiffuseTruth, StillsSpec, generate_stills, pixel_q
from diffractflow.artifacts import atomic_write_json

from .process import process_diffuse
from .validation import map_vs_truth, recovered_scales, sampled_reference, scale_errors

BIN = Path(sys.executable).parent


def run_demo(what: str, out: Path, console, stills: int = 20, verbose: bool = False) -> int:
    out.mkdir(parents=True, exist_ok=True)
    steps = {"diffuse": lambda: demo_diffuse(out / "diffuse", console, stills, verbose=verbose),
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
#: DIALS settings for the rendered stills: the known detector is kept fixed (one still cannot pin the distance)
DEMO_STILLS_PHIL = ["refinement.parameterisation.detector.fix=all"]


def demo_run_config(truth: dict, n_stills: int) -> dict:
    """The run configuration a user would write for the rendered crystal."""
    return {"space_group": truth["space_group"], "unit_cell": truth["unit_cell"], "d_min": 2.0,
            "symmetry": truth["space_group"], "subdivisions": 3, "expected_stills": n_stills,
            "stills_phil": list(DEMO_STILLS_PHIL)}


def evaluate_run(rdir: Path, volume: Path, truth: dict, symmetry: str | None, n_bins: int = 10) -> dict:
    """The merged map of run directory ``rdir`` against the planted diffuse truth (map/truth in ``n_bins`` bins of
    equal population of true intensity: deciles by default), and recovered against planted per-still scales
    (see :mod:`orchestration.validation`)."""
    out = rdir / "output"
    t = DiffuseTruth.load(truth)
    rec = recovered_scales(out / "scales.json")  # keyed by still id: no table needed
    planted = planted_images(truth)  # a rotation frame's A: its orientations across the oscillation
    stills = []
    for p in sorted((rdir / "stills").glob("*.json")):
        r = json.loads(p.read_text())
        name = Path(r["image"]).name
        if r["status"] == "ok" and name in planted:
            stills.append({"table": volume / r["diffuse"]["path"], "A": planted[name]["A"], "scale": rec.get(name, 1.0)})
    spec = stills_spec(truth)
    ref = sampled_reference(out / "map.h5", stills, t, pixel_q(spec)[1], symmetry)
    vs = map_vs_truth(out / "map.h5", ref, n_bins=n_bins)
    vox = map_vs_truth(out / "map.h5", t.on_voxels)
    sc = scale_errors(rec, {k: v["scale"] for k, v in planted.items()})
    return {"map_cc_vs_truth": round(vs["cc"], 4), "map_offset_fraction": round(vs["offset_fraction_of_mean"], 4),
            "map_ratio_flatness": round(vs["ratio_flatness"], 4),
            "map_ratio_by_truth_decile": [round(r, 3) for r in vs["ratio_by_truth_decile"]],
            "map_cc_vs_voxel_averaged_truth": round(vox["cc"], 4), "n_voxels_compared": vs["n_voxels"],
            "scale_error_max": None if sc["scale_error_max"] is None else round(sc["scale_error_max"], 4),
            "scale_error_rms": None if sc["scale_error_rms"] is None else round(sc["scale_error_rms"], 4),
            "n_scales_compared": sc["n_scales_compared"]}


def demo_diffuse(out: Path, console, n_stills: int = 20, run_id: str = "demo", verbose: bool = False) -> int:
    """Render stills with nanoBragg's physics (planted diffuse, Bragg, background frames, scales, noise), process
    them with ``diffractflow process diffuse`` and judge the map and scales against the truth."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_start = time.monotonic()
    console.print(f"rendering {n_stills} stills and background frames with planted diffuse signal and scales ...")
    truth = generate_stills(out / "dataset", StillsSpec(n_stills=n_stills))
    cfg = out / "run-config.json"
    cfg.write_text(json.dumps(demo_run_config(truth, n_stills)))
    summary = process_diffuse(out / "dataset", out / "result", console, config=cfg, pattern="still_*.cbf",
                              background="bkg_*.cbf", run_id=run_id, home=out / ".diffractflow", verbose=verbose)
    volume = out / ".diffractflow" / "volume"
    summary.update(evaluate_run(volume / "runs" / run_id, volume, truth, truth["space_group"]))
    summary["wall_seconds"] = round(time.monotonic() - t_start, 1)
    brief = {k: v for k, v in summary.items() if k not in ("stills", "files")}

    atomic_write_json(out / "summary.json", summary)
    console.print_json(json.dumps(brief))
    console.print(f"merged map, figures and scales: {out / 'result'}")
    good = (summary["map_cc_vs_truth"] >= 0.95 and (summary["scale_error_max"] or 1.0) <= 0.02
            and abs(summary["map_offset_fraction"]) <= 0.05)
    return 0 if good else 1


# ------------------------------------------------------------------------------- stem / refine
def demo_stem(out: Path, console) -> int:
    cmd = [str(BIN / "stem-polar"), "demo", "--out", str(out)]
    console.print(" ".join(cmd))
    rc = subprocess.run(cmd, env=dict(os.environ)).returncode
    page = out / "result" / "report.html"  # written by stem-polar itself (quality checks, figures, timings, links)
    console.print(f"report: {page}" if page.is_file() else "[yellow]no report page was written[/yellow]")
    return rc


def demo_refine(out: Path, console) -> int:
    cmd = [str(BIN / "diff-sim-refiner"), "refine-demo", "--out", str(out)]
    console.print(" ".join(cmd))
    return subprocess.run(cmd, env=dict(os.environ)).returncode
