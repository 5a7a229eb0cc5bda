"""Chaos runs of the diffuse pipeline (issue 20's figures): N runs of `diffractflow process diffuse` on rendered
stills while random topology processes are SIGKILLed every few seconds (both stills-processor replicas, the
single diffuse-extractor, voxel-merger and scaler, the nats-server, Prefect's server; ``--no-prefect`` spares it).

Reports per run the kills survived, and across runs: the time to recover after each kind of kill (kill -> the
supervisor's new process is running; kill -> the next job computed, by any service and by the killed one), jobs
lost (a job of the undisturbed run without a finished counterpart, or a still not accounted for) and duplicated
(a content-addressed job computed more than once), temporary files left, the map against the undisturbed run's,
and the cost of supervision: the supervisor's own CPU time over the undisturbed run, and the wall time of the
runs with chaos against the undisturbed one.

The chaos machinery is the test's (tests/reliability/test_chaos_diffuse.py). Writes benchmarks/results/chaos.json.
Usage:
    .venv/bin/python benchmarks/bench_chaos.py [--runs 10] [--stills 4] [--every 4 7] [--max-kills K] [--no-prefect]
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "chaos.json"


def _helpers():
    spec = importlib.util.spec_from_file_location("chaos_helpers", REPO / "tests" / "reliability" /
                                                  "test_chaos_diffuse.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stat(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median": round(statistics.median(xs), 2), "min": round(min(xs), 2),
            "max": round(max(xs), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--stills", type=int, default=4)
    ap.add_argument("--every", type=float, nargs=2, default=(4.0, 7.0), help="seconds between kills (range)")
    ap.add_argument("--max-kills", type=int, default=None, help="at most this many kills per run")
    ap.add_argument("--no-prefect", action="store_true", help="Prefect's server not among the victims")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    h = _helpers()
    import psutil

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-chaos-"))
    tmp.mkdir(parents=True, exist_ok=True)
    n_bkg = 1
    t = time.monotonic()
    truth = h.render(tmp / "data", args.stills, n_bkg, seed=31)
    render_s = time.monotonic() - t
    cfg = tmp / "config.json"
    cfg.write_text(json.dumps(h.chaos_config(truth, args.stills)))
    kinds = [k for k in h.KINDS if not (args.no_prefect and k == "prefect-server")]
    topo = h.up_for_chaos(tmp / "home", tmp / "volume")
    volume, logs = tmp / "volume", tmp / "home" / "logs"
    report: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.node(),
                    "cpus": os.cpu_count(), "stills": args.stills, "background_frames": n_bkg,
                    "kill_interval_s": list(args.every), "kinds": kinds, "render_s": round(render_s, 1),
                    "worker_settings": h.CHAOS_ENV, "backoff": vars(h.CHAOS_BACKOFF), "runs": []}
    try:
        sup = psutil.Process(topo.load()["supervisor"]["pid"])
        cpu0, load0 = sum(sup.cpu_times()[:2]), os.getloadavg()
        calm = h.process_run(topo, tmp / "data", cfg, tmp / "out-calm", "calm", n_bkg)
        cpu1 = sum(sup.cpu_times()[:2])
        if calm["returncode"] != 0:
            raise SystemExit("the undisturbed run failed:\n" + calm["stdout"][-3000:])
        calm_jobs = h.job_names(volume, "calm")
        report["calm"] = {"wall_s": round(calm["wall_s"], 1), "stills_processed": calm["summary"]["stills_processed"],
                          "jobs": sum(calm_jobs.values()), "supervisor_cpu_s": round(cpu1 - cpu0, 2),
                          "supervisor_cpu_fraction_of_wall": round((cpu1 - cpu0) / calm["wall_s"], 5),
                          "load_before": [round(x, 2) for x in load0]}
        print(f"calm run: {calm['wall_s']:.1f} s, {sum(calm_jobs.values())} jobs, supervisor "
              f"{cpu1 - cpu0:.2f} CPU-s", flush=True)
        for i in range(args.runs):
            run_id = f"chaos{i}"
            load = os.getloadavg()
            run_kinds = kinds
            chaos = h.Chaos(topo, kinds=run_kinds, seed=100 + i, every_s=tuple(args.every), max_kills=args.max_kills)
            r = h.process_run(topo, tmp / "data", cfg, tmp / f"out-{run_id}", run_id, n_bkg, chaos=chaos)
            h.wait_settled(topo)
            computed = h.computed_jobs(logs, run_id)
            jobs = h.job_names(volume, run_id)
            stills = (r["summary"] or {}).get("stills") or []
            unaccounted = args.stills - sum(1 for s in stills if s["status"] == "ok" or s.get("reason"))
            rec = {"run": run_id, "kinds": run_kinds, "returncode": r["returncode"], "wall_s": round(r["wall_s"], 1),
                   "load_before": [round(x, 2) for x in load],
                   "kills": len(r["kills"]), "kills_by_kind": dict(collections.Counter(k["kind"] for k in r["kills"])),
                   "stills_processed": (r["summary"] or {}).get("stills_processed"),
                   "stills_unaccounted": unaccounted,
                   "jobs_lost": sum((calm_jobs - jobs).values()),
                   "jobs_extra": sum((jobs - calm_jobs).values()),
                   "jobs_computed_twice": sum(len(v) - 1 for v in computed.values() if len(v) > 1),
                   "leftovers": [p for p in h.leftovers(volume)],
                   "recovery": h.recovery(topo, r["kills"], computed)}
            if r["returncode"] == 0:
                rec["map_vs_calm"] = h.compare_maps(tmp / "out-calm" / "map.h5", tmp / f"out-{run_id}" / "map.h5")
            else:
                rec["stdout_tail"] = r["stdout"][-2000:]
            report["runs"].append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "recovery"}), flush=True)
            _summarise(report)
            args.out.write_text(json.dumps(report, indent=2))
    finally:
        topo.down(log=lambda *a: None)
    _summarise(report)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    return 0


def _summarise(report: dict) -> None:
    runs = report["runs"]
    rec = [x for r in runs for x in r["recovery"]]
    by_kind = collections.defaultdict(list)
    for x in rec:
        by_kind[x["kind"]].append(x)
    maps = [r["map_vs_calm"] for r in runs if "map_vs_calm" in r]
    report["summary"] = {
        "runs": len(runs), "runs_ok": sum(r["returncode"] == 0 for r in runs),
        "kills_per_run": [r["kills"] for r in runs], "kills_total": sum(r["kills"] for r in runs),
        "kills_by_kind": dict(collections.Counter(x["kind"] for x in rec)),
        "jobs_lost_total": sum(r["jobs_lost"] for r in runs),
        "jobs_computed_twice_total": sum(r["jobs_computed_twice"] for r in runs),
        "stills_unaccounted_total": sum(r["stills_unaccounted"] for r in runs),
        "leftovers_after_last_run": len(runs[-1]["leftovers"]) if runs else None,
        "recovery_s_by_kind": {k: {"kill_to_back": _stat([x["kill_to_back_s"] for x in v]),
                                   "kill_to_next_job": _stat([x["kill_to_next_job_s"] for x in v]),
                                   "kill_to_next_job_same_service": _stat([x["kill_to_next_job_same_service_s"]
                                                                           for x in v])}
                               for k, v in sorted(by_kind.items())},
        "maps_bit_identical": sum(bool(m.get("bit_identical")) for m in maps), "maps_compared": len(maps),
        "map_cc_min": min((m["cc"] for m in maps if "cc" in m), default=None),
        "wall_s_calm": report.get("calm", {}).get("wall_s"),
        "wall_s_chaos": _stat([r["wall_s"] for r in runs]),
        "supervisor_cpu_fraction_of_wall": report.get("calm", {}).get("supervisor_cpu_fraction_of_wall"),
    }


if __name__ == "__main__":
    sys.exit(main())
