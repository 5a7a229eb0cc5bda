"""Benchmark of diff-sim-refiner on seed 004's geometry (A.mat, scaled.hkl, CUSTOM vectors, 2463 x 2527 Pilatus,
N = 36/47/29), float32, on this machine.  Writes benchmarks/results/diff_sim_refiner.json.

Measures: forward render with 1 phi step x 1 mosaic domain (wall and CPU seconds); forward + backward
(gradient of an MSE loss w.r.t. phi and distance) relative to forward, at the torch thread count used and at
1 and 2 threads; the whole-process time of ``diff-sim-refiner nanobragg`` for 1 x 1 and 5 phi steps x 4 mosaic
domains (wall, CPU, the render's share, and the floor of a bare ``import torch``); peak resident memory of a
10 x 10 render (chunked); the optional spot-cutoff render's time and its error against the full render.

    .venv/bin/python benchmarks/bench_diff_sim_refiner.py [--repeats 2] [--mem-roi-fraction 0.25] \
        [--nanobragg-c path/to/nanoBragg.c] [--c-repeats 3]

With ``--nanobragg-c`` (the C source, built here with ``gcc -O3 -fopenmp``, or a built binary) the C program and
``diff-sim-refiner nanobragg`` run back to back on the same 1 x 1 and 5 x 4 cases, alternating, and the JSON
gets the medians (wall and CPU) and of the per-pair ratios; without it the C figures are the earlier reference.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from diff_sim_refiner.core import native
from diff_sim_refiner.core.compare import compare
from diff_sim_refiner.core.simulator import prepare, render, render_loss, spot_local_mask
from diff_sim_refiner.nbargs import build_job, parse_args
from diff_sim_refiner.nbrun import load_structure_factors
from harness import REPO as ROOT, Clock, best_of, load_average, result_path, write_results

DATA = ROOT.parent / "shared" / "data" / "nanobragg"
OUT = result_path("diff_sim_refiner")


THREADS = 0  # 0 = torch's default


def seed004_flags(phisteps: int = 1, domains: int = 1, roi: str | None = None) -> list[str]:
    f = (f"-mat {DATA / 'A.mat'} -hkl {DATA / 'scaled.hkl'} -nointerpolate -oversample 1 -exposure 1 -flux 1e18 "
         "-beamsize 1.0 -spindle_axis -1 0 0 -Xbeam 217.742295 -Ybeam 213.907080 -distance 231.274660 "
         "-lambda 0.976800 -pixel 0.172 -detpixels_x 2463 -detpixels_y 2527 "
         "-odet_vector -0.000088 0.004914 -0.999988 -sdet_vector -0.005998 -0.999970 -0.004913 "
         "-fdet_vector 0.999982 -0.005998 -0.000118 -pix0_vector_mm -216.336293 215.205512 -230.200866 "
         "-beam_vector 0.00051387949 0.0 -0.99999986 -Na 36 -Nb 47 -Nc 29 -phi 0").split()
    if phisteps > 1:
        f += ["-osc", str(0.1 * phisteps), "-phisteps", str(phisteps)]
    else:
        f += ["-osc", "0", "-phisteps", "1"]
    if domains > 1:
        f += ["-mosaic", "0.2", "-mosaic_domains", str(domains), "-mosaic_seed", "42"]
    if roi:
        f += ["-roi", *roi.split()]
    return f


def _job(flags):
    job = build_job(parse_args(flags))
    return job, load_structure_factors(job, write_dump=False, log=lambda m: None)


timed = best_of   # (result, best wall s, best CPU s) of repeated calls


def bench_forward(repeats: int, only_full: bool = False) -> dict:
    job, tab = _job(seed004_flags())

    def fwd(cutoff=None, native=True, mask_cutoff=None):
        with torch.no_grad():
            p = prepare(job.crystal, job.detector, job.beam, tab, spot_cutoff=cutoff)
            p.native = native
            mask = spot_local_mask(p, job.detector, mask_cutoff) if mask_cutoff else None
            return render(p, job.detector, pixel_mask=mask)

    img, w, c = timed(fwd, repeats)
    res = {"forward_1phi_1domain": {"wall_s": round(w, 3), "cpu_s": round(c, 3), "threads": torch.get_num_threads(),
                                    "sum_photons": float(img.sum()), "kernel": "native" if native.available()
                                    else f"torch ({native.status()})"}}
    if only_full:
        return res
    tor, w, c = timed(lambda: fwd(native=False), repeats)
    res["forward_1phi_1domain_torch_kernel"] = {"wall_s": round(w, 3), "cpu_s": round(c, 3),
                                                "sum_ratio_native_vs_torch": float(img.double().sum() / tor.double().sum())}
    for cutoff in (4.0, 10.0):
        sl, w2, c2 = timed(lambda: fwd(mask_cutoff=cutoff), repeats)
        kept = sl != 0
        res[f"forward_spot_local_{cutoff:g}"] = {
            "wall_s": round(w2, 3), "cpu_s": round(c2, 3), "pixels_kept_fraction": round(float(kept.double().mean()), 4),
            "photons_left_out_fraction": float(1.0 - sl.double().sum() / img.double().sum()),
            "stated_bound_total": 6.0 / (3.141592653589793 ** 2 * cutoff)}
    full = img.numpy()
    for cutoff in (4.0, 10.0):
        sp, w2, c2 = timed(lambda: fwd(cutoff), repeats)
        m = compare(sp.numpy(), full, 20)
        res[f"forward_spot_cutoff_{cutoff:g}"] = {
            "wall_s": round(w2, 3), "cpu_s": round(c2, 3), "pearson_vs_full": round(m["pearson"], 6),
            "sum_ratio_vs_full": round(m["sum_ratio"], 5), "max_peak_offset_px": round(m["max_peak_offset_px"], 4),
            "max_abs_diff_rel_to_max": m["max_abs_diff"] / float(full.max()),
            "per_term_bound_rel_to_peak": max(1.0 / (n * n * __import__("math").sin(3.141592653589793 * cutoff / n) ** 2)
                                             for n in (36, 47, 29)),
        }
    return res


def bench_backward(repeats: int) -> dict:
    job, tab = _job(seed004_flags())
    with torch.no_grad():
        target = render(prepare(job.crystal, job.detector, job.beam, tab), job.detector)

    phi = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    dist = torch.tensor(231.3, dtype=torch.float64, requires_grad=True)
    crystal = job.crystal.replace(phi_start_deg=phi)
    detector = job.detector.replace(distance_mm=dist)

    def fwd():
        with torch.no_grad():
            return render(prepare(crystal, detector, job.beam, tab), detector)

    def fwd_torch():
        with torch.no_grad():
            p = prepare(crystal, detector, job.beam, tab)
            p.native = False
            return render(p, detector)

    def fwd_bwd():
        phi.grad = dist.grad = None
        img = render(prepare(crystal, detector, job.beam, tab), detector)
        loss = ((img - target) ** 2).mean()
        loss.backward()
        return float(phi.grad), float(dist.grad)

    n_px = float(target.numel())

    def fwd_bwd_chunked():
        """The same loss and gradients through render_loss (per-chunk loss + backward, bounded memory)."""
        phi.grad = dist.grad = None
        render_loss(prepare(crystal, detector, job.beam, tab), detector,
                    lambda pred, f, s: ((pred - target[s, f]) ** 2).sum() / n_px)
        return float(phi.grad), float(dist.grad)

    def one(threads: int) -> dict:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            # interleaved (forward, forward + backward, render_loss) rounds, best of each: a load change on
            # the shared machine then hits all three alike instead of skewing the ratio
            wf = cf = wb = cb = wc = cc = wt = ct = float("inf")
            for _ in range(max(repeats, 2)):
                _, w, c = timed(fwd, 1)
                wf, cf = min(wf, w), min(cf, c)
                _, w, c = timed(fwd_torch, 1)
                wt, ct = min(wt, w), min(ct, c)
                grads, w, c = timed(fwd_bwd, 1)
                wb, cb = min(wb, w), min(cb, c)
                grads_c, w, c = timed(fwd_bwd_chunked, 1)
                wc, cc = min(wc, w), min(cc, c)
        finally:
            torch.set_num_threads(saved)
        return {"threads": threads, "forward_wall_s": round(wf, 3), "forward_cpu_s": round(cf, 3),
                "forward_torch_kernel_wall_s": round(wt, 3), "forward_torch_kernel_cpu_s": round(ct, 3),
                "ratio_vs_torch_forward_wall": round(wb / wt, 2), "ratio_vs_torch_forward_cpu": round(cb / ct, 2),
                "fwd_bwd_wall_s": round(wb, 3), "fwd_bwd_cpu_s": round(cb, 3),
                "ratio_wall": round(wb / wf, 2), "ratio_cpu": round(cb / cf, 2),
                "grad_phi": grads[0], "grad_distance": grads[1],
                "render_loss_wall_s": round(wc, 3), "render_loss_cpu_s": round(cc, 3),
                "render_loss_ratio_wall": round(wc / wf, 2), "render_loss_ratio_cpu": round(cc / cf, 2),
                "render_loss_grad_phi": grads_c[0], "render_loss_grad_distance": grads_c[1]}

    res = {"forward_backward_1phi_1domain": one(torch.get_num_threads())}
    for t in (1, 2):
        if t != torch.get_num_threads():
            res[f"forward_backward_1phi_1domain_{t}_thread{'s' if t > 1 else ''}"] = one(t)
    return res


def _run_child(cmd, **kw) -> tuple[subprocess.CompletedProcess, float, float]:
    with Clock() as c:
        r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return r, c.wall_s, c.children_cpu_s


def bench_startup_floor() -> dict:
    """What no Python CLI on torch can avoid: the interpreter plus ``import torch`` (best of 3)."""
    best_w = best_c = float("inf")
    for _ in range(3):
        _, w, c = _run_child([sys.executable, "-c", "import os, torch; os._exit(0)"])
        best_w, best_c = min(best_w, w), min(best_c, c)
    return {"python_import_torch_wall_s": round(best_w, 2), "python_import_torch_cpu_s": round(best_c, 2)}


def bench_cli(phisteps: int, domains: int, tmp: Path) -> dict:
    """Whole ``diff-sim-refiner nanobragg`` process: wall and CPU, the render's own wall time (from its log),
    and the rest (start-up incl. ``import torch``, reading inputs, writing outputs, exit)."""
    exe = Path(sys.executable).parent / "diff-sim-refiner"
    cmd = [str(exe), "nanobragg", *seed004_flags(phisteps, domains), "-threads", str(THREADS or 2),
           "-floatfile", str(tmp / "img.bin"),
           "-intfile", str(tmp / "img.smv"), "-nonoise", "-nopgm", "-noprogress"]
    r, wall, cpu = _run_child(cmd, cwd=tmp)
    if r.returncode != 0:
        raise RuntimeError(r.stderr or r.stdout)
    m = re.search(r"render ([0-9.]+) s(?: \(([0-9.]+) s CPU\))?", r.stdout)
    render = float(m.group(1)) if m else None
    render_cpu = float(m.group(2)) if m and m.group(2) else None
    return {"process_wall_s": round(wall, 2), "process_cpu_s": round(cpu, 2), "render_wall_s": render,
            "render_cpu_s": render_cpu,
            "startup_io_exit_wall_s": round(wall - render, 2) if render is not None else None,
            "startup_io_exit_cpu_s": round(cpu - render_cpu, 2) if render_cpu is not None else None}


def c_flags(flags: list[str]) -> list[str]:
    """Our flags as the C program reads them: its -pix0_vector is in metres (it has no -pix0_vector_mm)."""
    out, i = [], 0
    while i < len(flags):
        if flags[i] == "-pix0_vector_mm":
            out += ["-pix0_vector", *(repr(float(x) / 1000.0) for x in flags[i + 1:i + 4])]
            i += 4
        else:
            out.append(flags[i])
            i += 1
    return out


def build_nanobragg_c(source: Path, tmp: Path) -> Path:
    """Compile nanoBragg.c as its header says (gcc -O3 -fopenmp -lm)."""
    exe = tmp / "nanoBragg"
    subprocess.run(["gcc", "-O3", "-o", str(exe), str(source), "-lm", "-fopenmp"], check=True, capture_output=True)
    return exe


def bench_c_side_by_side(exe: Path, phisteps: int, domains: int, repeats: int, tmp: Path) -> dict:
    """nanoBragg C and ``diff-sim-refiner nanobragg`` on the same case, run back to back ``repeats`` times (C then
    ours, alternating, so a load change hits both); medians of wall and CPU seconds and of the per-pair ratios,
    plus the agreement of the two float images."""
    threads = THREADS or 2
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd_c = [str(exe), *c_flags(seed004_flags(phisteps, domains)), "-floatfile", str(tmp / "c.bin"),
             "-intfile", str(tmp / "c.img"), "-nonoise", "-nopgm", "-noprogress"]
    rows = []
    for _ in range(repeats):
        r, wc, cc = _run_child(cmd_c, cwd=tmp, env=env)
        if r.returncode != 0:
            raise RuntimeError(r.stderr or r.stdout)
        ours = bench_cli(phisteps, domains, tmp)
        rows.append({"c_wall_s": round(wc, 2), "c_cpu_s": round(cc, 2), **ours,
                     "ratio_wall": round(ours["process_wall_s"] / wc, 3),
                     "ratio_cpu": round(ours["process_cpu_s"] / cc, 3), "loadavg": load_average()[0]})
    med = lambda k: float(np.median([row[k] for row in rows if row[k] is not None]))  # noqa: E731
    a = np.fromfile(tmp / "img.bin", dtype=np.float32).astype(np.float64)
    b = np.fromfile(tmp / "c.bin", dtype=np.float32).astype(np.float64)
    return {"threads": threads, "runs": rows, "median_c_wall_s": med("c_wall_s"), "median_c_cpu_s": med("c_cpu_s"),
            "median_ours_wall_s": med("process_wall_s"), "median_ours_cpu_s": med("process_cpu_s"),
            "median_ratio_wall": med("ratio_wall"), "median_ratio_cpu": med("ratio_cpu"),
            "images_sum_ratio": float(a.sum() / b.sum()), "images_pearson": float(np.corrcoef(a, b)[0, 1]),
            "images_max_abs_diff_rel_to_max": float(np.abs(a - b).max() / b.max())}


def bench_memory(fraction: float) -> dict:
    """Peak RSS of a 10 phi x 10 domain forward render in a fresh process (chunked).

    Read from the child's own VmHWM: ``ru_maxrss`` would report the benchmark parent's peak, because Linux
    carries the pre-exec high-water mark of a spawned child (the parent's pages) into it."""
    fp, sp = int(2463 * fraction ** 0.5), int(2527 * fraction ** 0.5)
    f0, s0 = (2463 - fp) // 2, (2527 - sp) // 2
    roi = f"{f0} {f0 + fp - 1} {s0} {s0 + sp - 1}"
    code = (
        "import sys,time,resource;sys.path.insert(0,%r);from diff_sim_refiner.nbrun import tune_malloc;tune_malloc();"
        "import torch;torch.set_num_threads(%d);import bench_diff_sim_refiner as b;"
        "from diff_sim_refiner.core.simulator import prepare,render;"
        "job,tab=b._job(b.seed004_flags(10,10,%r));t=time.perf_counter();c=time.process_time()\n"
        "with torch.no_grad(): img=render(prepare(job.crystal,job.detector,job.beam,tab),job.detector)\n"
        "hwm=[l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "print(time.perf_counter()-t,time.process_time()-c,hwm)"
    ) % (str(Path(__file__).parent), THREADS or 2, roi)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    wall, cpu, rss_kb = r.stdout.split()[-3:]
    return {"memory_10phi_10domain": {"peak_rss_gb": round(int(rss_kb) / 1024 ** 2, 3), "roi": roi,
                                      "pixels": fp * sp, "wall_s": round(float(wall), 1), "cpu_s": round(float(cpu), 1),
                                      "note": "memory is bounded by the chunk size (2^19 terms), not the pixel count"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mem-roi-fraction", type=float, default=0.25,
                    help="fraction of the detector rendered for the 10x10 memory figure (1 = full detector)")
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--nanobragg-c", type=Path, default=None,
                    help="nanoBragg.c source (built with gcc -O3 -fopenmp) or an already built binary: runs the C "
                         "program and ours back to back on the 1 x 1 and 5 x 4 cases")
    ap.add_argument("--c-repeats", type=int, default=3)
    ap.add_argument("--only-c", action="store_true", help="only the side-by-side C comparison")
    ap.add_argument("--out", type=Path, default=OUT, help=f"JSON file to write (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (this 2-core machine is shared: 1 is "
                    "faster under load; the 1 x 1 forward is also timed with torch's default)")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    if not (DATA / "A.mat").is_file():
        sys.exit(f"seed 004 data not found in {DATA}")
    res: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                             "loadavg_at_start": load_average()},
                 "reference_nanoBragg_C_2_threads": {"forward_1phi_1domain_wall_s": 0.5, "forward_5phi_4domain_wall_s": 9.0}}
    if args.nanobragg_c is not None:
        with tempfile.TemporaryDirectory() as td:
            exe = args.nanobragg_c
            if exe.suffix == ".c":
                exe = build_nanobragg_c(exe, Path(td))
            for ph, dom in ((1, 1), (5, 4)):
                res[f"side_by_side_nanoBragg_C_{ph}phi_{dom}domain"] = bench_c_side_by_side(exe, ph, dom,
                                                                                          args.c_repeats, Path(td))
                print(json.dumps(res[f"side_by_side_nanoBragg_C_{ph}phi_{dom}domain"], indent=1), flush=True)
        if args.only_c:
            write_results(args.out, res)
            return
    default_threads = torch.get_num_threads()
    fwd_default = bench_forward(args.repeats, only_full=True)["forward_1phi_1domain"]
    torch.set_num_threads(args.threads)
    res["machine"]["threads"] = args.threads
    res.update(bench_forward(args.repeats))
    res["forward_1phi_1domain_default_threads"] = {**fwd_default, "threads": default_threads}
    res.update(bench_backward(args.repeats))
    if not args.skip_cli:
        res["startup_floor"] = bench_startup_floor()
        with tempfile.TemporaryDirectory() as td:
            res["cli_nanobragg_1phi_1domain"] = bench_cli(1, 1, Path(td))
            res["cli_nanobragg_5phi_4domain"] = bench_cli(5, 4, Path(td))
    res.update(bench_memory(args.mem_roi_fraction))
    res["machine"]["loadavg_at_end"] = load_average()
    write_results(args.out, res, echo=True)


if __name__ == "__main__":
    main()
