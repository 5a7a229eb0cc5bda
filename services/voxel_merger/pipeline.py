"""The voxel merger's workflows, shared by the CLI and the worker.

``run``: stills -> grid -> accumulate (optionally twice, for outlier rejection) -> merge -> outputs.
``accumulate_one``: one still -> a partial HDF5 accumulator (one job per still).
``merge_partials``: partial accumulators -> merged map (one merge job); sums add exactly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from diffractflow import figure_process
from diffractflow.artifacts import atomic_write_json, atomic_write_path, write_provenance

from . import __version__
from .artifacts import (InputError, ObservationTableWriter, map_planes, open_still, read_scales, read_still_names,
                        resolve_scales, scale_for, write_grid, write_map, write_map_figures)
from .core.accumulate import VoxelAccumulator, block_shift_for, half_of_still
from .core.grid import (CrystalModel, GlobalGrid, average_crystal_model, build_grid, hkl_change_of_basis_matrix,
                        reindex_to_reference, s_max_of_hkl)
from .core.accumulate import observation_weights, scale_sums, sparse_sums
from .core.merge import (AsuMapper, cc_half_by_shell, dense_map, expand_store, intrinsic_spread, leave_one_out_terms,
                         leave_one_out_z_sums, map_slabs,
                         radial_profile, store_planes, symmetry_agreement, symmetry_merge)
from .core.params import DEFAULTS, MergeOptions
from .storage import ACCUMULATOR_SCHEMA, ACCUMULATOR_SCHEMA_VERSION, H5VoxelAccumulator, write_sparse_partial

log = logging.getLogger("voxel_merger")

NO_SYMMETRY = ("", "none", "p1-nomerge", "off")


#: memory for the stills' sparse sums kept between the merge's passes (re-read from their files beyond it)
SPARSE_STILLS_CACHE_BYTES = 512 << 20  # with the dense grids (cache_mb) the merge stays within 2 GB

def check_subdivisions(n: int) -> None:
    """Integer hkl must sit at voxel centres: ``subdivisions`` odd (the job's parameters are at fault if not)."""
    if n < 1 or n % 2 == 0:
        raise InputError(f"subdivisions must be a positive odd number (integer hkl at voxel centres), got {n}")


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
def _iterated_reject(own: np.ndarray, totals_of: Callable, references: Sequence, n_sigma: float,
                     min_count: int, poisson_floor: bool = False) -> np.ndarray:
    """Iterated leave-one-out rejection of members ``own`` (4, n) (True = reject).

    Round r compares each member with reference r: the sums of the members kept in round r-1
    (round 1: all); ``totals_of(ref)`` gives the reference's voxel sums (4, n) at the members.
    A member inside the reference is compared with the mean of the *others* (leave-one-out);
    one rejected earlier, hence absent, with the whole mean.  Iterating keeps a strong outlier
    from dragging its voxel's mean and condemning the good members beside it.  Voxels with
    fewer than ``min_count`` members are not judged.
    """
    in_ref = np.ones(own.shape[1], dtype=bool)
    for ref in references:
        tot = np.array(totals_of(ref), dtype=np.float64)
        if not in_ref.all():
            tot[:, ~in_ref] += own[:, ~in_ref]  # as if present, so leave-one-out gives the plain mean
        z = leave_one_out_z_sums(own, tot, poisson_floor)
        in_ref = ~((np.abs(z) > n_sigma) & (tot[0] >= min_count))
    return ~in_ref


def reject_mask(ids, I, sig, scale, references: Sequence, n_sigma: float, min_count: int,
                weight=None) -> np.ndarray:
    """Outlier decision for observations (I, σ, w) after iterated rejection rounds (True = reject).

    See :func:`_iterated_reject`; each observation counts one in its voxel.
    """
    w, wi, w2v = observation_weights(I, sig, scale, weight)
    own = np.stack([np.ones_like(w), w, wi, w2v])
    return _iterated_reject(own, lambda ref: ref.gather(ids), references, n_sigma, min_count,
                            poisson_floor=weight is not None)


def accumulate_still(src, grid: GlobalGrid, acc, *, scale: float | None = None, half: int = 0,
                     mapper: AsuMapper | None = None, reference=None, reject_sigma: float | None = None,
                     reject_min_count: int = DEFAULTS.reject_min_count, table: ObservationTableWriter | None = None,
                     chunk: int = 1 << 22, reference_setting: bool = True,
                     heartbeat: Callable[[], None] | None = None, s_max: float | None = None) -> dict:
    """Stream one still into ``acc``; optionally reject outliers against ``reference`` sums and write the table.

    Voxel ids are ASU voxels when ``mapper`` is given (needed when ``reference`` is ASU-merged
    and for the scaler's table), P1 voxels otherwise.
    """
    M = _reindex_matrix(src.crystal, reference_setting)
    n_used = n_rej = n_out = n_beyond = 0
    t_index = table.still_index(src.still_id) if table is not None else None
    for c in src.iter_chunks(chunk):
        h, k, l = _apply_reindex(c.h, c.k, c.l, M)
        ids = grid.voxel_ids(h, k, l)
        if s_max is not None:  # the grid is a box around the resolution sphere: its corners are beyond d_min
            inside = ids >= 0
            beyond = np.zeros(ids.shape, dtype=bool)
            beyond[inside] = grid.s_of_voxels(ids[inside]) > s_max
            ids = np.where(beyond, -1, ids)
            n_beyond += int(beyond.sum())
        n_out += int((ids < 0).sum())
        if mapper is not None:
            ids = mapper.map_observations(ids)
        I, sig, wt = c.intensity, c.sigma, c.weight
        valid = None
        if (reference is not None and reject_sigma) or table is not None:
            valid = (ids >= 0) & np.isfinite(sig) & np.isfinite(I)
            if wt is None:
                valid &= sig > 0
            else:
                valid &= (sig >= 0) & (wt > 0) & np.isfinite(wt)
        if reference is not None and reject_sigma:
            vi = np.flatnonzero(valid)
            refs = reference if isinstance(reference, (list, tuple)) else [reference]
            bad = reject_mask(ids[vi], I[vi], sig[vi], scale, refs, reject_sigma, reject_min_count,
                              None if wt is None else wt[vi])
            n_rej += int(bad.sum())
            if bad.any():
                ids = ids.copy()
                ids[vi[bad]] = -1
                valid[vi[bad]] = False
        n_used += acc.add_ids(ids, I, sig, half=half, scale=scale, still_id=src.still_id, weight=wt)
        if table is not None:
            keep = valid
            q = c.q_magnitude[keep] if c.q_magnitude is not None else grid.s_of_hkl(
                np.stack([h[keep], k[keep], l[keep]], axis=1))
            table.append(t_index, ids[keep], q, I[keep], sig[keep], None if wt is None else wt[keep])
        if heartbeat:
            heartbeat()
    return {"n_used": n_used, "n_rejected": n_rej, "n_outside_grid": n_out, "n_beyond_d_min": n_beyond}


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
    """Release a work accumulator made by :func:`_new_acc` (scratch: its sums are not kept)."""
    if hasattr(acc, "discard"):
        acc.discard()
    elif hasattr(acc, "close"):
        acc.close()


# ------------------------------------------------------------------ outputs
def finalize(acc, grid: GlobalGrid, out_dir: Path, opt: MergeOptions, *, symmetry: str | None,
             extra_stats: Mapping | None = None, inputs: Mapping[str, str] | None = None,
             job_id: str | None = None, workdir: Path | None = None, already_asu: bool = False,
             progress: Callable[[], None] | None = None) -> dict[str, Path]:
    """Symmetry-merge (if asked), compute statistics, write map.h5, stats.json and (``opt.figures``) PNGs."""
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
    if mapper is not None and not already_asu:
        stats["symmetry_agreement"] = symmetry_agreement(acc, store, mapper, grid, opt.n_shells)
    stats["radial_profile"] = radial_profile(store, grid)
    if extra_stats:
        stats.update(extra_stats)
    outputs = {}
    drawing = None
    if opt.figures:  # from the planes in memory, drawn (in a service: by its figure process) while the map is written
        planes = store_planes(view) if streamed else map_planes(grid, mean)
        drawing = figure_process.draw_later(write_map_figures, out_dir, grid, planes, stats["radial_profile"])
    if streamed:
        outputs["map"] = write_map(out_dir / "map.h5", grid, None, None, None, statistics=stats,
                                   parameters=opt.params(), inputs=inputs, job_id=job_id, slabs=map_slabs(view))
        if view is not store:
            _close(view)
    else:
        outputs["map"] = write_map(out_dir / "map.h5", grid, mean, sigma, counts, statistics=stats,
                                   parameters=opt.params(), inputs=inputs, job_id=job_id)
    if drawing is not None:
        outputs.update(drawing.result())
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
                                     s_max=1.0 / opt.d_min if opt.d_min else None,
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
                        reference_setting=opt.reference_setting, s_max=1.0 / opt.d_min if opt.d_min else None)
                    if progress:
                        progress(f"pass {n_pass}", i + 1, len(sources))
                ok = True
            finally:
                if table is not None:
                    table.close(ok)
            for ref in reference:
                _close(ref)
            extra = {"grid_info": grid_info, "average_unit_cell": grid_info["average_unit_cell"],
                     "weighting": sorted({"exposure" if getattr(s, "has_weight", False) or getattr(s, "weight", None)
                                          is not None else "inverse_variance" for s in sources}),
                     "n_rejected": sum(v["n_rejected"] for v in per_still.values()),
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


#: log2 of the voxel blocks in which readers of a single-still partial visit it (see :func:`accumulate_one`)
PARTIAL_BLOCK_SHIFT = 12


def still_voxel_sums(src, grid: GlobalGrid, *, chunk: int = 1 << 22, reference_setting: bool = True,
                     s_max: float | None = None, heartbeat: Callable[[], None] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, dict]:
    """One still's observations summed per P1 voxel: (voxel ids increasing, sums (4, n), info).

    The sums are those :func:`accumulate_still` adds to an accumulator (count, Σw, Σw·I, Σw²σ²; unscaled), with
    no grid-sized array: one still touches ~1 % of the voxels. ``s_max`` (1/d_min, Å⁻¹): voxels whose centre lies
    beyond are dropped with their observations (the grid is a box around the resolution sphere), as
    :func:`accumulate_still` does per observation. ``info``: n_in, n_used, n_outside_grid (beyond d_min
    included), n_beyond_d_min."""
    M = _reindex_matrix(src.crystal, reference_setting)
    parts = []
    n_in = n_out = 0
    for c in src.iter_chunks(chunk):
        h, k, l = _apply_reindex(c.h, c.k, c.l, M)
        ids = grid.voxel_ids(h, k, l)
        n_in += ids.size
        n_out += int((ids < 0).sum())
        parts.append(sparse_sums(ids, c.intensity, c.sigma, grid.n_voxels, c.weight))
        if heartbeat:
            heartbeat()
    if len(parts) == 1:
        ids, sums, n_all, _ = parts[0]
    elif parts:  # several chunks: their per-voxel sums add (order of addition per chunk)
        ids, inv = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
        cat = np.concatenate([p[1] for p in parts], axis=1)
        sums = np.stack([np.bincount(inv, weights=cat[f], minlength=ids.size) for f in range(cat.shape[0])])
        n_all = np.bincount(inv, weights=np.concatenate([p[2] for p in parts]), minlength=ids.size).astype(np.int64)
    else:
        ids, sums, n_all = np.zeros(0, np.int64), np.zeros((4, 0)), np.zeros(0, np.int64)
    n_beyond = 0
    if s_max is not None and ids.size:
        beyond = grid.s_of_voxels(ids) > s_max
        n_beyond = int(n_all[beyond].sum())
        ids, sums = ids[~beyond], sums[:, ~beyond]
    keep = sums[0] > 0  # voxels whose observations were all unusable hold nothing
    ids, sums = ids[keep], np.ascontiguousarray(sums[:, keep])
    info = {"n_in": n_in, "n_used": int(sums[0].sum()), "n_outside_grid": n_out + n_beyond,
            "n_beyond_d_min": n_beyond}
    return ids, sums, info


def accumulate_one(still: Path, grid: GlobalGrid, out_path: Path, opt: MergeOptions,
                   input_hashes: Mapping[str, str] | None = None, job_id: str | None = None,
                   heartbeat: Callable[[], None] | None = None) -> dict:
    """One still -> a partial accumulator file (P1 voxels, one half, unscaled), sparse (version 3): the ids and
    sums of the voxels it touches (:func:`still_voxel_sums`)."""
    out_path = Path(out_path)
    with open_still(still) as src, atomic_write_path(out_path) as tmp:
        ids, sums, info = still_voxel_sums(src, grid, chunk=opt.chunk, reference_setting=opt.reference_setting,
                                           heartbeat=heartbeat, s_max=1.0 / opt.d_min if opt.d_min else None)
        weighting = "exposure" if getattr(src, "has_weight", False) else "inverse_variance"
        meta = {"weighting": weighting}
        if src.crystal is not None:  # the still's refined model: the merge averages them for |s|
            meta["crystal"] = _crystal_dict(src.crystal)
        n_in = info.pop("n_in")
        f = write_sparse_partial(tmp, grid, ids, sums, still_ids=[src.still_id], n_obs=info["n_used"],
                                 n_dropped=n_in - info["n_used"], meta=meta,
                                 block_shift=block_shift_for(grid.n_voxels, min_shift=PARTIAL_BLOCK_SHIFT))
        try:
            write_provenance(f, schema=ACCUMULATOR_SCHEMA, schema_version=ACCUMULATOR_SCHEMA_VERSION,
                             producer="voxel-merger", producer_version=__version__, job_id=job_id,
                             parameters=opt.params(), inputs=input_hashes or {})
        finally:
            f.close()
    info = {"n_used": info["n_used"], "n_rejected": 0, "n_outside_grid": info["n_outside_grid"],
            "n_beyond_d_min": info["n_beyond_d_min"], "still_id": src.still_id, "weighting": weighting}
    return info


def _crystal_dict(c: CrystalModel) -> dict:
    return {"unit_cell": list(c.unit_cell), "space_group": c.space_group,
            "A_matrix": None if c.A_matrix is None else [list(r) for r in c.A_matrix]}


def _crystal_from_dict(d) -> CrystalModel | None:
    if not d:
        return None
    A = d.get("A_matrix")
    return CrystalModel(tuple(float(x) for x in d["unit_cell"]), str(d.get("space_group", "P 1")),
                        None if A is None else tuple(tuple(float(x) for x in r) for r in A))


def _open_partial(p: Path) -> H5VoxelAccumulator:
    try:
        return H5VoxelAccumulator(p, mode="r")
    except (OSError, ValueError) as exc:
        raise InputError(f"{p}: not a readable partial accumulator ({exc})") from exc


def bragg_voxel_mask(grid: GlobalGrid, ids: np.ndarray) -> np.ndarray:
    """True for voxels centred on an integer hkl (a Bragg position; needs odd ``ndiv`` >= 3).

    Those voxels hold the Bragg spot as well as the halo's centre: whatever part of a spot the Bragg mask misses
    (a reflection partially excited outside the prediction window, a tail beyond the mask radius) lands there, and
    what a significance test catches of it depends on the dose. Leaving them out keeps the map dose-invariant; the
    neighbouring voxels keep the halo's shape."""
    if grid.ndiv < 3:
        raise InputError(f"exclude_bragg_voxels needs a grid with subdivisions >= 3 (got {grid.ndiv}): every voxel "
                         "is centred on an integer hkl")
    H = grid.voxel_hkl_scaled(np.asarray(ids, dtype=np.int64))
    return np.all(H % grid.ndiv == 0, axis=1)


def _read_sparse(path: Path, grid: GlobalGrid | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A single-still partial as (voxel ids, sums (4, n)) over its voxels with observations, scale not applied.

    One still touches a small fraction of the voxels: an accumulate job stores only those (version 3; version 2
    partials hold a dense grid in compressed blocks). The merge reads each partial once into this form and makes
    all its passes (reference, rejection rounds, final sums, observation table) on it."""
    with _open_partial(path) as part:
        ids, cols = part.sparse()  # version 3 as stored; version 2 gathered from its blocks
    cols = cols.sum(axis=1) if cols.shape[1] > 1 else cols[:, 0]
    if grid is not None:  # Bragg voxels left out (MergeOptions.exclude_bragg_voxels)
        keep = ~bragg_voxel_mask(grid, ids)
        ids, cols = ids[keep], cols[:, keep]
    return ids, cols


class _SparseStills:
    """Single-still partials in sparse form, read once and kept in memory up to ``budget_bytes`` (those beyond
    the budget are re-read from disk on each pass, so memory stays bounded however long the run)."""

    def __init__(self, paths: Sequence[Path], budget_bytes: int, exclude_bragg_of: GlobalGrid | None = None):
        self.paths = list(paths)
        self.exclude_bragg_of = exclude_bragg_of
        self.budget = budget_bytes
        self.used = 0
        self._mem: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, i: int, b: float | None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, sums (4, n)) of still ``i`` with its scale b applied (Σw → b·Σw; a copy)."""
        got = self._mem.get(i)
        if got is None:
            got = _read_sparse(self.paths[i], self.exclude_bragg_of)
            size = got[0].nbytes + got[1].nbytes
            if self.used + size <= self.budget:
                self._mem[i] = got
                self.used += size
        ids, t = got
        t = t.copy()
        if b is not None:
            scale_sums(t, b)
        return ids, t


def _still_voxel_z(ids: np.ndarray, t: np.ndarray, ref, excluded: np.ndarray | None, poisson_floor: bool = False,
                   intrinsic_rel: float = 0.0):
    """(voxel ids, |z|, voxels' still counts, own sums (4, m)) of one still's sparse sums ``t`` (4, n) at ``ids``.

    Each still's voxel estimate (Σw·I/Σw, σ = √Σw²σ²/Σw) is compared with the merged estimate
    of the other stills kept in ``ref`` (sums with count = stills); a still-voxel already
    excluded (``excluded``: sorted voxel ids) is absent from ``ref`` and compared with all of it.
    ``intrinsic_rel``: the relative spread still-voxels show for real (:func:`_run_intrinsic_spread`).
    """
    sel = np.flatnonzero((t[0] > 0) & (t[1] > 0))
    own = t[:, sel].copy()
    own[0] = 1.0  # one still
    ids = ids[sel]
    tot = ref.gather(ids)
    out = np.zeros(ids.size, dtype=bool)
    if excluded is not None and excluded.size:
        out = np.isin(ids, excluded, assume_unique=True)
        tot[:, out] += own[:, out]
    z = np.abs(leave_one_out_z_sums(own, tot, poisson_floor, intrinsic_rel))
    z[out] = np.nan  # already excluded: not a candidate again
    return ids, z, tot[0], own


#: still-voxels per still sampled for the intrinsic-spread estimate (deterministic: the first of a fixed shuffle)
SPREAD_SAMPLE_PER_STILL = 5000


def _run_intrinsic_spread(plan, stills: "_SparseStills", ref, opt: MergeOptions, poisson_floor: bool) -> float:
    """The relative spread κ that the run's still-voxels show beyond counting (:func:`core.merge.intrinsic_spread`)
    over voxels with >= reject_min_count stills: one more pass over the stills' sparse sums."""
    devs, vars_, means = [], [], []
    for i, (_p, _single, _sid, b, _half) in enumerate(plan):
        ids, t = stills.get(i, b)
        sel = np.flatnonzero((t[0] > 0) & (t[1] > 0))
        own = t[:, sel].copy()
        own[0] = 1.0
        tot = ref.gather(ids[sel])
        keep = np.flatnonzero(tot[0] >= opt.reject_min_count)
        if keep.size > SPREAD_SAMPLE_PER_STILL:
            keep = np.sort(np.random.default_rng(i).permutation(keep)[:SPREAD_SAMPLE_PER_STILL])
        dev, var, mean = leave_one_out_terms(own[:, keep], tot[:, keep], poisson_floor)
        devs.append(dev), vars_.append(var), means.append(mean)
    if not devs:
        return 0.0
    return intrinsic_spread(np.concatenate(devs), np.concatenate(vars_), np.concatenate(means))


def _reject_rounds(plan, stills: _SparseStills, ref, opt: MergeOptions, heartbeat=None, poisson_floor: bool = False
                   ) -> tuple[dict[int, np.ndarray], float]:
    """Still-voxels to drop: per round, in every voxel with >= reject_min_count stills, the still whose
    estimate deviates most from the others' mean, if by more than reject_sigma (|z|).

    Removing only the worst member per voxel and round keeps one gross outlier from condemning
    the good stills beside it (their leave-one-out means include it); ``reject_rounds`` rounds
    remove up to that many stills per voxel.  Each round is one pass over the stills' sparse sums;
    memory holds only the candidates.  ``ref`` (all still-voxels) is updated in place.
    A still-voxel's error includes the relative spread the run's still-voxels show for real (one more pass first,
    :func:`_run_intrinsic_spread`). Returns (plan index -> sorted voxel ids dropped, that spread).
    """
    excluded: dict[int, np.ndarray] = {}
    kappa = _run_intrinsic_spread(plan, stills, ref, opt, poisson_floor)
    for _ in range(opt.reject_rounds):
        cand_v, cand_z, cand_s, cand_own = [], [], [], []
        for i, (_p, _single, _sid, b, _half) in enumerate(plan):
            ids, t = stills.get(i, b)
            ids, z, n, own = _still_voxel_z(ids, t, ref, excluded.get(i), poisson_floor, kappa)
            sel = (z > opt.reject_sigma) & (n >= opt.reject_min_count)
            if sel.any():
                cand_v.append(ids[sel])
                cand_z.append(z[sel])
                cand_s.append(np.full(int(sel.sum()), i, dtype=np.int64))
                cand_own.append(own[:, sel])
            if heartbeat:
                heartbeat()
        if not cand_v:
            break
        v, z, st = np.concatenate(cand_v), np.concatenate(cand_z), np.concatenate(cand_s)
        own = np.concatenate(cand_own, axis=1)
        order = np.lexsort((-z, v))  # per voxel, largest |z| first
        first = np.ones(order.size, dtype=bool)
        first[1:] = v[order][1:] != v[order][:-1]
        worst = order[first]
        ref.add_sums(v[worst], 0, [-own[f, worst] for f in range(4)])
        for i in np.unique(st[worst]).tolist():
            new = v[worst][st[worst] == i]
            excluded[i] = np.union1d(excluded.get(i, np.zeros(0, dtype=np.int64)), new)
    return excluded, kappa


def merge_partials(partials: Sequence[Path], out_dir: Path, opt: MergeOptions, scales_path: Path | None = None,
                   input_hashes: Mapping[str, str] | None = None, job_id: str | None = None,
                   heartbeat: Callable[[], None] | None = None,
                   table_path: Path | None = None) -> tuple[dict[str, Path], dict]:
    """Add partial accumulators (scaled per still, split into halves per still) and write the map.

    ``table_path`` (an observation table) maps integer keys of scales.json to still ids.
    With ``opt.reject_sigma`` (single-still partials only), still-voxels whose estimate is
    further than that many σ from the leave-one-out mean of the other stills are dropped
    (see :func:`_reject_rounds`: voxels with >= ``reject_min_count`` stills, the worst still per
    voxel and round, up to ``reject_rounds`` rounds; each round one more read of the partials;
    memory: one partial block, one reference accumulator and the rejected still-voxels).
    |s| (resolution shells, radial profile, table, map metadata) uses the average of the
    refined crystal models stored in the partials, when they carry one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partials = [Path(p) for p in partials]
    if not partials:
        raise InputError("no partial accumulators given")
    scales = read_scales(scales_path) if scales_path else None
    if scales is not None and table_path is not None:
        scales = resolve_scales(scales, read_still_names(table_path))
    reject = bool(opt.reject_sigma)
    if opt.table_only and (reject or not opt.write_table):
        raise InputError("table_only writes the observation table of an unrejected merge: it needs write_table and "
                         "no reject_sigma")
    # scan: grids, still ids, scales, crystal models (metadata only)
    grid = None
    seen: set = set()
    plan = []  # (path, single, still id, scale, half)
    books = []  # (still ids, n_obs, n_dropped) of each partial
    models = []
    weighting = set()
    for p in partials:
        with _open_partial(p) as part:
            if grid is None:
                grid = part.grid
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
            if reject and not single:
                raise InputError(f"{p}: outlier rejection compares stills and needs single-still partials, this "
                                 f"one holds {len(part.still_ids)} stills (merge without reject_sigma)")
            if opt.table_only and not single:
                raise InputError(f"{p}: table_only writes per-still rows and needs single-still partials, this one "
                                 f"holds {len(part.still_ids)} stills")
            sid = part.still_ids[0] if part.still_ids else None
            b = scale_for(scales, sid) if (scales is not None and single) else None
            plan.append((p, single, sid, b, half_of_still(sid, opt.half_seed) if single else None))
            books.append((list(part.still_ids), int(part.n_obs), int(part.n_dropped)))
            m = _crystal_from_dict(part.get_meta("crystal"))
            if m is not None:
                models.append(m)
            weighting.add(part.get_meta("weighting", "unknown"))
    symmetry = _symmetry_symbol(opt, grid)
    metric = grid
    avg_info: dict = {}
    if models:
        avg, _ = average_crystal_model(models, to_reference_setting=opt.reference_setting)
        metric = dataclasses.replace(grid, unit_cell=tuple(float(x) for x in avg.unit_cell))
        avg_info = {"average_unit_cell": list(avg.unit_cell), "average_space_group": avg.space_group,
                    "n_stills_with_crystal": len(models)}
        if avg.space_group.replace(" ", "") != grid.space_group.replace(" ", ""):
            log.warning("average crystal model space group %s differs from the grid's %s", avg.space_group,
                        grid.space_group)
    else:
        avg_info = {"average_unit_cell": list(grid.unit_cell), "n_stills_with_crystal": 0}
    tmpdir = Path(tempfile.mkdtemp(prefix=".vm-work-", dir=out_dir)) if opt.backend == "hdf5" else None
    table = None
    refs: list = []
    try:
        mapper = AsuMapper(metric, symmetry) if symmetry else None
        excluded: dict[int, np.ndarray] = {}
        intrinsic = 0.0
        stills = _SparseStills([p for p, *_ in plan], SPARSE_STILLS_CACHE_BYTES,
                               exclude_bragg_of=metric if opt.exclude_bragg_voxels else None)
        if reject:  # reference: per voxel (number of stills, Σw, Σw·I, Σw²σ²) over every still-voxel
            ref = _new_acc(metric, 1, opt, tmpdir, "reference")
            refs.append(ref)
            for i, (_p, _single, _sid, b, _half) in enumerate(plan):
                ids, t = stills.get(i, b)
                ref.add_sums(ids, 0, [None, t[1], t[2], t[3]])  # count: one per still
                if heartbeat:
                    heartbeat()
            # exposure weights (every partial): Poisson floor on a still-voxel's variance (see leave_one_out_z_sums)
            excluded, intrinsic = _reject_rounds(plan, stills, ref, opt, heartbeat,
                                                 poisson_floor=weighting == {"exposure"})
        merged = None if opt.table_only else _new_acc(metric, 2, opt, tmpdir, "merged")
        if opt.write_table:
            table = ObservationTableWriter(out_dir / "observations.h5", metric, parameters=opt.params(),
                                           inputs=input_hashes, job_id=job_id)
        n_rej = n_rej_obs = 0
        per_still_rejected = {}
        for i, (p, single, sid, b, half) in enumerate(plan):
            part_ids, part_obs, part_dropped = books[i]
            if table is not None and not single:  # per-still rows need per-still partials
                log.info("no observation table: %s holds %d stills", p, len(part_ids))
                table.close(ok=False)
                table = None
            t_index = table.still_index(sid) if table is not None else None
            n_still = 0
            if single:  # its sparse sums (kept from the scan, or read again)
                ids, t = stills.get(i, b)
                if i in excluded:
                    bad = np.isin(ids, excluded[i], assume_unique=True)
                    if bad.any():
                        n_still += int(bad.sum())
                        n_rej_obs += int(t[0, bad].sum())
                        ids, t = ids[~bad], t[:, ~bad]
                if merged is not None:
                    merged.add_sums(ids, half, [t[0], t[1], t[2], t[3]])
                if table is not None:
                    _append_partial_rows(table, t_index, ids, t, b, metric, mapper)
            else:  # keep the partial's own halves
                with _open_partial(p) as part:
                    for start, s in part.iter_blocks():
                        s = np.array(s, dtype=np.float64)
                        if opt.exclude_bragg_voxels:
                            s[:, :, bragg_voxel_mask(metric, start + np.arange(s.shape[-1]))] = 0.0
                        merged.add_block(start, s, half=None)
            if merged is not None:
                merged.still_ids.extend(x for x in part_ids if x not in merged.still_ids)
                merged.n_obs += part_obs
                merged.n_dropped += part_dropped
            n_rej += n_still
            if n_still:
                per_still_rejected[sid] = n_still
            if heartbeat:
                heartbeat()
        for ref in refs:
            _close(ref)
        refs = []
        table_done = None
        if table is not None:
            table.close(ok=True)
            table, table_done = None, out_dir / "observations.h5"
        extra = {"n_partials": len(partials), "scales_applied": scales is not None,
                 "reject_sigma": opt.reject_sigma if reject else None,
                 "reject_intrinsic_spread": round(intrinsic, 4) if reject else None,
                 "n_rejected": n_rej, "n_rejected_observations": n_rej_obs,
                 "n_stills_with_rejections": len(per_still_rejected),
                 "weighting": sorted(weighting), "bragg_voxels_excluded": bool(opt.exclude_bragg_voxels),
                 **avg_info}
        if merged is None:  # table only: the counts a user or a flow checks, no map
            stats = {"n_stills": len(seen), "n_observations": int(sum(b[1] for b in books)), "table_only": True,
                     **extra}
            atomic_write_json(out_dir / "stats.json", stats)
            return {"observations": table_done, "stats": out_dir / "stats.json"}, stats
        outputs = finalize(merged, metric, out_dir, opt, symmetry=symmetry, extra_stats=extra, inputs=input_hashes,
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
        for ref in refs:
            _close(ref)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _append_partial_rows(table: ObservationTableWriter, t_index: int, ids: np.ndarray, t: np.ndarray,
                         b: float | None, grid: GlobalGrid, mapper) -> None:
    """Scaler rows for one single-still partial (sparse: voxel ``ids``, sums ``t``): per (still, voxel) the
    still's estimate I = Σw·I/Σw, σ = √(Σw²σ²)/Σw and weight Σw (all unscaled), |s| at the voxel centre (ASU
    voxel when merging symmetry).  ``t`` holds the sums with the scale b applied (Σw → b·Σw); it is undone."""
    count, sw, swi, sw2v = t
    sel = (count > 0) & (sw > 0)
    if not sel.any():
        return
    ids = ids[sel]
    w = sw[sel] / (b if b is not None else 1.0)
    vox = mapper.map_observations(ids) if mapper is not None else ids
    table.append(t_index, vox, grid.s_of_voxels(ids), swi[sel] / w, np.sqrt(np.maximum(sw2v[sel], 0.0)) / w, w)
