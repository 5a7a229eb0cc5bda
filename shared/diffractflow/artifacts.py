"""The shared volume: safe path resolution, atomic writes, hashes, provenance and job manifests.

Rules every service follows:
- paths in messages are relative to the volume root and are rejected if they escape it;
- files are written to a temporary name in the same directory and ``os.replace``d into place,
  so no reader ever sees half a file (and a failed write leaves nothing behind);
- every HDF5 artifact records schema, producer, job id, parameters and input hashes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .errors import InputError
from .messages import ArtifactRef
from .reading import reader, reading  # noqa: F401  (re-exported for services)

FILE_MODE = 0o640  # artifacts: owner read/write, group read, nobody else
DIR_MODE = 0o750
MANIFEST = "manifest.json"


class VolumeError(InputError):
    """A reference that escapes the volume root, is missing, or does not match its hash."""


# Content hashes this process has computed, keyed by the file's identity and change times (as git's index does).
# A file enters the memo only when its last change is at least HASH_MEMO_SETTLE_NS old when it is hashed, so a
# later change (even one of the same size within the file system's timestamp granularity) gets a later ctime and
# is hashed again ("racy git"). Saves the repeated hashing of one input within a job (runtime check, service,
# open_ref) and of a run's shared inputs (background) across a worker's jobs.
HASH_MEMO_SETTLE_NS = 50_000_000
HASH_MEMO_ENTRIES = 4096
_hash_memo: "OrderedDict[tuple, str]" = OrderedDict()
_hash_memo_lock = threading.Lock()


def _stat_key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_file(path: str | os.PathLike, chunk: int = 4 << 20) -> str:
    """The file's sha256 (hex). Memoised per process by (device, inode, size, mtime, ctime) for files that had
    settled when hashed (see ``HASH_MEMO_SETTLE_NS``)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = _stat_key(st)
        with _hash_memo_lock:
            digest = _hash_memo.get(key)
            if digest is not None:
                _hash_memo.move_to_end(key)
                return digest
        h = hashlib.sha256()
        while block := f.read(chunk):
            h.update(block)
        digest = h.hexdigest()
        settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) >= HASH_MEMO_SETTLE_NS
        if settled and _stat_key(os.fstat(f.fileno())) == key:
            with _hash_memo_lock:
                _hash_memo[key] = digest
                while len(_hash_memo) > HASH_MEMO_ENTRIES:
                    _hash_memo.popitem(last=False)
    return digest


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike, mode: int = FILE_MODE, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    Readers never see a partial file. ``durable`` also fsyncs file and directory so the artifact
    survives a power cut (skip it for small bookkeeping files that can be recomputed).
    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if durable:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
        if not durable:
            return
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    with atomic_write_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, durable: bool = True) -> Path:
    return atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), durable)


def write_provenance(
    h5obj,
    *,
    schema: str,
    schema_version: int = 1,
    producer: str,
    producer_version: str,
    job_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str] | None = None,
) -> None:
    """Store provenance as attributes on an open h5py File or Group (``schema_version``: an integer, one per layout
    of the schema; readers may accept an older writer's string form of the same version)."""
    h5obj.attrs["schema"] = schema
    h5obj.attrs["schema_version"] = np.int64(int(schema_version))
    h5obj.attrs["producer"] = producer
    h5obj.attrs["producer_version"] = producer_version
    h5obj.attrs["job_id"] = job_id or ""
    h5obj.attrs["created"] = datetime.now(timezone.utc).isoformat()
    h5obj.attrs["parameters"] = json.dumps(dict(parameters or {}), sort_keys=True, default=str)
    h5obj.attrs["inputs"] = json.dumps(dict(inputs or {}), sort_keys=True)


def read_provenance(h5obj) -> dict[str, Any]:
    out = {k: (v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v)
           for k, v in h5obj.attrs.items()}
    for key in ("parameters", "inputs"):
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    return out


class Volume:
    """The shared volume root. All message paths are resolved (and confined) here."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"Volume({str(self.root)!r})"

    def resolve(self, rel: str | os.PathLike, must_exist: bool = False) -> Path:
        rel = str(rel)
        if not rel or os.path.isabs(rel) or "\x00" in rel:
            raise VolumeError(f"artifact path {rel!r} must be relative to the volume root {self.root}")
        p = (self.root / rel).resolve()
        if p != self.root and self.root not in p.parents:
            raise VolumeError(f"artifact path {rel!r} escapes the volume root {self.root}")
        if must_exist and not p.exists():
            raise VolumeError(f"artifact {rel!r} not found under the volume root {self.root}")
        return p

    def relative(self, path: str | os.PathLike) -> str:
        p = Path(path).resolve()
        if p != self.root and self.root not in p.parents:
            raise VolumeError(f"{p} is outside the volume root {self.root}")
        return p.relative_to(self.root).as_posix()

    def ref(self, path: str | os.PathLike, with_hash: bool = True) -> ArtifactRef:
        p = Path(path)
        if not p.is_absolute():
            p = self.resolve(p)
        return ArtifactRef(path=self.relative(p), sha256=sha256_file(p) if with_hash else None)

    def open_ref(self, ref: ArtifactRef, verify: bool = True) -> Path:
        """Resolve a reference; check existence and (if given) its sha256."""
        p = self.resolve(ref.path, must_exist=True)
        if verify and ref.sha256 and p.is_file():
            actual = sha256_file(p)
            if actual != ref.sha256:
                raise VolumeError(f"artifact {ref.path!r} has sha256 {actual[:12]}..., expected {ref.sha256[:12]}...")
        return p

    def job_dir(self, service: str, job_id: str, create: bool = True) -> Path:
        """Where a job's outputs live: follows from the job id alone (idempotency)."""
        d = self.resolve(f"jobs/{service}/{job_id}")
        if create:
            d.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        return d


def content_key(service: str, params: Mapping[str, Any], inputs: Mapping[str, ArtifactRef | str]) -> str:
    """What a job computes from, as 12 hex digits: the service, its parameters and the content hashes of its
    inputs (``inputs``: references, or their sha256). Jobs with equal keys give equal outputs, so a finished job
    is reused only when this matches; a changed config or a changed set of inputs makes a new key (a new job)."""
    payload = json.dumps({"service": service, "params": params,
                          "inputs": {k: (v.sha256 if isinstance(v, ArtifactRef) else str(v)) for k, v in inputs.items()}},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def job_identity(service: str, version: str, params: Mapping[str, Any], inputs: Mapping[str, ArtifactRef]) -> dict:
    """A job's identity as its manifest records it: the content key plus the service's major version (a new
    major version may compute differently, so its outputs are not reused)."""
    return {"service": service, "major_version": str(version).split(".")[0],
            "key": content_key(service, params, inputs)}


def write_manifest(job_dir: Path, outputs: Mapping[str, ArtifactRef], metrics: Mapping[str, Any],
                   identity: Mapping[str, Any] | None = None) -> Path:
    """The last thing a job writes: its outputs with hashes (and the job's identity). Its presence means
    'complete'."""
    payload = {
        "outputs": {k: v.model_dump() for k, v in outputs.items()},
        "metrics": dict(metrics),
        "completed": datetime.now(timezone.utc).isoformat(),
    }
    if identity is not None:
        payload["identity"] = dict(identity)
    # not fsynced: a manifest lost in a crash only means the (idempotent) job runs again
    return atomic_write_json(job_dir / MANIFEST, payload, durable=False)


def load_valid_manifest(volume: Volume, job_dir: Path, identity: Mapping[str, Any] | None = None
                        ) -> dict[str, Any] | None:
    """The manifest of a completed job whose outputs still exist with matching hashes (and, when ``identity`` is
    given, that was computed by the same service major version from the same parameters and inputs), else None."""
    mpath = job_dir / MANIFEST
    if not mpath.is_file():
        return None
    try:
        data = json.loads(mpath.read_text())
        if identity is not None and data.get("identity") != dict(identity):
            return None
        outputs = {k: ArtifactRef(**v) for k, v in data["outputs"].items()}
        for ref in outputs.values():
            volume.open_ref(ref, verify=True)
    except (VolumeError, OSError, ValueError, KeyError, TypeError):
        return None
    data["outputs"] = outputs
    return data


def nexus_data_group(h5file, name: str, signal: str, axes=None, entry: str = "entry"):
    """Create ``/<entry>`` (NXentry) and ``/<entry>/<name>`` (NXdata with ``signal``, optional ``axes``),
    both marked as the file's default so silx and h5web open the data at once; return the NXdata group."""
    h5file.attrs["default"] = entry
    e = h5file.require_group(entry)
    e.attrs["NX_class"] = "NXentry"
    e.attrs["default"] = name
    g = e.create_group(name)
    g.attrs["NX_class"] = "NXdata"
    g.attrs["signal"] = signal
    if axes is not None:
        g.attrs["axes"] = list(axes)
    return g
