"""Inputs (HDF5 / rosettasciio 4D-STEM readers, cluster label files) and outputs (the seed's layout)."""

from __future__ import annotations

import ctypes
import importlib
import json
import mmap
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from diffractflow.artifacts import atomic_write_path, write_provenance
from diffractflow.reading import reader

from . import __version__
from .core.source import check_scan_shape
from .core.stages import hsv_image

HDF5_SUFFIXES = {".h5", ".hdf5", ".hdf", ".nxs", ".emd", ".h5py"}


class DataError(ValueError):
    """An input file is unreadable or has the wrong shape/content."""


# ------------------------------------------------------------------------------------------ sources
def _check_dtype(dtype, name):
    if np.dtype(dtype).kind not in "iuf":
        raise DataError(f"{name}: patterns must be integer or float, got dtype {dtype}")


class _RowSource:
    """Common flat-index reading over (H, W, ky, kx) or (N, ky, kx) array-likes (h5py / dask)."""

    def _setup(self, shape, scan_shape, name):
        if len(shape) == 4:
            if scan_shape is not None and tuple(scan_shape) != tuple(shape[:2]):
                raise DataError(f"{name}: --scan-shape {tuple(scan_shape)} does not match the data's scan axes "
                                f"{tuple(shape[:2])}")
            self.scan_shape = (int(shape[0]), int(shape[1]))
            self.n_frames = int(shape[0] * shape[1])
            self.four_d = True
        elif len(shape) == 3:
            if scan_shape is None:
                raise DataError(f"{name}: 3-D data (N, ky, kx) needs --scan-shape H W")
            try:
                check_scan_shape(int(shape[0]), scan_shape, name)
            except ValueError as exc:
                raise DataError(str(exc)) from None
            self.scan_shape = (int(scan_shape[0]), int(scan_shape[1]))
            self.n_frames = int(shape[0])
            self.four_d = False
        else:
            raise DataError(f"{name}: 4D-STEM data must be 3-D (N, ky, kx) or 4-D (H, W, ky, kx), got shape "
                            f"{tuple(shape)}")
        self.frame_shape = (int(shape[-2]), int(shape[-1]))
        self.name = name

    def _get(self, sl):  # pragma: no cover - overridden
        raise NotImplementedError

    def read(self, start: int, stop: int) -> np.ndarray:
        if not self.four_d:
            return np.asarray(self._get(np.s_[start:stop]))
        w = self.scan_shape[1]
        r0, r1 = start // w, -(-stop // w)
        block = np.asarray(self._get(np.s_[r0:r1])).reshape(-1, *self.frame_shape)
        return block[start - r0 * w:stop - r0 * w]


_MADV_POPULATE_READ = 22  # Linux >= 5.14: fault the pages of a range in, in one call
_libc = None


def _populate(view: np.ndarray, view_off: int, lo: int, hi: int) -> bool:
    """madvise(MADV_POPULATE_READ) on file offsets [lo, hi) of a mapped view, through ctypes so the GIL is
    released (the pages of the next block are mapped by a helper thread while the current one is processed).
    False when not available (the caller falls back to MADV_WILLNEED)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        base = view.ctypes.data - view_off  # address of file offset 0 in the map
        return _libc.madvise(base + lo, hi - lo, _MADV_POPULATE_READ) == 0
    except Exception:  # pragma: no cover - hints only
        return False


class H5Source(_RowSource):
    """A dataset in an HDF5 file (any int/float dtype; compressed filters via hdf5plugin). Kept open."""

    def __init__(self, path, dset: str, scan_shape=None):
        # h5py (and its filter plugins) only when an HDF5 file is opened: the CLI's --help does not pay for it
        import h5py
        import hdf5plugin  # noqa: F401  (registers bitshuffle/LZ4/... filters)

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"data file {self.path} does not exist")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise DataError(f"{self.path}: not a readable HDF5 file ({exc})") from None
        if dset not in self.file:
            cands = find_datasets(self.file)
            self.file.close()
            raise DataError(f"{self.path}: no dataset {dset!r}; 3-D/4-D datasets in the file: {cands}")
        self.ds = self.file[dset]
        if not hasattr(self.ds, "shape"):
            raise DataError(f"{self.path}:{dset} is a group, not a dataset")
        _check_dtype(self.ds.dtype, f"{self.path}:{dset}")
        self.dtype = self.ds.dtype
        self._setup(self.ds.shape, scan_shape, f"{self.path}:{dset}")
        self._mm = None
        self._view = None
        self._off = 0

    def _get(self, sl):
        return self.ds[sl]

    def read_into(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Read frames [start, stop) into ``out`` (shape (stop - start, ky, kx)) without allocating."""
        if self.four_d:
            w = self.scan_shape[1]
            if start % w or (stop % w and stop != self.n_frames):
                out[...] = self.read(start, stop)
                return out
            self.ds.read_direct(out.reshape(-1, w, *self.frame_shape), np.s_[start // w:-(-stop // w)])
        else:
            self.ds.read_direct(out, np.s_[start:stop])
        return out

    def frames_view(self) -> Optional[np.ndarray]:
        """Read-only (N, ky, kx) view of the dataset's bytes in the file through a memory map (no copy, no
        HDF5 call per block), or None when the dataset is chunked, compressed, external or not native-endian
        (the caller then reads blocks with ``read_into``)."""
        if self._view is not None:
            return self._view
        ds = self.ds
        try:
            if ds.chunks is not None or ds.external or not ds.dtype.isnative or ds.dtype.kind not in "iuf":
                return None
            off = ds.id.get_offset()
        except Exception:  # pragma: no cover - unusual storage layouts
            return None
        count = self.n_frames * self.frame_shape[0] * self.frame_shape[1]
        if off is None or count == 0:
            return None
        try:
            with open(self.path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # pragma: no cover - e.g. a file system without mmap
            return None
        if off + count * ds.dtype.itemsize > len(mm):
            mm.close()
            return None
        self._mm, self._off = mm, int(off)
        self._view = np.frombuffer(mm, dtype=ds.dtype, count=count, offset=off).reshape(
            self.n_frames, *self.frame_shape)
        return self._view

    def advise(self, what: str, start: int, stop: int) -> None:
        """Page hints for frames [start, stop) of the map: 'willneed' starts kernel read-ahead, 'done' unmaps
        them (the page cache keeps the data; this process's resident memory stays bounded)."""
        if self._mm is None or stop <= start or not hasattr(self._mm, "madvise"):
            return
        fb = self.frame_shape[0] * self.frame_shape[1] * self.ds.dtype.itemsize
        lo, hi = self._off + start * fb, self._off + stop * fb
        lo -= lo % mmap.PAGESIZE
        if what == "willneed" and _populate(self._view, self._off, lo, hi):
            return
        flag = mmap.MADV_WILLNEED if what == "willneed" else mmap.MADV_DONTNEED
        try:
            self._mm.madvise(flag, lo, hi - lo)
        except (OSError, ValueError):  # pragma: no cover - hints only
            pass

    def close(self):
        self._view = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still referenced somewhere; the map closes when it is collected
                pass
            self._mm = None
        self.file.close()


class ArinaSource:
    """Dectris (Arina/EIGER) master file: /entry/data/data_000001, ... linked datasets read in order."""

    def __init__(self, path, scan_shape):
        # h5py only when an HDF5 file is opened (heavy; the CLI's --help does not need it)
        import h5py
        import hdf5plugin  # noqa: F401

        self.path = Path(path)
        self.file = h5py.File(self.path, "r")
        grp = self.file["entry/data"]
        names = sorted(k for k in grp.keys() if k.startswith("data_"))
        self.parts = []
        for k in names:
            try:
                self.parts.append(grp[k])
            except KeyError:  # dangling external link (file not present)
                break
        if not self.parts:
            raise DataError(f"{self.path}: no readable /entry/data/data_* datasets")
        self.bounds = np.cumsum([0] + [p.shape[0] for p in self.parts])
        self.n_frames = int(self.bounds[-1])
        self.frame_shape = tuple(int(s) for s in self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype
        self.name = f"{self.path} (Dectris master, {len(self.parts)} data files)"
        if scan_shape is None:
            raise DataError(f"{self.name}: needs --scan-shape H W")
        try:
            check_scan_shape(self.n_frames, scan_shape, self.name)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        self.scan_shape = tuple(int(s) for s in scan_shape)

    def read(self, start, stop):
        out = []
        for i, p in enumerate(self.parts):
            a, b = self.bounds[i], self.bounds[i + 1]
            lo, hi = max(start, a), min(stop, b)
            if lo < hi:
                out.append(p[lo - a:hi - a])
        return np.concatenate(out) if len(out) > 1 else out[0]

    def close(self):
        self.file.close()


class DaskSource(_RowSource):
    """A lazy (dask) array from a rosettasciio reader."""

    def __init__(self, data, name, scan_shape=None):
        _check_dtype(data.dtype, name)
        self.data = data
        self.dtype = np.dtype(data.dtype)
        self._setup(data.shape, scan_shape, name)

    def _get(self, sl):
        d = self.data[sl]
        return d.compute() if hasattr(d, "compute") else np.asarray(d)

    def close(self):
        pass


def find_datasets(f) -> list[str]:
    """Paths of the 3-D / 4-D numeric datasets in an open HDF5 file."""
    import h5py  # heavy: loaded only once an HDF5 file is read

    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.ndim in (3, 4) and obj.dtype.kind in "iuf":
            found.append(name)

    f.visititems(visit)
    return found


_RSCIIO = {".mib": "rsciio.quantumdetector", ".blo": "rsciio.blockfile", ".emd": "rsciio.emd"}


@reader("4D-STEM dataset", DataError)
def open_source(path, dset: Optional[str] = None, scan_shape=None):
    """Open a 4D-STEM dataset lazily.

    HDF5 with ``dset`` -> that dataset; a Dectris master file (``*_master.h5``) -> its linked data files;
    ``.mib`` / ``.blo`` / ``.emd`` (Velox, Berkeley/py4DSTEM EMD) -> rosettasciio's reader with ``lazy=True``;
    HDF5 without ``dset`` -> its only 3-D/4-D dataset.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} does not exist")
    suf = p.suffix.lower()
    if suf in HDF5_SUFFIXES and dset:
        return H5Source(p, dset, scan_shape)
    if suf in (".h5", ".hdf5") and p.name.endswith(("_master.h5", "_master.hdf5")):
        return ArinaSource(p, scan_shape)
    if suf in _RSCIIO:
        mod = importlib.import_module(_RSCIIO[suf])
        try:
            sigs = mod.file_reader(str(p), lazy=True)
        except Exception as exc:
            raise DataError(f"{p}: rosettasciio ({_RSCIIO[suf]}) could not read it: {exc}") from None
        cands = [s for s in sigs if getattr(s["data"], "ndim", 0) in (3, 4)]
        if cands:
            return DaskSource(cands[0]["data"], f"{p} ({_RSCIIO[suf]})", scan_shape)
        if suf not in HDF5_SUFFIXES:
            raise DataError(f"{p}: no 3-D/4-D signal found by rosettasciio")
        # e.g. a Prismatic EMD: rosettasciio stacks its depth datacubes into one 5-D signal; list the 4-D ones
    if suf in HDF5_SUFFIXES:
        import h5py  # heavy: loaded only once an HDF5 file is read

        with h5py.File(p, "r") as f:
            cands = find_datasets(f)
        if len(cands) != 1:
            raise DataError(f"{p}: give --dset; 3-D/4-D datasets in the file: {cands}")
        return H5Source(p, cands[0], scan_shape)
    raise DataError(f"{p}: unknown format {suf!r} (HDF5 .h5/.hdf5/.nxs/.emd, Merlin .mib, blockfile .blo)")


# ------------------------------------------------------------------------------------------ labels
_LABEL_KEYS = ("labels", "clusters", "cluster_labels", "labels_", "cluster", "assignments")


@reader("labels file (.npy/.npz)", DataError)
def load_labels(path) -> tuple[np.ndarray, Optional[list[int]]]:
    """Cluster labels from ``.npy`` or ``.npz`` (key labels/clusters/..., or the only array).

    Returns (labels, declared ids) where declared ids come from an optional ``cluster_ids`` array or
    ``n_clusters`` scalar in the npz (clusters declared but without members are reported and skipped).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"labels file {p} does not exist")
    try:
        obj = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{p}: not a readable .npy/.npz file ({exc})") from None
    declared = None
    if isinstance(obj, np.lib.npyio.NpzFile):
        with obj:
            keys = list(obj.keys())
            key = next((k for k in _LABEL_KEYS if k in keys), None)
            if key is None:
                arrays = [k for k in keys if k not in ("cluster_ids", "n_clusters")]
                if len(arrays) != 1:
                    raise DataError(f"{p}: cannot tell which array holds the labels; keys: {keys} "
                                    f"(name it one of {list(_LABEL_KEYS)})")
                key = arrays[0]
            labels = obj[key]
            if "cluster_ids" in keys:
                declared = [int(v) for v in np.asarray(obj["cluster_ids"]).ravel()]
            elif "n_clusters" in keys:
                declared = list(range(int(obj["n_clusters"])))
    else:
        labels = obj
    if labels.dtype.kind not in "iufb":
        raise DataError(f"{p}: labels must be numeric, got dtype {labels.dtype}")
    return np.asarray(labels), declared


# ------------------------------------------------------------------------------------------ outputs
def _save_npy(path: Path, arr) -> None:
    with atomic_write_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(arr))


def _save_tif(path: Path, arr, description: str = "") -> None:
    import tifffile  # heavy image-format package, needed only when the maps are written

    # TIFF strings are 7-bit ASCII
    description = description.replace("Å", "A").encode("ascii", "replace").decode() if description else None
    with atomic_write_path(path) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(arr), description=description)


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt  # heavy (~0.5 s): only when figures are written

    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)


def _figure(*args, **kw):
    from matplotlib.figure import Figure  # backend-free figure (no GUI needed)

    return Figure(*args, **kw)


def write_outputs(res, out_dir, cfg, run_info: dict) -> dict[str, Path]:
    """Write the seed's directory layout; returns {logical name: path}."""
    out = Path(out_dir)
    dirs = {k: out / k for k in ("kspace", "realspace", "figures", "logs")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    ks, rs, fg, lg = dirs["kspace"], dirs["realspace"], dirs["figures"], dirs["logs"]

    # k-space
    for i, c in enumerate(res.cluster_ids):
        for name, arr in ((f"template_T_{c}", res.templates[i]), (f"gate_G_{c}", res.gates[i]),
                          (f"mu_cluster_{c}", res.stats.mu_c_raw[i])):
            _save_npy(ks / f"{name}.npy", arr.astype(np.float32))
            written[name] = ks / f"{name}.npy"
        fig = _figure(figsize=(4, 4))
        ax = fig.add_subplot()
        ax.imshow(np.log1p(np.maximum(res.stats.mu_c_raw[i], 0)), cmap="inferno")
        ax.set_title(f"cluster {c}: mean pattern, log(I+1)  (n={int(res.stats.counts[i])})", fontsize=8)
        ax.axis("off")
        _save_fig(fig, ks / f"mu_cluster_{c}.png")
        written[f"mu_cluster_{c}_png"] = ks / f"mu_cluster_{c}.png"
    _save_npy(ks / "mu_global.npy", res.stats.mu_raw.astype(np.float32))  # raw mean, like mu_cluster_{c}
    _save_npy(ks / "sigma_global.npy", res.stats.sigma.astype(np.float32))
    written["mu_global"], written["sigma_global"] = ks / "mu_global.npy", ks / "sigma_global.npy"

    # real space
    maps = {f"S_cluster_{c}": res.S[i] for i, c in enumerate(res.cluster_ids)}
    maps.update({
        "S_argmax": res.argmax.astype(np.int32), "S_confidence": res.confidence,
        "Ex": res.ex, "Ey": res.ey, "E_mag": res.e_mag, "E_angle": res.e_angle_deg,
        "com_x": res.com_x_raw, "com_y": res.com_y_raw,
    })
    if res.icom is not None:
        maps["iCoM"] = res.icom
    units = res.report.get("units", {})
    desc = {"E_angle": "degrees, atan2(Ey, Ex)", "S_argmax": "cluster id (label value)",
            "com_x": units.get("com", ""), "com_y": units.get("com", ""),
            "Ex": units.get("E", ""), "Ey": units.get("E", ""), "E_mag": units.get("E", "")}
    for name, arr in maps.items():
        a = arr if arr.dtype.kind in "iu" else arr.astype(np.float32)
        _save_tif(rs / f"{name}.tif", a, desc.get(name, ""))
        written[name] = rs / f"{name}.tif"

    # figures
    _montage(res, fg / "montage_templates.png")
    _hsv(res, fg / "hsv_polarisation.png")
    _quiver(res, fg / "DPC_quiver.png", cfg)
    for n in ("montage_templates", "hsv_polarisation", "DPC_quiver"):
        written[n] = fg / f"{n}.png"

    # logs
    with atomic_write_path(lg / "config.yaml") as tmp:
        Path(tmp).write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
    run = dict(run_info)
    run["config"] = cfg.to_yaml_dict()
    run["report"] = res.report
    run["timings_s"] = res.timings
    run["outputs"] = sorted(str(p.relative_to(out)) for p in written.values()) + [
        "logs/config.yaml", "logs/run.json", "logs/timings.txt"]
    with atomic_write_path(lg / "run.json") as tmp:
        Path(tmp).write_text(json.dumps(_jsonable(run), indent=2))
    lines = [f"{k:28s} {v:10.3f} s" for k, v in res.timings.items()]
    gb = run_info.get("data_gb")
    if gb and res.timings.get("total_after_sample"):
        lines.append(f"{'throughput (2 passes)':28s} {gb / res.timings['total_after_sample']:10.3f} GB/s of raw data")
    with atomic_write_path(lg / "timings.txt") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    written.update(config=lg / "config.yaml", run_json=lg / "run.json", timings=lg / "timings.txt")
    return written


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, Path):
        return str(o)
    return o


def _montage(res, path):
    c = len(res.cluster_ids)
    fig = _figure(figsize=(7.5, 2.4 * c + 0.3))
    for i, cid in enumerate(res.cluster_ids):
        t = res.templates[i]
        lim = np.abs(t).max() or 1.0
        panels = [(np.log1p(np.maximum(res.stats.mu_c_raw[i], 0)), "inferno", None, f"mu_{cid} log(I+1)"),
                  (t, "RdBu_r", (-lim, lim), f"T_{cid}"), (res.gates[i], "gray", (0, 1), f"G_{cid}")]
        for j, (img, cmap, rng, title) in enumerate(panels):
            ax = fig.add_subplot(c, 3, 3 * i + j + 1)
            kw = {"vmin": rng[0], "vmax": rng[1]} if rng else {}
            ax.imshow(img, cmap=cmap, **kw)
            cov = res.report.get("gate_coverage", {}).get(str(cid), {}).get("coverage")
            ax.set_title(title + (f"  ({100 * cov:.0f}% cov.)" if j == 2 and cov is not None else ""), fontsize=8)
            ax.axis("off")
    _save_fig(fig, path)


def _hsv(res, path):
    fig = _figure(figsize=(7, 5))
    ax = fig.add_axes([0.02, 0.05, 0.72, 0.88])
    ax.imshow(hsv_image(res.ex, res.ey))
    ax.set_title("polarisation: hue = angle of E, value = |E|", fontsize=9)
    ax.axis("off")
    # colour wheel legend in the maps' orientation (+x right, +y = increasing row = down)
    inset = fig.add_axes([0.78, 0.40, 0.2, 0.2])
    yy, xx = np.mgrid[-1:1:64j, -1:1:64j]
    wheel = hsv_image(xx, yy, 100)
    wheel[np.hypot(xx, yy) > 1] = 1.0
    inset.imshow(wheel)
    inset.set_title("E direction", fontsize=8)
    inset.axis("off")
    _save_fig(fig, path)


def _quiver(res, path, cfg):
    h, w = res.scan_shape
    step = max(1, -(-max(h, w) // 24))
    fig = _figure(figsize=(6, 5))
    ax = fig.add_subplot()
    im = ax.imshow(res.e_mag, cmap="magma")
    fig.colorbar(im, ax=ax, label="|E|")
    yy, xx = np.mgrid[0:h:step, 0:w:step]
    # angles="xy" on the row-down image axes: +Ey (towards larger row index) is drawn downwards, as in the maps
    ax.quiver(xx, yy, res.ex[::step, ::step], res.ey[::step, ::step], color="w", angles="xy", pivot="mid")
    ax.set_title(f"DPC field (gate mode {cfg.dpc.gate_mode}, baseline {cfg.dpc.baseline})", fontsize=9)
    _save_fig(fig, path)


def write_h5_summary(res, path, cfg, *, job_id=None, inputs=None) -> Path:
    """All maps and k-space arrays in one NeXus-style HDF5 file with provenance (schema stem_polar.maps v1)."""
    import h5py  # heavy: only when the summary file is written

    path = Path(path)
    with atomic_write_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            write_provenance(f, schema="stem_polar.maps", schema_version=1, producer="stem-polar",
                             producer_version=__version__, job_id=job_id, parameters=cfg.to_yaml_dict(),
                             inputs=inputs or {})
            e = f.create_group("entry")
            e.attrs["NX_class"] = "NXentry"
            e.create_dataset("cluster_ids", data=np.asarray(res.cluster_ids, dtype=np.int64))
            e.attrs["report"] = json.dumps(_jsonable(res.report))
            m = e.create_group("realspace")
            m.attrs.update(NX_class="NXdata", signal="E_mag", axes=[".", "."])
            for name, arr in (("Ex", res.ex), ("Ey", res.ey), ("E_mag", res.e_mag), ("E_angle", res.e_angle_deg),
                              ("com_x", res.com_x_raw), ("com_y", res.com_y_raw), ("com_x_corrected", res.com_x),
                              ("com_y_corrected", res.com_y), ("S_confidence", res.confidence)):
                m.create_dataset(name, data=np.asarray(arr, dtype=np.float32), compression="gzip")
            m.create_dataset("S_argmax", data=res.argmax.astype(np.int64), compression="gzip")
            m.create_dataset("S", data=res.S.astype(np.float32), compression="gzip")
            m.create_dataset("labels", data=res.labels.astype(np.int64), compression="gzip")
            if res.icom is not None:
                m.create_dataset("iCoM", data=res.icom.astype(np.float32), compression="gzip")
            m["E_angle"].attrs["units"] = "deg"
            k = e.create_group("kspace")
            k.attrs.update(NX_class="NXdata", signal="templates")
            for name, arr in (("templates", res.templates), ("gates", res.gates), ("mu_cluster", res.stats.mu_c_raw),
                              ("mu_global", res.stats.mu_raw), ("sigma_global", res.stats.sigma),
                              ("union_gate", res.union_gate)):
                k.create_dataset(name, data=np.asarray(arr, dtype=np.float32), compression="gzip")
            k.attrs["center_yx"] = [res.center.cy, res.center.cx]
    return path
