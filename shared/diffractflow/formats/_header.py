"""Schema name and integer version of a shared artifact: written once, checked by every reader.

HDF5 artifacts carry the provenance attributes of :func:`diffractflow.artifacts.write_provenance` on the object
that holds the schema (file root, or the accumulator group); this module writes ``schema_version`` as an integer
and reads it back as one. Readers accept the string forms earlier releases wrote for the same version (``"1"``,
``"1.0"``, ...) through each format's ``LEGACY_VERSIONS`` table, and nothing else.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import h5py
import numpy as np

from ..artifacts import write_provenance
from ..errors import InputError


def _text(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.ndarray) and v.shape == ():
        return _text(v[()])
    return str(v)


def write_header(h5obj, *, schema: str, version: int, producer: str, producer_version: str = "0",
                 job_id: str | None = None, parameters: Mapping[str, Any] | None = None,
                 inputs: Mapping[str, str] | None = None) -> None:
    """Provenance attributes on an open h5py File/Group, with ``schema_version`` an integer."""
    write_provenance(h5obj, schema=schema, schema_version=int(version), producer=producer,
                     producer_version=producer_version, job_id=job_id, parameters=parameters, inputs=inputs)
    h5obj.attrs["schema_version"] = np.int64(version)


def parse_version(raw, legacy: Mapping[str, int]) -> int | None:
    """An attribute or JSON value as an integer version: integers as they are, strings through ``legacy``
    (the exact string forms an older writer used for that version); anything else None."""
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw[()]
    if isinstance(raw, (bool, np.bool_)):
        return None
    if isinstance(raw, (int, np.integer)):
        return int(raw)
    s = _text(raw)
    if s is None:
        return None
    return legacy.get(s.strip())


def check_header(path: str | Path, attrs: Mapping[str, Any], *, schema: str, versions: tuple[int, ...],
                 legacy: Mapping[str, int], what: str, hint: str = "") -> int:
    """The integer version of an artifact whose attributes are ``attrs``; InputError naming ``path`` when the
    schema is another one (or missing) or the version is not one this reader knows (``hint``, if given, ends
    that message: what the user can do about it)."""
    got = _text(attrs.get("schema"))
    if got != schema:
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise InputError(f"{path}: not {article} {what} (schema {got!r}, expected {schema!r})")
    raw = attrs.get("schema_version")
    v = parse_version(raw, legacy)
    if v is None or v not in versions:
        raise InputError(f"{path}: {what} schema version {_text(raw)!r} is not supported "
                         f"(this reader knows {schema} versions {list(versions)}){hint}")
    return v


def require(path: str | Path, group, names, what: str) -> None:
    """InputError naming ``path`` unless every name in ``names`` exists in the h5py ``group``."""
    missing = [n for n in names if n not in group]
    if missing:
        where = getattr(group, "name", "/")
        raise InputError(f"{path}: {what} lacks {missing} in {where}")


def open_h5(path: str | Path, what: str) -> h5py.File:
    """``path`` opened read-only; InputError naming it when it is missing or not HDF5 (``what``: the artifact,
    for the message). The caller closes the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: {what} is not a readable HDF5 file ({exc})") from exc


@contextlib.contextmanager
def open_checked(path: str | Path, what: str, check: Callable[[Path, h5py.File], Any]) -> Iterator[h5py.File]:
    """The file open read-only after ``check(path, f)`` (the format's schema, version and layout checks, which
    raise InputError naming the file); closed on exit, also when the check fails."""
    path = Path(path)
    with open_h5(path, what) as f:
        check(path, f)
        yield f
