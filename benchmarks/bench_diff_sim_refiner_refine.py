"""Benchmark of diff-sim-refiner's refinement (issue 4): iterations, wall time and final errors.

1. seed 001's demo (mosaic + misset), 2. the general refiner on a planted-truth problem (all groups but cell,
in two runs), 3. per-still refinement of a real thaumatin still against DIALS' model.
Writes benchmarks/results/diff_sim_refiner_refine.json.  Usage: python benchmarks/bench_diff_sim_refiner_refine.py
[--skip-still] [--threads 1]
"""
from __future__ import annotations

import argparse
import platform
import tempfile

import torch

from diff_sim_refiner.core.config import BeamConfig, CrystalConfig, DetectorConfig
from diff_sim_refiner.core.simulator import simulate
from diff_sim_refiner.refine import Refiner, RefineSettings
from diff_sim_refiner.refine.demo import run_demo
from diff_sim_refiner.refine.stills import decompress, index_still, raw_image, refine_still, select_spots
from harness import REPO, Clock, write_results

SHARED = REPO.parent / "shared"


def bench_demo() -> dict:
    with Clock() as t:
        o = run_demo()
    r = o.result
    return dict(iterations=r.iterations, evaluations=r.evaluations, wall_s=round(t.wall_s, 2),
                loss_initial=r.loss_initial, loss_final=r.loss_final, errors=o.errors, passed=o.passed)


def bench_general() -> dict:
    crystal = CrystalConfig(cell_a=40.0, cell_b=50.0, cell_c=60.0, cell_alpha=90.0, cell_beta=100.0, cell_gamma=90.0,
                            N_cells=(6, 7, 8), default_F=50.0, misset_deg=(10.0, 20.0, 30.0), mosaic_spread_deg=0.5,
                            mosaic_domains=4, mosaic_seed=7)
    detector = DetectorConfig(fpixels=64, spixels=64, pixel_size_mm=0.2, distance_mm=80.0, beam_center_f=6.5,
                              beam_center_s=6.3)
    beam = BeamConfig(wavelength_A=1.2, fluence=1e26)
    with torch.no_grad():
        target = simulate(crystal, detector, beam, dtype=torch.float64) * 3.0
    truth = dict(scale=3.0, N_a=6, N_b=7, N_c=8, mosaic_spread=0.5, distance=80.0, beam_center_f=6.5,
                 beam_center_s=6.3, misset_x=10.0, misset_y=20.0, misset_z=30.0, cell_a=40.0, cell_b=50.0,
                 cell_c=60.0, cell_alpha=90.0, cell_beta=100.0, cell_gamma=90.0)
    runs = {
        "scale,N,mosaic,distance,beam_center": dict(scale=[1.0], N=[5, 8, 7], mosaic=[0.3], distance=[81.0],
                                                   beam_center=[6.4, 6.4]),
        "misset,cell": dict(misset=[10.3, 19.8, 30.2], cell=[40.2, 49.8, 60.2, 90.1, 99.9, 90.0]),
    }
    out = {}
    for params, init in runs.items():
        with Clock() as t:
            ref = Refiner(crystal, detector, beam, target, params, init=init, scale=1.0 if "scale" in params else 3.0)
            r = ref.run(RefineSettings(optimizer="adam+lbfgs", iterations=30, lr=0.05, lbfgs_steps=20))
        out[params] = dict(iterations=r.iterations, evaluations=r.evaluations,
                           wall_s=round(t.wall_s, 2), loss_initial=r.loss_initial,
                           loss_final=r.loss_final,
                           max_abs_error={k: abs(v - truth[k]) for k, v in r.final.items()})
    return out


def bench_still() -> dict:
    src = SHARED / "data" / "thaumatin_grid" / "thau_3_2_0001.cbf.bz2"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        with Clock() as t:
            experiments, refl = index_still(decompress(src, tmp))
        out["dials_index_refine_s"] = round(t.wall_s, 2)
        image = raw_image(experiments[0])
        spots = select_spots(refl, image, n_spots=100, half=5, pixel_size_mm=experiments[0].detector[0].get_pixel_size()[0])
        for params in (("misset", "N", "mosaic"), ("misset", "N", "mosaic", "distance", "beam_center")):
            res = refine_still(experiments[0], image, spots, params,
                               settings=RefineSettings(optimizer="lbfgs", lbfgs_steps=15))
            s = res.summary()
            out[",".join(params)] = {k: s[k] for k in ("n_spots", "n_pixels", "rmsd_dials_px",
                                                        "rmsd_simulator_initial_px", "rmsd_simulator_refined_px",
                                                        "loss_initial", "loss_final", "iterations", "evaluations",
                                                        "wall_seconds", "final")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-still", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = {"machine": platform.machine(), "torch": torch.__version__, "threads": a.threads,
           "demo_seed001": bench_demo(), "general": bench_general()}
    if not a.skip_still and SHARED.is_dir():
        res["still_thaumatin_0001"] = bench_still()
    write_results("diff_sim_refiner_refine", res, echo=True)


if __name__ == "__main__":
    main()
