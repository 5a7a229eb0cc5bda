"""A whole diffuse run through `diffractflow process diffuse`, against the DIALS steps alone and against truth.

Cases (each optional):

- ``thaumatin``: the 19 real thaumatin stills (15 crystals, 4 blanks) of ../shared/data. Times
  ``stills-processor run IMAGES --nproc 2`` (the DIALS steps alone: import, spots, index, refine, integrate,
  on the same stills and cores) and ``diffractflow process diffuse`` (everything: the embedded topology's start,
  DIALS, extraction, accumulation, scaling, merging), and reports their ratio (target ≤ 1.25; again with the
  topology already up, `diffractflow up` first, as at a beamline that keeps the platform running), the map's CC½ per
  resolution shell and the agreement of symmetry-equivalent voxels before merging.
- ``synthetic``: stills rendered with the simulator's own physics (``diff_sim_refiner.datasets.stills``: sharp
  Bragg, diffuse halos, water ring and air background, per-still scales, gaps, Poisson noise) plus background-only
  frames, processed at a dose of a few photons per pixel and at 16× less: map vs the planted truth (CC, offset,
  flatness per truth decile) and the ratio of the two maps (flat in intensity and resolution within 2 %).

Writes benchmarks/results/process_diffuse.json. Usage:
    .venv/bin/python benchmarks/bench_process_diffuse.py [--case thaumatin|synthetic|all] [--n-stills 20] [--rounds 3]
"""
from __future__ import annotations

import argparse
import bz2
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, Clock, load_average, machine, read_results, result_path, write_results

sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "thaumatin_grid"
BIN = Path(sys.executable).parent
RESULTS = result_path("process_diffuse")
PROCESS_SERVICES = ("stills-processor", "diffuse-extractor", "voxel-merger", "scaler")  # `process diffuse`'s
THAU_CONFIG = {"space_group": "P 41 21 2", "unit_cell": [57.8, 57.8, 150.3, 90, 90, 90], "d_min": 3.0,
               "symmetry": "P 41 21 2", "stills_nproc": 1}


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return env


def _timed(cmd: list[str], log: Path) -> float:
    with Clock() as t, open(log, "wb") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env()).returncode
    if rc:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (exit {rc}); log: {log}")
    return t.wall_s


def bench_thaumatin(work: Path, rounds: int = 1) -> dict:
    stills = work / "thau"
    stills.mkdir()
    for src in sorted(DATA.glob("thau_3_2_*.cbf.bz2")):
        (stills / src.name[:-4]).write_bytes(bz2.decompress(src.read_bytes()))
    n = len(list(stills.glob("*.cbf")))
    cfg = work / "thau.json"
    cfg.write_text(json.dumps(THAU_CONFIG))
    def dials_only(tag: str) -> float:
        return _timed([str(BIN / "stills-processor"), "run", *map(str, sorted(stills.glob("*.cbf"))),
                       "--out", str(work / f"dials-only{tag}"), "--nproc", "2", "--space-group", "P41212",
                       "--unit-cell", "57.8,57.8,150.3,90,90,90"], work / f"dials-only{tag}.log")

    dials_s = dials_only("")
    out = work / "process"
    process_s = _timed([str(BIN / "diffractflow"), "process", "diffuse", str(stills), "--config", str(cfg),
                        "--out", str(out), "--run-id", "thau"], work / "process.log")
    summary = json.loads((out / "summary.json").read_text())
    # as at a beamline where `diffractflow up` runs all day: the same command with the topology already up
    home = work / "topology"
    _timed([str(BIN / "diffractflow"), "up", "--home", str(home), *[a for s in PROCESS_SERVICES for a in ("-s", s)],
            "-r", "stills-processor=2"], work / "up.log")
    # rounds > 1: the DIALS steps alone and the warm process alternately, so both see the same machine (their
    # times move by 10-15 % between runs here); medians and each round's ratio are reported
    warm, alone = [], [dials_s]
    try:
        for i in range(rounds):
            if i:
                alone.append(dials_only(f"-{i}"))
            warm.append(_timed([str(BIN / "diffractflow"), "process", "diffuse", str(stills), "--config", str(cfg),
                                "--out", str(work / f"process-warm{i}"), "--run-id", f"thau-warm{i}", "--home",
                                str(home)], work / f"process-warm{i}.log"))
    finally:
        subprocess.run([str(BIN / "diffractflow"), "down", "--home", str(home)], env=_env(), capture_output=True)
    warm_s, dials_med = float(statistics.median(warm)), float(statistics.median(alone))
    stats = json.loads((out / "stats.json").read_text()) if (out / "stats.json").exists() else {}
    return {"n_stills": n, "dials_steps_seconds": round(dials_s, 1), "process_seconds": round(process_s, 1),
            "ratio": round(process_s / dials_s, 3), "target_ratio": 1.25,
            "process_seconds_topology_up": round(warm_s, 1), "ratio_topology_up": round(warm_s / dials_med, 3),
            "rounds_topology_up": rounds, "dials_steps_seconds_rounds": [round(x, 1) for x in alone],
            "process_seconds_topology_up_rounds": [round(x, 1) for x in warm],
            "ratio_topology_up_per_round": [round(w / a, 3) for w, a in zip(warm, alone)],
            "stills_processed": summary["stills_processed"], "stills_failed": summary["stills_failed"],
            "cc_half_overall": summary["cc_half_overall"], "cc_half": stats.get("cc_half"),
            "symmetry_agreement": summary.get("symmetry_agreement") or stats.get("symmetry_agreement"),
            "background": summary["background"], "stage_seconds": summary["stage_seconds"]}


def bench_synthetic(work: Path, n_stills: int) -> dict:
    """The same rendered stills at dose 1 and 1/16 through `process diffuse`, each judged against the truth, and
    the two maps against each other."""
    # the synthetic case's own imports (the simulator's torch, Prefect through orchestration.demo): not for thaumatin
    from diff_sim_refiner.datasets.stills import DiffuseTruth, StillsSpec, dose_pair

    from orchestration.demo import demo_run_config, evaluate_run
    from orchestration.validation import map_ratio_flatness

    high, low = dose_pair(work / "data", StillsSpec(n_stills=n_stills))
    res, maps = {}, {}
    for label, truth in (("dose1", high), ("dose1_16", low)):
        d = work / label
        d.mkdir()
        cfg = d / "config.json"
        cfg.write_text(json.dumps(demo_run_config(truth, n_stills)))
        data = Path(truth["out_dir"])
        t = _timed([str(BIN / "diffractflow"), "process", "diffuse", str(data), "--config", str(cfg),
                    "--out", str(d / "out"), "--pattern", "still_*.cbf", "--background", "bkg_*.cbf",
                    "--run-id", label], d / "process.log")
        summary = json.loads((d / "out" / "summary.json").read_text())
        vol = d / "out" / ".diffractflow" / "volume"
        maps[label] = d / "out" / "map.h5"
        res[label] = {"seconds": round(t, 1), "stills_processed": summary["stills_processed"],
                      "stills_total": summary["stills_total"], "cc_half_overall": summary["cc_half_overall"],
                      "vs_truth": evaluate_run(vol / "runs" / label, vol, truth, truth["space_group"])}
    res["dose_invariance"] = map_ratio_flatness(maps["dose1"], maps["dose1_16"], high["unit_cell"],
                                                truth=DiffuseTruth.load(high).on_voxels)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="all", choices=["thaumatin", "synthetic", "all"])
    ap.add_argument("--n-stills", type=int, default=20, help="stills per synthetic run")
    ap.add_argument("--rounds", type=int, default=1, help="thaumatin: rounds of the DIALS steps alone and the warm "
                    "process, alternately (medians)")
    args = ap.parse_args()
    out = read_results(RESULTS, {})
    out["machine"] = {"cpus": os.cpu_count(), "platform": machine()["platform"], "load_avg": load_average()}
    with tempfile.TemporaryDirectory(prefix="bench-process-") as tmp:
        work = Path(tmp)
        if args.case in ("thaumatin", "all"):
            out["thaumatin"] = bench_thaumatin(work, args.rounds)
            print(json.dumps(out["thaumatin"], indent=1))
        if args.case in ("synthetic", "all"):
            out["synthetic"] = bench_synthetic(work, args.n_stills)
            print(json.dumps(out["synthetic"], indent=1))
    out["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"written {write_results(RESULTS, out, indent=1)}")


if __name__ == "__main__":
    main()
