"""The voxel merger's workflows, shared by the CLI and the worker.

``run``: stills -> grid -> accumulate (optionally twice, for outlier rejection) -> merge -> outputs.
``accumulate_one``: one still -> a partial HDF5 accumulator (one job per still).
``merge_partials``: partial accumulators -> merged map (one merge job); sums add exactly.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .artifacts import (InputError, ObservationTableWriter, map_planes, open_still, read_scales, read_still_names,
                        resolve_scales, scale_for, write_grid, write_map, write_radial_png, write_slice_pngs)
from .core.accumulate import VoxelAccumulator, half_of_still
from .core.grid import (CrystalModel, GlobalGrid, average_crystal_model, build_grid, hkl_change_of_basis_matrix,
                        reindex_to_reference, s_max_of_hkl)
from .core.merge import (AsuMapper, cc_half_by_shell, dense_map, expand_store, leave_one_out_z, map_slabs,
                         radial_profile, symmetry_merge)
from .storage import H5VoxelAccumulator

log = logging.getLogger("voxel_merger")

NO_SYMMETRY = ("", "none", "p1-nomerge", "off")


@dataclass
class MergeOptions:
    """Parameters of a merge (units: d_min in Å, reject_sigma in σ)."""

    subdivisions: int = 3
    symmetry: str | None = None        # None/"none": no symmetry merging; "auto": the stills' space group; else a symbol
    reject_sigma: float | None = None  # leave-one-out outlier rejection threshold; None = off
    reject_min_count: int = 3          # only voxels with at least this many observations are tested
    reject_rounds: int = 2             # iterated rejection rounds (each one more pass over the stills)
    half_seed: int = 0                 # seed of the per-still half-dataset split
    n_shells: int = 10
    d_min: float | None = None         # resolution limit of the grid (Å); default: from the data
    backend: str = "memory"            # "memory" or "hdf5" (bounded memory)
    cache_mb: int = 256
    chunk: int = 1 << 20               # observations read per chunk (bounds the memory of reading)
    write_table: bool = True
    reference_setting: bool = True     # reindex stills to their space group's reference setting

    def params(self) -> dict:
        return asdict(self)


def _symmetry_symbol(opt: MergeOptions, grid: GlobalGrid) -> str | None:
    s = opt.symmetry
    if s is None or str(s).strip().lower() in NO_SYMMETRY:
        return None
    if str(s).strip().lower() == "auto":
        return grid.space_group
    return str(s)


def _reindex_matrix(crystal: CrystalModel | None, enabled: bool) -> np.ndarray | None:
    if not enabled or crystal is None:
        return None
    cb = reindex_to_reference(crystal)
    if cb.is_identity_op():
        return None
    return hkl_change_of_basis_matrix(cb)


# ------------------------------------------------------------------ grid
def define_grid(sources: Sequence, opt: MergeOptions, space_group: str | None = None) -> tuple[GlobalGrid, dict]:
    """Average crystal model of the stills and a grid out to the data's resolution (or ``opt.d_min``)."""
    models = [s.crystal for s in sources if s.crystal is not None]
    if not models:
        raise InputError("no input still carries a crystal model (/entry/crystal): cannot define the grid")
    avg, ops = average_crystal_model(models, space_group=space_group, to_reference_setting=opt.reference_setting)
    if opt.d_min:
        s_max = 1.0 / opt.d_min
    else:
        s_max = 0.0
        for src in sources:
            M = _reindex_matrix(src.crystal, opt.reference_setting)
            for c in src.iter_chunks(opt.chunk):
                h, k, l = _apply_reindex(c.h, c.k, c.l, M)
                ok = np.isfinite(h) & np.isfinite(k) & np.isfinite(l)
                if ok.any():
                    s_max = max(s_max, s_max_of_hkl(avg.unit_cell, h[ok], k[ok], l[ok]))
        if s_max <= 0:
            raise InputError("the inputs hold no finite observation: cannot define the grid")
    grid = build_grid(avg, opt.subdivisions, s_max=s_max)
    info = {"average_unit_cell": list(avg.unit_cell), "space_group": avg.space_group, "d_min": 1.0 / s_max,
            "n_stills_with_crystal": len(models), "n_reindexed": sum(not op.is_identity_op() for op in ops)}
    return grid, info


def _apply_reindex(h, k, l, M):
    if M is None:
        return h, k, l
    hkl = np.stack([h, k, l], axis=1) @ M
    return (np.ascontiguousarray(hkl[:, 0]), np.ascontiguousarray(hkl[:, 1]), np.ascontiguousarray(hkl[:, 2]))


# ------------------------------------------------------------------ accumulation
def reject_mask(ids, I, sig, scale, references: Sequence, n_sigma: float, min_count: int) -> np.ndarray:
    """Outlier decision after iterated rejection rounds (True = reject).

    Round r compares each observation with reference r: the sums of the observations kept
    in round r-1 (round 1: all).  An observation inside the reference is compared with the
    mean of the *others* (leave-one-out); one rejected earlier, hence absent, with the whole
    mean.  Iterating keeps a strong outlier from dragging its voxel's mean and condemning
    the good observations beside it.  Voxels with fewer than ``min_count`` observations are
    not judged.
    """
    from .core.accumulate import observation_weights

    in_ref = np.ones(ids.size, dtype=bool)
    own = None
    for ref in references:
        tot = ref.gather(ids)
        if not in_ref.all():
            if own is None:
                w, wi, wi2 = observation_weights(I, sig, scale)
                own = np.stack([np.ones_like(w), w, wi, wi2])
            tot[:, ~in_ref] += own[:, ~in_ref]  # as if present, so leave-one-out gives the plain mean
        z = leave_one_out_z(I, sig, tot, scale)
        in_ref = ~((np.abs(z) > n_sigma) & (tot[0] >= min_count))
    return ~in_ref


def accumulate_still(src, grid: GlobalGrid, acc, *, scale: float | None = None, half: int = 0,
                     mapper: AsuMapper | None = None, reference=None, reject_sigma: float | None = None,
                     reject_min_count: int = 3, table: ObservationTableWriter | None = None,
                     chunk: int = 1 << 22, reference_setting: bool = True,
                     heartbeat: Callable[[], None] | None = None) -> dict:
    """Stream one still into ``acc``; optionally reject outliers against ``reference`` sums and write the table.

    Voxel ids are ASU voxels when ``mapper`` is given (needed when ``reference`` is ASU-merged
    and for the scaler's table), P1 voxels otherwise.
    """
    M = _reindex_matrix(src.crystal, reference_setting)
    n_used = n_rej = n_out = 0
    t_index = table.still_index(src.still_id) if table is not None else None
    for c in src.iter_chunks(chunk):
        h, k, l = _apply_reindex(c.h, c.k, c.l, M)
        ids = grid.voxel_ids(h, k, l)
        n_out += int((ids < 0).sum())
        if mapper is not None:
            ids = mapper.map_observations(ids)
        I, sig = c.intensity, c.sigma
        if reference is not None and reject_sigma:
            valid = (ids >= 0) & (sig > 0) & np.isfinite(sig) & np.isfinite(I)
            vi = np.flatnonzero(valid)
            refs = reference if isinstance(reference, (list, tuple)) else [reference]
            bad = reject_mask(ids[vi], I[vi], sig[vi], scale, refs, reject_sigma, reject_min_count)
            n_rej += int(bad.sum())
            if bad.any():
                ids = ids.copy()
                ids[vi[bad]] = -1
        n_used += acc.add_ids(ids, I, sig, half=half, scale=scale, still_id=src.still_id)
        if table is not None:
            keep = (ids >= 0) & (sig > 0) & np.isfinite(sig) & np.isfinite(I)
            q = c.q_magnitude[keep] if c.q_magnitude is not None else grid.s_of_hkl(
                np.stack([h[keep], k[keep], l[keep]], axis=1))
            table.append(t_index, ids[keep], q, I[keep], sig[keep])
        if heartbeat:
            heartbeat()
    return {"n_used": n_used, "n_rejected": n_rej, "n_outside_grid": n_out}


def _new_acc(grid, n_halves, opt: MergeOptions, workdir: Path | None, name: str):
    if opt.backend == "hdf5":
        if workdir is None:
            raise ValueError("the hdf5 backend needs a work directory")
        return H5VoxelAccumulator(workdir / f"{name}.h5", grid, n_halves=n_halves, mode="w",
                                  cache_bytes=opt.cache_mb * 2**20)
    if opt.backend != "memory":
        raise ValueError(f"backend must be 'memory' or 'hdf5', got {opt.backend!r}")
    return VoxelAccumulator(grid, n_halves)


def _close(acc):
    if hasattr(acc, "close"):
        acc.close()


# ------------------------------------------------------------------ outputs
def finalize(acc, grid: GlobalGrid, out_dir: Path, opt: MergeOptions, *, symmetry: str | None,
             extra_stats: Mapping | None = None, inputs: Mapping[str, str] | None = None,
             job_id: str | None = None, workdir: Path | None = None, already_asu: bool = False,
             progress: Callable[[], None] | None = None) -> dict[str, Path]:
    """Symmetry-merge (if asked), compute statistics, write map.h5, PNGs and stats.json."""
    from diffractflow.artifacts import atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    mapper = AsuMapper(grid, symmetry) if symmetry else None
    store = acc
    lost = 0
    if mapper is not None and not already_asu:
        store = _new_acc(grid, acc.n_halves, opt, workdir, "asu")
        lost = symmetry_merge(acc, store, mapper, progress)
    streamed = opt.backend == "hdf5"
    if streamed:  # bounded memory: expand onto a P1 store and write the map one h-plane at a time
        view = store
        if mapper is not None:
            view = _new_acc(grid, 1, opt, workdir, "expanded")
            expand_store(store, view, mapper, progress)
        n_measured = sum(int((np.asarray(s)[0].sum(axis=0) > 0).sum()) for _, s in view.iter_blocks())
    else:
        mean, sigma, counts = dense_map(store, mapper, progress)
        n_measured = int((counts > 0).sum())
    stats = {
        "n_stills": len(store.still_ids),
        "n_observations": int(store.n_obs),
        "n_dropped": int(store.n_dropped),
        "n_voxels_measured": n_measured,
        "n_voxels_grid": grid.n_voxels,
        "symmetry": symmetry or "none",
        "voxels_lost_off_grid_by_symmetry": lost,
        "grid": grid.to_dict(),
    }
    if store.n_halves == 2:
        stats["cc_half"] = cc_half_by_shell(store, grid, opt.n_shells)
    stats["radial_profile"] = radial_profile(store, grid)
    if extra_stats:
        stats.update(extra_stats)
    outputs = {}
    if streamed:
        outputs["map"] = write_map(out_dir / "map.h5", grid, None, None, None, statistics=stats,
                                   parameters=opt.params(), inputs=inputs, job_id=job_id, slabs=map_slabs(view))
        import h5py

        with h5py.File(outputs["map"], "r") as f:
            planes = map_planes(grid, f["entry/map/intensity"])
        if view is not store:
            _close(view)
        outputs.update(write_slice_pngs(out_dir, grid, planes))
    else:
        outputs["map"] = write_map(out_dir / "map.h5", grid, mean, sigma, counts, statistics=stats,
                                   parameters=opt.params(), inputs=inputs, job_id=job_id)
        outputs.update(write_slice_pngs(out_dir, grid, mean))
    outputs["radial_profile"] = write_radial_png(out_dir / "radial_profile.png", stats["radial_profile"])
    outputs["stats"] = atomic_write_json(out_dir / "stats.json", stats)
    if store is not acc:
        _close(store)
    return outputs


def run(inputs: Sequence[Path], out_dir: Path, opt: MergeOptions, scales_path: Path | None = None,
        input_hashes: Mapping[str, str] | None = None, job_id: str | None = None,
        progress: Callable[[str, int, int], None] | None = None) -> tuple[dict[str, Path], dict]:
    """Merge stills end to end: grid, accumulation (two passes with rejection), map, table, figures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not inputs:
        raise InputError("no input stills given")
    scales = read_scales(scales_path) if scales_path else None
    tmpdir = Path(tempfile.mkdtemp(prefix=".vm-work-", dir=out_dir)) if opt.backend == "hdf5" else None
    try:
        with ExitStack() as stack:
            sources = [stack.enter_context(open_still(p)) for p in inputs]
            ids = [s.still_id for s in sources]
            dup = {x for x in ids if ids.count(x) > 1}
            if dup:
                raise InputError(f"duplicate still ids among inputs: {sorted(dup)}")
            grid, grid_info = define_grid(sources, opt)
            symmetry = _symmetry_symbol(opt, grid)
            mapper = AsuMapper(grid, symmetry) if symmetry else None
            # the table lists stills in input order, so integer keys of the scaler's scales.json index them
            scales = resolve_scales(scales, ids)
            scale_of = {s.still_id: scale_for(scales, s.still_id) for s in sources}
            reference: list = []
            n_pass = 1 + (opt.reject_rounds if opt.reject_sigma else 0)
            for r in range(n_pass - 1):
                ref = _new_acc(grid, 1, opt, tmpdir, f"pass{r + 1}")
                for i, src in enumerate(sources):
                    accumulate_still(src, grid, ref, scale=scale_of[src.still_id], mapper=mapper, chunk=opt.chunk,
                                     reference=list(reference) or None, reject_sigma=opt.reject_sigma,
                                     reject_min_count=opt.reject_min_count, reference_setting=opt.reference_setting)
                    if progress:
                        progress(f"pass {r + 1} (rejection reference)", i + 1, len(sources))
                reference.append(ref)
            acc = _new_acc(grid, 2, opt, tmpdir, "merged")
            table = ObservationTableWriter(out_dir / "observations.h5", grid, parameters=opt.params(),
                                           inputs=input_hashes, job_id=job_id) if opt.write_table else None
            per_still = {}
            ok = False
            try:
                for i, src in enumerate(sources):
                    per_still[src.still_id] = accumulate_still(
                        src, grid, acc, scale=scale_of[src.still_id], half=half_of_still(src.still_id, opt.half_seed),
                        mapper=mapper, reference=list(reference) or None, reject_sigma=opt.reject_sigma,
                        reject_min_count=opt.reject_min_count, table=table, chunk=opt.chunk,
                        reference_setting=opt.reference_setting)
                    if progress:
                        progress(f"pass {n_pass}", i + 1, len(sources))
                ok = True
            finally:
                if table is not None:
                    table.close(ok)
            for ref in reference:
                _close(ref)
            extra = {"grid_info": grid_info, "n_rejected": sum(v["n_rejected"] for v in per_still.values()),
                     "n_outside_grid": sum(v["n_outside_grid"] for v in per_still.values()),
                     "scales_applied": scales is not None}
            outputs = finalize(acc, grid, out_dir, opt, symmetry=symmetry, extra_stats=extra, inputs=input_hashes,
                               job_id=job_id, workdir=tmpdir, already_asu=True)
            _close(acc)
            outputs["grid"] = write_grid(out_dir / "grid.json", grid, grid_info)
            if table is not None:
                outputs["observations"] = out_dir / "observations.h5"
            stats = json.loads(Path(outputs["stats"]).read_text())
            return outputs, stats
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def grid_from_inputs(inputs: Sequence[Path], opt: MergeOptions) -> tuple[GlobalGrid, dict]:
    with ExitStack() as stack:
        sources = [stack.enter_context(open_still(p)) for p in inputs]
        return define_grid(sources, opt)


def accumulate_one(still: Path, grid: GlobalGrid, out_path: Path, opt: MergeOptions,
                   input_hashes: Mapping[str, str] | None = None, job_id: str | None = None,
                   heartbeat: Callable[[], None] | None = None) -> dict:
    """One still -> a partial accumulator file (P1 voxels, one half, unscaled)."""
    from diffractflow.artifacts import atomic_write_path, write_provenance
    from . import __version__
    from .storage import ACCUMULATOR_SCHEMA, ACCUMULATOR_SCHEMA_VERSION

    out_path = Path(out_path)
    with open_still(still) as src, atomic_write_path(out_path) as tmp:
        with H5VoxelAccumulator(tmp, grid, n_halves=1, mode="w", cache_bytes=opt.cache_mb * 2**20) as acc:
            info = accumulate_still(src, grid, acc, chunk=opt.chunk, reference_setting=opt.reference_setting,
                                    heartbeat=heartbeat)
            if not acc.still_ids:
                acc.still_ids.append(src.still_id)
            write_provenance(acc.h5file, schema=ACCUMULATOR_SCHEMA, schema_version=ACCUMULATOR_SCHEMA_VERSION,
                             producer="voxel-merger", producer_version=__version__, job_id=job_id,
                             parameters=opt.params(), inputs=input_hashes or {})
    info["still_id"] = src.still_id
    return info


def merge_partials(partials: Sequence[Path], out_dir: Path, opt: MergeOptions, scales_path: Path | None = None,
                   input_hashes: Mapping[str, str] | None = None, job_id: str | None = None,
                   heartbeat: Callable[[], None] | None = None,
                   table_path: Path | None = None) -> tuple[dict[str, Path], dict]:
    """Add partial accumulators (scaled per still, split into halves per still) and write the map.

    ``table_path`` (an observation table) maps integer keys of scales.json to still ids.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not partials:
        raise InputError("no partial accumulators given")
    if opt.reject_sigma:
        raise InputError("outlier rejection needs the observations: use `run` on the stills, not `merge` of partials")
    scales = read_scales(scales_path) if scales_path else None
    if scales is not None and table_path is not None:
        scales = resolve_scales(scales, read_still_names(table_path))
    tmpdir = Path(tempfile.mkdtemp(prefix=".vm-work-", dir=out_dir)) if opt.backend == "hdf5" else None
    table = None
    mapper = None
    try:
        grid = None
        merged = None
        seen = set()
        for i, p in enumerate(partials):
            try:
                part = H5VoxelAccumulator(p, mode="r")
            except (OSError, ValueError) as exc:
                raise InputError(f"{p}: not a readable partial accumulator ({exc})") from exc
            with part:
                if grid is None:
                    grid = part.grid
                    merged = _new_acc(grid, 2, opt, tmpdir, "merged")
                    symmetry = _symmetry_symbol(opt, grid)
                    mapper = AsuMapper(grid, symmetry) if symmetry else None
                    if opt.write_table:
                        table = ObservationTableWriter(out_dir / "observations.h5", grid, parameters=opt.params(),
                                                       inputs=input_hashes, job_id=job_id)
                elif part.grid != grid:
                    raise InputError(f"{p}: grid differs from the first partial's grid")
                dup = seen.intersection(part.still_ids)
                if dup:
                    raise InputError(f"{p}: stills {sorted(dup)} were already merged from another partial")
                seen.update(part.still_ids)
                single = len(part.still_ids) == 1 and part.n_halves == 1
                if scales is not None and not single:
                    raise InputError(f"{p}: per-still scales need single-still partials, this one holds "
                                     f"{len(part.still_ids)} stills")
                sid = part.still_ids[0] if part.still_ids else None
                b = scale_for(scales, sid) if (scales is not None and single) else None
                half = half_of_still(sid, opt.half_seed) if single else None
                merged.merge(part, scale=b, half=half)
                if table is not None:
                    if single:
                        _append_partial_observations(table, part, sid, grid, mapper)
                    else:  # per-still rows need per-still partials: no table for this merge
                        log.info("no observation table: %s holds %d stills", p, len(part.still_ids))
                        table.close(ok=False)
                        table = None
            if heartbeat:
                heartbeat()
        table_done = None
        if table is not None:
            table.close(ok=True)
            table, table_done = None, out_dir / "observations.h5"
        symmetry = _symmetry_symbol(opt, grid)
        extra = {"n_partials": len(partials), "scales_applied": scales is not None}
        outputs = finalize(merged, grid, out_dir, opt, symmetry=symmetry, extra_stats=extra, inputs=input_hashes,
                           job_id=job_id, workdir=tmpdir, progress=heartbeat)
        _close(merged)
        if table_done is not None:
            outputs["observations"] = table_done
        stats = json.loads(Path(outputs["stats"]).read_text())
        return outputs, stats
    except BaseException:
        if table is not None:
            table.close(ok=False)
        raise
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _append_partial_observations(table: ObservationTableWriter, part, still_id: str, grid: GlobalGrid,
                                 mapper) -> None:
    """One scaler observation per (still, voxel) of a single-still partial: the still's weighted mean
    intensity in that voxel, its error, and |s| at the voxel centre (ASU voxel when merging symmetry)."""
    idx = table.still_index(still_id)
    for start, sums in part.iter_blocks():
        count, sw, swi = sums[0, 0], sums[1, 0], sums[2, 0]
        sel = (count > 0) & (sw > 0)
        if not sel.any():
            continue
        ids = start + np.flatnonzero(sel)
        vox = mapper.map_observations(ids) if mapper is not None else ids
        table.append(idx, vox, grid.s_of_voxels(ids), swi[sel] / sw[sel], 1.0 / np.sqrt(sw[sel]))
