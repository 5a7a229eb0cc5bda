"""Files in, artifacts out: the glue shared by the CLI ``run`` and the bus worker."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from diffractflow.artifacts import sha256_file

from . import __version__, diagnostics
from . import artifacts as art
from .core import background as bg
from .core import kernels, mask_kernels, runstats
from .core.extract import GeometryCache, _layout_key, extract_still, static_flags
from .core.masks import MaskBit, RunPixelStatistics, untrusted_and_overload
from .core.params import BackgroundJob, ExtractionParams, ExtractJob, extraction_params

log = logging.getLogger("diffuse_extractor")

#: auto-detected beamstops per run (run key -> GeometryCache.beamstop dict), so that the jobs of one run
#: that a worker handles (one still per job on the bus) search for the shadow once, as a multi-still job does
_RUN_BEAMSTOPS: "OrderedDict[str, dict]" = OrderedDict()
RUN_BEAMSTOP_ENTRIES = 8
_RUN_LOCK = threading.Lock()


def _run_beamstop_store(run_key: str | None) -> dict:
    if not run_key:
        return {}
    with _RUN_LOCK:
        store = _RUN_BEAMSTOPS.pop(run_key, None)
        if store is None:
            store = {}
        _RUN_BEAMSTOPS[run_key] = store
        while len(_RUN_BEAMSTOPS) > RUN_BEAMSTOP_ENTRIES:
            _RUN_BEAMSTOPS.popitem(last=False)
        return store


BEAMSTOP_RECORD_SCHEMA = "diffractflow.diffuse_beamstop_record"


def read_beamstop_record(path: str | Path) -> dict:
    """A run's beamstop record (:func:`run_beamstop_record`) as the extractor's beamstop store: detector layout
    key -> (per-panel BEAMSTOP flags, info)."""
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("schema") != BEAMSTOP_RECORD_SCHEMA:
                raise art.InputError(f"{path} is not a beamstop record (schema {meta.get('schema')!r})")
            return {e["key"]: ([np.ascontiguousarray(z[f"flags_{j}_{i}"]) for i in range(e["n_panels"])], e["info"])
                    for j, e in enumerate(meta["entries"])}
    except (OSError, KeyError, ValueError) as exc:
        raise art.InputError(f"cannot read the beamstop record {path}: {exc}") from exc


def _write_beamstop_record(path: Path, store: dict) -> None:
    entries, arrays = [], {}
    for j, (key, (flags, info)) in enumerate(sorted(store.items())):
        entries.append({"key": key, "n_panels": len(flags), "info": info})
        arrays.update({f"flags_{j}_{i}": np.asarray(f, np.uint8) for i, f in enumerate(flags)})
    meta = json.dumps({"schema": BEAMSTOP_RECORD_SCHEMA, "entries": entries}, default=str)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, meta=np.asarray(meta), **arrays)
    os.replace(tmp, path)


@contextmanager
def run_beamstop_record(path: str | Path | None, store: dict):
    """One auto-detected beamstop for every still of a run, whichever process extracts it.

    Yields ``done(store)``, to be called after the first extraction. If the record ``path`` exists, its shadow
    fills ``store`` (the extractor's beamstop store) and ``done`` does nothing. Otherwise this process takes the
    record's lock (``<path>.lock``, ``flock``; other processes' first stills wait), looks again, and if the
    record is still absent extracts its first still with a shadow of its own, which ``done`` writes as the
    record before the lock is released. Without a record each extractor process found its own shadow on the
    first still it handled (measured on rendered stills: 22 307 vs 31 554 masked pixels), so the map depended on
    which process extracted which still. The shadow still comes from the run's first still to get here.
    """
    if path is None:
        yield lambda st: None
        return
    path = Path(path)
    if path.exists():
        store.update(read_beamstop_record(path))
        yield lambda st: None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_CREAT | os.O_RDWR, 0o640)
    held = [True]
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if path.exists():
            store.clear()
            store.update(read_beamstop_record(path))
            fcntl.flock(fd, fcntl.LOCK_UN)
            held[0] = False
            yield lambda st: None
            return
        store.clear()  # the record is what every process uses: not a shadow this process found before it

        def done(st: dict) -> None:
            if held[0]:
                if st:
                    _write_beamstop_record(path, st)
                fcntl.flock(fd, fcntl.LOCK_UN)
                held[0] = False

        yield done
    finally:
        if held[0]:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def warm_up() -> None:
    """Load what the first still would otherwise load: the compiled kernels (numba and its modules,
    ~0.5 s) and the artifact writer's imports. A worker calls this when it starts."""
    kernels.warm_up()
    mask_kernels.warm_up()


def run_stats(experiments, indices: Sequence[int], path="<experiments>", progress: Callable | None = None):
    """HOT/DEAD flags from the statistics of the given stills (one streaming pass)."""
    stats = None
    for i in indices:
        expt, j = art.select_experiment(experiments, i, path)
        data, fmask = art.read_image(expt, j)
        if stats is None:
            stats = RunPixelStatistics(expt.detector)
        stats.add(data, untrusted_and_overload(expt.detector, data, fmask))
        if progress:
            progress()
    return stats.hot_dead_flags() if stats is not None and stats.n_stills >= 3 else None


_JOB = ExtractJob.model_fields  # defaults of the job-level options: core.params, nowhere else


def process(expt_path: str | Path, out_dir: str | Path, *, refl_path: str | Path | None = None,
            image_indices: Sequence[int] = tuple(_JOB["image_indices"].get_default(call_default_factory=True)),
            params: ExtractionParams | None = None, background_path: str | Path | None = None,
            hot_dead: bool = _JOB["hot_dead"].default, pngs: bool = _JOB["pngs"].default,
            job_id: str | None = None, progress: Callable | None = None, run_key: str | None = None,
            pixel_stats: str | Path | None = None,
            pixel_stats_min_stills: int = _JOB["pixel_stats_min_stills"].default,
            beamstop_record: str | Path | None = None) -> list[dict]:
    """Extract each selected still of ``expt_path`` into ``out_dir/<stem>_NNNN.h5`` (+ PNGs).

    Hot/dead pixels need a run: with ``hot_dead`` and >= 3 stills selected they are found from
    the selected stills' statistics first. Returns one summary dict per still.
    ``run_key`` (e.g. the bus run id): stills of the same run processed by this process reuse the
    beamstop auto-detected on the first of them (as the stills of one call always do).
    ``pixel_stats``: the run's running per-pixel statistics file (``core.runstats``): each still is added
    to it, and from the ``pixel_stats_min_stills``-th still of the run on, its HOT/DEAD flags mask this still.
    ``beamstop_record``: the run's beamstop record file (:func:`run_beamstop_record`; with ``beamstop="auto"``):
    every process extracting the run's stills uses the one shadow recorded there.
    """
    params = params or ExtractionParams()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    experiments = art.load_experiments(expt_path)
    inputs = {"experiments": sha256_file(expt_path)}
    if refl_path:
        inputs["reflections"] = sha256_file(refl_path)
    background = bmodel = None
    if background_path:
        if art.is_background_artifact(background_path):  # from background frames: scaled per still
            bmodel = art.read_background_artifact(background_path, experiments[0].detector)
        else:  # a plain image, subtracted x background_scale
            background = art.read_background(background_path, experiments[0].detector)
        inputs["background"] = sha256_file(background_path)
    dyn = run_stats(experiments, image_indices, expt_path) if hot_dead and len(image_indices) >= 3 else None
    cache = GeometryCache()
    cache.beamstop = _run_beamstop_store(run_key) if run_key else cache.beamstop
    auto = isinstance(params.beamstop, str) and params.beamstop == "auto"
    with run_beamstop_record(beamstop_record if auto else None, cache.beamstop) as beamstop_done:
        return _extract_each(experiments, expt_path, out_dir, refl_path, image_indices, params, background,
                             bmodel, background_path, dyn, cache, inputs, pixel_stats, pixel_stats_min_stills,
                             pngs, job_id, progress, beamstop_done)


def _extract_each(experiments, expt_path, out_dir, refl_path, image_indices, params, background, bmodel,
                  background_path, dyn, cache, inputs, pixel_stats, pixel_stats_min_stills, pngs, job_id, progress,
                  beamstop_done) -> list[dict]:
    """The loop of :func:`process` over the selected stills (``beamstop_done`` after the first)."""
    results = []
    stem = Path(expt_path).stem
    for i in image_indices:
        expt, j = art.select_experiment(experiments, i, expt_path)
        data, fmask = art.read_image(expt, j)
        refl = art.load_reflections(refl_path, experiment_index=i, identifier=expt.identifier) if refl_path else None
        image_path = art._image_path(expt, j)
        image_sha = sha256_file(image_path) if Path(image_path).is_file() else ""
        dyn_i = dyn
        if pixel_stats is not None:
            st = runstats.update_run_stats(pixel_stats, f"{image_sha or image_path}#{j}", data,
                                           untrusted_and_overload(expt.detector, data, fmask))
            if st.n_stills >= pixel_stats_min_stills:
                rs = st.hot_dead_flags()
                dyn_i = rs if dyn_i is None else [a | b for a, b in zip(dyn_i, rs)]
            n_run_stills = st.n_stills
            del st
        kw = {"background": background, "background_method": "image"}
        p_i = params
        if bmodel is not None:
            ratio, notes = art.exposure_ratio(art.image_exposure(image_path), bmodel)
            for n in notes:
                log.warning("%s: %s (background %s)", image_path, n, background_path)
            p_i = params.model_copy(update={"background_scale": params.background_scale * ratio})
            kw = {"background": bmodel["mean"], "background_variance": bmodel["variance"],
                  "background_method": "frames"}
        res = extract_still(expt, data, refl, params=p_i, dynamic_flags=dyn_i, format_mask=fmask,
                            geometry_cache=cache, image_index=j, **kw)
        beamstop_done(cache.beamstop)
        if pixel_stats is not None:
            res.info.update(pixel_stats_stills=n_run_stills,
                            hot_dead_from_run_stats=n_run_stills >= pixel_stats_min_stills)
        if bmodel is not None:
            res.info.update(background_exposure_ratio=ratio, background_scale_applied=p_i.background_scale,
                            background_notes=notes, background_frames=bmodel["n_frames"])
        h5 = out_dir / f"{stem}_{i:04d}.h5"
        art.write_still(h5, res, expt, parameters={**params.as_dict(), "hot_dead": dyn is not None},
                        inputs={**inputs, "image": image_sha},
                        image_path=image_path, image_index=j, experiment_index=i, job_id=job_id,
                        producer_version=__version__, air_path_fraction=params.air_path_fraction,
                        air_density_g_cm3=params.air_density_g_cm3)
        summary = {"index": i, "artifact": h5, "n_pixels": len(res), **{k: v for k, v in res.info.items()
                                                                        if k.startswith("n_")},
                   "background_method": res.info.get("background_method", "none"),
                   "bragg_radius_px": res.info.get("bragg_radius_px")}
        if pngs:
            summary["pngs"] = diagnostics.write_pngs(out_dir, data, res.flags, res.table, stem=h5.stem)
        results.append(summary)
        del res, data  # frees the table's workspace memory for the next still
        if progress:
            progress()
    return results


def make_background(frame_paths: Sequence[str | Path], out_path: str | Path, job: BackgroundJob | None = None, *,
                    job_id: str | None = None, beamstop_record: str | Path | None = None) -> tuple[Path, dict]:
    """Background-only frames (dxtbx-readable, one detector) -> one background artifact.

    Per frame: gaps and untrusted pixels (negative values, the trusted range, the format's mask);
    once, on the mean frame: user mask shapes and the beamstop (``job.beamstop``: auto-detected
    as in the extraction, "none" or shapes). Then ``core.background.estimate_background``. The
    frames' exposure time and transmission come from their headers (mean over the frames; a
    warning when they differ by more than 1 %). Returns the path and the estimate's info.

    ``beamstop_record`` (with ``beamstop="auto"``): the run's beamstop record (:func:`run_beamstop_record`) is
    written from the shadow found on the mean background frame, unless the run has one already. Written before
    any still is extracted, it makes every still's shadow the same whatever the order of extraction: the mean of
    frames without a crystal is the cleanest image of the shadow a run has.
    """
    # dxtbx (DIALS, ~1 s): only a background job reads frames with it; the CLI's start does not need it
    from dxtbx.model import Experiment
    from dxtbx.model.experiment_list import ExperimentListFactory

    job = job or BackgroundJob()
    params = extraction_params(job)
    paths = [Path(p) for p in frame_paths]
    if not paths:
        raise art.InputError("no background frames given")
    frames, flags, expo, det, beam = [], [], [], None, None
    for p in paths:
        if not p.is_file():
            raise art.InputError(f"background frame {p} does not exist")
        try:
            el = ExperimentListFactory.from_filenames([str(p)])
            e = Experiment(imageset=el[0].imageset, detector=el[0].detector, beam=el[0].beam)
        except Exception as exc:  # noqa: BLE001 - dxtbx raises many kinds
            raise art.InputError(f"cannot read background frame {p}: {exc}") from exc
        if det is None:
            det, beam = e.detector, e.beam
        elif [q.get_image_size() for q in e.detector] != [q.get_image_size() for q in det]:
            raise art.InputError(f"background frame {p} has another detector layout than {paths[0]}")
        data, fmask = art.read_image(e, 0)
        frames.append(data)
        flags.append(untrusted_and_overload(det, data, fmask))
        expo.append(art.image_exposure(p))
    mean = [np.mean([f[i] for f in frames], axis=0, dtype=np.float64).astype(np.float32) for i in range(len(det))]
    experiment = Experiment(detector=det, beam=beam)
    cache = GeometryCache(shared=False)
    pixels = cache.get(det, beam, params, None)
    stat, sinfo = static_flags(experiment, mean, pixels, params)

    # beamstop and user shapes for every frame (untrusted/overloaded pixels are flagged per frame)
    static_bad = [(f & np.uint8(MaskBit.BEAMSTOP | MaskBit.USER)) != 0 for f in stat]
    if beamstop_record is not None and params.beamstop == "auto":
        shadow = [(f & np.uint8(MaskBit.BEAMSTOP)).astype(np.uint8) for f in stat]
        binfo = {**{k: v for k, v in sinfo.items() if k.startswith("beamstop")},
                 "beamstop_source": f"the mean of {len(paths)} background frames"}
        with run_beamstop_record(beamstop_record, {}) as done:
            done({_layout_key(det): (shadow, binfo)})
    model = bg.estimate_background(frames, flags, static_bad, bin_px=job.bin_px, smooth_bins=job.smooth_bins,
                                   outlier_nsigma=job.outlier_nsigma, gain=job.gain)
    model.info.update({k: v for k, v in sinfo.items() if k.startswith("beamstop")})
    t = [x["exposure_time_s"] for x in expo]
    tr = [x["transmission"] for x in expo]
    t_mean = float(np.mean(t)) if all(v is not None for v in t) else None
    tr_mean = float(np.mean(tr)) if all(v is not None for v in tr) else None
    for name, vals, m in (("exposure time", t, t_mean), ("transmission", tr, tr_mean)):
        if m is None:
            log.warning("background frames: %s missing from some headers: stills will not be scaled for it", name)
            model.info.setdefault("notes", []).append(f"{name} unknown")
        elif max(vals) > 1.01 * min(vals):
            log.warning("background frames: %s differs between frames (%s): the mean is used", name, vals)
            model.info.setdefault("notes", []).append(f"{name} differs between frames")
    inputs = {f"frame{i}": sha256_file(p) for i, p in enumerate(paths)}
    out = art.write_background(out_path, model, det, beam,
                               parameters={k: v for k, v in job.as_dict().items() if k != "mode"},
                               inputs=inputs, frame_paths=[str(p) for p in paths], exposure_time_s=t_mean,
                               transmission=tr_mean, job_id=job_id, producer_version=__version__)
    return out, model.info
