"""Throughput of stem-polar on raw uint16 4D-STEM patterns read from an HDF5 file in the page cache.

Measures (GB/s of raw pattern bytes, each figure the best of --repeat runs, with the CPU seconds of that run):
  read_sum     numpy sum over the same data, chunk by chunk (single-pass read bandwidth baseline)
  gated_com    one pass: read + float32 + union-gated CoM (the service's CPU engine, --threads workers)
  full         the whole seed pipeline (centre sample + stats pass + matched-filter/CoM pass), GB/s counted
               over the dataset size once (it reads the data twice)
  libertem_com LiberTEM's CoMUDF on the same file, 2 dask workers (optional, --libertem: builds a numpy-2 venv
               in --workdir, reused on later runs); CPU seconds summed over its process tree
  side_by_side with --libertem: the full pipeline and LiberTEM's CoMUDF alternately (a warm LiberTEM server
               process), --rounds rounds, medians of wall and CPU seconds, the load average of every round: the
               fair comparison on a shared machine (both see the same load)
The engine uses the native C kernels for uint16 frames when they build, else numba (``--kernels numba`` and
``--kernels numpy`` force the slower ones, stored under "_numba_kernels" / "_numpy_kernels" keys);
``kernels_first_call`` records what a fresh process pays once (build or compile with empty caches, load from
warm ones); the timed runs start with the kernels loaded.
Peak RSS of this process and the 1-minute load average (start and end) are recorded: figures taken while
other jobs use the cores are inflated; CPU seconds are less sensitive to that than wall seconds.
Results go to benchmarks/results/stem_polar.json (one entry per scan x detector size).

    .venv/bin/python benchmarks/bench_stem_polar.py                       # 128 x 128 scan, ~1 min
    .venv/bin/python benchmarks/bench_stem_polar.py --libertem --scan 256 # the issue's 256 x 256 case
    .venv/bin/python benchmarks/bench_stem_polar.py --scan 256 --dense    # no count below 32 (worst case)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from harness import REPO as ROOT, Clock, PeakRSS, load_average, machine, read_results, result_path, utc_now, \
    write_results
DENSE_OFFSET = 100


def make_file(path: Path, h: int, w: int, k: int, seed: int = 0, offset: int = 0) -> None:
    """Synthetic uint16 scan: shifted BF disk + 4 clusters of Bragg-spot patterns + Poisson-like noise, plus
    ``offset`` counts on every pixel (``--dense``: no pixel below 32, the native log's slow path everywhere)."""
    import h5py

    if path.exists():
        return
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:k, 0:k].astype(np.float32)
    c = (k - 1) / 2
    r0 = k / 8
    tmp = path.with_suffix(".part")
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("patterns", shape=(h, w, k, k), dtype=np.uint16)
        for row in range(h):
            sx = 1.5 * np.sin(2 * np.pi * (np.arange(w) / w + row / h)).astype(np.float32)
            sy = 1.5 * np.cos(2 * np.pi * np.arange(w) / w).astype(np.float32)
            rr = np.sqrt((yy[None] - c - sy[:, None, None]) ** 2 + (xx[None] - c - sx[:, None, None]) ** 2)
            img = 200 * np.clip(r0 - rr + 0.5, 0, 1)
            dom = (np.arange(w) * 4 // w + row * 4 // h) % 4
            g = k / 4
            for d in range(4):
                a = np.pi * d / 4
                gy, gx = g * np.sin(a), g * np.cos(a)
                spot = np.exp(-((yy - c - gy) ** 2 + (xx - c - gx) ** 2) / 4)
                img += 80 * (dom == d)[:, None, None] * spot[None]
            img += rng.integers(0, 4, img.shape) + offset
            ds[row] = img.astype(np.uint16)
        f.create_dataset("labels", data=((np.arange(w)[None] * 4 // w + np.arange(h)[:, None] * 4 // h) % 4))
    os.replace(tmp, path)


def best_of(fn, repeat):
    """(best wall s, all wall s, CPU s of the best run, all CPU s) over ``repeat`` runs."""
    ts, cs = [], []
    for _ in range(repeat):
        with Clock() as c:
            fn()
        ts.append(c.wall_s)
        cs.append(c.cpu_s)
    i = int(np.argmin(ts))
    return ts[i], ts, cs[i], cs


def entry(t, ts, c, cs, gb, **kw):
    return {"seconds": t, "gb_per_s": gb / t, "all_s": ts, "cpu_s": c, "all_cpu_s": cs,
            "cpu_s_per_gb": c / gb, **kw}


def bench(args) -> dict:
    sys.path.insert(0, str(ROOT / "services"))
    from stem_polar.artifacts import H5Source
    from stem_polar.core.config import PolarConfig
    from stem_polar.core.pipeline import run_pipeline, stream_gated_com
    from stem_polar.core.source import auto_chunk, iter_chunks

    h = w = args.scan
    k = args.det
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    offset = DENSE_OFFSET if args.dense else 0
    path = work / (f"patterns_{h}x{w}x{k}x{k}_u16.h5" if not offset else f"patterns_{h}x{w}x{k}x{k}_u16_plus{offset}.h5")
    t0 = time.perf_counter()
    make_file(path, h, w, k, offset=offset)
    gen_s = time.perf_counter() - t0
    nbytes = h * w * k * k * 2
    gb = nbytes / 1e9
    chunk = args.chunks or auto_chunk((k, k))
    src = H5Source(path, "patterns")
    import h5py

    with h5py.File(path, "r") as f:
        labels = f["labels"][...].ravel()

    def read_sum():
        tot = 0
        for _, _, b in iter_chunks(src, chunk, buffers=2):
            tot += int(b.sum(dtype=np.uint64))
        return tot

    def read_only():
        for _ in iter_chunks(src, chunk, buffers=2):
            pass

    read_sum()  # warm the page cache
    from stem_polar.core.engine import default_threads

    threads = args.threads or default_threads()
    out: dict = {"scan": [h, w], "detector": [k, k], "dtype": "uint16", "count_offset": offset,
                 "data_gb": gb, "chunk_frames": chunk,
                 "threads": threads, "file_generation_s": gen_s, "cpu_count": os.cpu_count(),
                 "python": machine()["python"], "numpy": np.__version__,
                 "note": "figures are best-of runs; wall seconds are inflated when other jobs share the cores",
                 "load_average_1min_at_start": load_average()[0],
                 "date_utc": utc_now()}
    out["read_only"] = entry(*best_of(read_only, args.repeat), gb, what="HDF5 read_direct into buffers")
    out["read_sum"] = entry(*best_of(read_sum, args.repeat), gb, what="read + numpy sum (baseline)")

    yy, xx = np.mgrid[0:k, 0:k]
    gate = ((np.hypot(yy - (k - 1) / 2, xx - (k - 1) / 2) < k / 4)).astype(np.float64)

    def gated():
        stream_gated_com(src, gate, (k - 1) / 2, (k - 1) / 2, chunk=chunk, threads=threads)

    out["gated_com"] = entry(*best_of(gated, args.repeat), gb)
    out["gated_com"]["fraction_of_read_sum_bandwidth"] = out["read_sum"]["seconds"] / out["gated_com"]["seconds"]

    from stem_polar.core import engine as eng_mod
    from stem_polar.core import kernels

    out["kernels"] = kernels.backend(np.uint16) if eng_mod.use_kernels(np.uint16) else "numpy"
    if out["kernels"] != "numpy":
        out["kernels_first_call"] = kernel_compile_times()
        kernels.warmup(np.uint16)  # compiled (or loaded) before timing, as a long-running worker would have it

    cfg = PolarConfig.model_validate({"dpc": {"gate_mode": "adaptive", "baseline": "median"}})
    res_holder = {}

    def full():
        res_holder["r"] = run_pipeline(src, labels, cfg, chunk=chunk, threads=threads)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with PeakRSS(interval=0.02) as mem:
            best = best_of(full, args.repeat)
    r = res_holder["r"]
    if args.libertem and args.rounds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["side_by_side"] = side_by_side(path, work, full, args.rounds, gb)
    out["full_pipeline"] = entry(*best, gb, passes_over_data=2, timings=r.timings, peak_rss_gb=mem.peak / 1e9,
                                 argmax_agreement_with_labels=r.report["clusters"]["argmax_agreement_with_labels"])
    src.close()
    if args.libertem:
        out["libertem_com"] = libertem_bench(path, work, args.repeat, gb)
    out["load_average_1min_at_end"] = load_average()[0]
    return out


def kernel_compile_times() -> dict:
    """Seconds a fresh process spends on its first kernel call: compiling (empty numba cache) and loading
    the compiled code from a warm cache (what a user sees once per process)."""
    import tempfile

    code = ("import time, numpy as np; t0 = time.perf_counter(); from stem_polar.core import kernels; "
            "t1 = time.perf_counter(); kernels.warmup(np.uint16); print(time.perf_counter() - t1)")
    res = {}
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d, STEM_POLAR_NATIVE_CACHE=d)
        for what in ("compile_s", "cached_load_s"):
            p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
            res[what] = float(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
    res["what"] = ("first call of the uint16 kernels in a new process (numba compile or native build with empty "
                   "caches; then the load from warm caches, once per process)")
    return res


LT_SCRIPT = r"""
import json, sys, time
import psutil
import libertem.api as lt
from libertem.udf.com import CoMUDF


def cpu_tree():  # CPU seconds of this process and its dask workers
    tot = 0.0
    me = psutil.Process()
    for q in [me] + me.children(recursive=True):
        try:
            t = q.cpu_times()
            tot += t.user + t.system
        except psutil.Error:
            pass
    return tot


path, repeat = sys.argv[1], int(sys.argv[2])
with lt.Context.make_with("dask", cpus=2, gpus=0) as ctx:
    ds = ctx.load("hdf5", path=path, ds_path="patterns")
    udf = CoMUDF.with_params(cy=ds.shape.sig[0] / 2, cx=ds.shape.sig[1] / 2, r=ds.shape.sig[0] / 4)
    ctx.run_udf(dataset=ds, udf=udf)
    ts, cs = [], []
    for _ in range(repeat):
        c0, t0 = cpu_tree(), time.perf_counter()
        ctx.run_udf(dataset=ds, udf=udf)
        ts.append(time.perf_counter() - t0)
        cs.append(cpu_tree() - c0)
import libertem
i = min(range(len(ts)), key=ts.__getitem__)
print(json.dumps({"seconds": ts[i], "all_s": ts, "cpu_s": cs[i], "all_cpu_s": cs, "libertem": libertem.__version__}))
"""


LT_SERVER = r"""
import json, sys, time
import psutil
import libertem, libertem.api as lt
from libertem.udf.com import CoMUDF


def cpu_tree():
    tot = 0.0
    me = psutil.Process()
    for q in [me] + me.children(recursive=True):
        try:
            t = q.cpu_times()
            tot += t.user + t.system
        except psutil.Error:
            pass
    return tot


with lt.Context.make_with("dask", cpus=2, gpus=0) as ctx:
    ds = ctx.load("hdf5", path=sys.argv[1], ds_path="patterns")
    udf = CoMUDF.with_params(cy=ds.shape.sig[0] / 2, cx=ds.shape.sig[1] / 2, r=ds.shape.sig[0] / 4)
    ctx.run_udf(dataset=ds, udf=udf)
    print(json.dumps({"ready": libertem.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        c0, t0 = cpu_tree(), time.perf_counter()
        ctx.run_udf(dataset=ds, udf=udf)
        print(json.dumps({"s": time.perf_counter() - t0, "cpu": cpu_tree() - c0}), flush=True)
"""


def libertem_python(work) -> Path:
    """The numpy-2 venv with LiberTEM (built in ``work`` on first use)."""
    venv = work / "libertem-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        subprocess.run([str(py), "-m", "ensurepip"], check=True, capture_output=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "libertem", "numpy>=2"], check=True)
    return py


def side_by_side(path, work, ours, rounds: int, gb) -> dict:
    """Ours and LiberTEM's CoMUDF alternately, one run each per round (LiberTEM kept warm in a server process), so
    both see the same load; medians over the rounds and the 1-minute load average of every round."""
    try:
        py = libertem_python(work)
        srv = subprocess.Popen([str(py), "-c", LT_SERVER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    except Exception as exc:  # the comparison is optional: record why it is missing
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    try:
        version = json.loads(srv.stdout.readline())["ready"]
        o_s, o_c, l_s, l_c, load = [], [], [], [], []
        for _ in range(rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            ours()
            o_s.append(time.perf_counter() - t0)
            o_c.append(time.process_time() - c0)
            srv.stdin.write("run\n")
            srv.stdin.flush()
            r = json.loads(srv.stdout.readline())
            l_s.append(r["s"])
            l_c.append(r["cpu"])
            load.append(os.getloadavg()[0])
        srv.stdin.write("quit\n")
        srv.stdin.flush()
        srv.wait(timeout=120)
    except Exception as exc:
        srv.kill()
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    med = {k: float(np.median(v)) for k, v in (("ours_s", o_s), ("ours_cpu_s", o_c), ("libertem_s", l_s),
                                                ("libertem_cpu_s", l_c))}
    return {"what": "full seed pipeline (ours) vs LiberTEM CoMUDF, alternating, one run each per round",
            "libertem": version, "rounds": rounds, "ours_all_s": o_s, "ours_all_cpu_s": o_c, "libertem_all_s": l_s,
            "libertem_all_cpu_s": l_c, "load_average_1min": load, "median": med,
            "ours_gb_per_s_median": gb / med["ours_s"],
            "speedup_wall_median": med["libertem_s"] / med["ours_s"],
            "speedup_cpu_median": med["libertem_cpu_s"] / med["ours_cpu_s"],
            "speedup_wall_per_round": [b / a for a, b in zip(o_s, l_s)]}


def libertem_bench(path, work, repeat, gb) -> dict:
    try:
        py = libertem_python(work)
        p = subprocess.run([str(py), "-c", LT_SCRIPT, str(path), str(repeat)], check=True, capture_output=True,
                           text=True, timeout=3600)
        res = json.loads(p.stdout.strip().splitlines()[-1])
        res["gb_per_s"] = gb / res["seconds"]
        res["cpu_s_per_gb"] = res["cpu_s"] / gb
        return res
    except Exception as exc:  # the comparison is optional: record why it is missing
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=int, default=128, help="scan H = W")
    ap.add_argument("--det", type=int, default=128, help="detector ky = kx")
    ap.add_argument("--chunks", type=int, default=None, help="frames per chunk")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="worker threads of the CPU engine (default: all CPUs)")
    ap.add_argument("--workdir", default="/tmp/stem_polar_bench", help="where the HDF5 file is made (not the repo)")
    ap.add_argument("--libertem", action="store_true", help="also run LiberTEM CoMUDF (builds a numpy-2 venv)")
    ap.add_argument("--rounds", type=int, default=7,
                    help="with --libertem: rounds of the side-by-side comparison (ours, then LiberTEM, per round; "
                         "medians reported; 0 skips it)")
    ap.add_argument("--out", default=str(result_path("stem_polar")))
    ap.add_argument("--dense", action="store_true",
                    help=f"add {DENSE_OFFSET} counts to every pixel: the worst case of the native kernels, whose log "
                         "takes a register table for vectors of counts below 32 (the dark field of counting "
                         "detectors) and a polynomial otherwise")
    ap.add_argument("--kernels", choices=["auto", "native", "numba", "numpy"], default="auto",
                    help="kernels of the CPU engine: auto (native C for uint16 when it builds, else numba), or one "
                         "forced for comparison (numba: without the native library; numpy: without compiled code)")
    args = ap.parse_args()
    if args.kernels in ("numba", "numpy"):
        os.environ["STEM_POLAR_KERNELS"] = args.kernels
    res = bench(args)
    if "libertem_com" in res and "gb_per_s" in res["libertem_com"]:
        lt_gbs = res["libertem_com"]["gb_per_s"]
        lt_cpu = res["libertem_com"]["cpu_s"]
        res["ratios"] = {"gated_com_over_libertem_com": res["gated_com"]["gb_per_s"] / lt_gbs,
                         "full_pipeline_over_libertem_com": res["full_pipeline"]["gb_per_s"] / lt_gbs,
                         "cpu_libertem_com_over_gated_com": lt_cpu / res["gated_com"]["cpu_s"],
                         "cpu_libertem_com_over_full_pipeline": lt_cpu / res["full_pipeline"]["cpu_s"],
                         "what": "> 1 means stem-polar is faster (wall: GB/s ratio; cpu: CPU-seconds ratio)"}
    res["ratios_to_read_sum"] = {"gated_com": res["gated_com"]["gb_per_s"] / res["read_sum"]["gb_per_s"],
                                 "full_pipeline": res["full_pipeline"]["gb_per_s"] / res["read_sum"]["gb_per_s"]}
    out = Path(args.out)
    prev = read_results(out, {})
    key = f"{args.scan}x{args.scan}x{args.det}x{args.det}" + ("_dense" if args.dense else "") + (
        f"_{args.kernels}_kernels" if args.kernels in ("numba", "numpy") else "")
    prev[key] = res
    write_results(out, prev)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
