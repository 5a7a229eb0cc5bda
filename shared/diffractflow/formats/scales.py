"""Per-still scales (scaler -> voxel-merger, validation, report): ``scales.json``.

Schema ``diffractflow.scaler.scales``, written as ``{"schema": SCHEMA, "schema_version": 2, "scales": {key: b}}``,
b > 0 the still's multiplicative scale (I_obs ~ b * I_ref). Version 2 keys are still ids (``<image file>#<index>``,
the ids the voxel-merger gives stills), so a merge applies them without the observation table. Version 1 keyed them
by the observation table's integer ``still_id``; reading one needs that table's ``still_names``.

Readers also accept the bare object ``{key: b}`` that earlier releases wrote (old runs on users' disks): its
version is told by its keys (integer-looking keys are version 1).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from ..artifacts import atomic_write_json
from ..errors import InputError
from ._header import parse_version

SCHEMA = "diffractflow.scaler.scales"
VERSION = 2
VERSIONS = (1, 2)
LEGACY_VERSIONS = {"1": 1, "1.0": 1, "2": 2}
WHAT = "scales JSON"


def _is_index(key: str) -> bool:
    return key.lstrip("-").isdigit()


def write_scales(path: str | Path, scales: Mapping[str, float], version: int = VERSION) -> Path:
    """Write the scales atomically in the self-describing form: version 2 {still id: b} (an integer-looking key is
    refused), or version 1 {table index: b} for a table that has no still names (every key an integer)."""
    if version not in VERSIONS:
        raise ValueError(f"{SCHEMA} has versions {list(VERSIONS)}, not {version}")
    keys = [str(k) for k in scales]
    bad = [k for k in keys if _is_index(k) != (version == 1)]
    if bad:
        raise ValueError(f"version-{version} scales must be keyed by "
                         f"{'table index' if version == 1 else 'still id, not table index'}: {bad[:3]}")
    return atomic_write_json(path, {"schema": SCHEMA, "schema_version": int(version),
                                    "scales": {str(k): float(v) for k, v in scales.items()}})


def _load(path: Path) -> tuple[dict, int | None]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read {WHAT} ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object mapping still id -> scale")
    if "schema" in data or "schema_version" in data:
        if data.get("schema") != SCHEMA:
            raise InputError(f"{path}: not a {WHAT} (schema {data.get('schema')!r}, expected {SCHEMA!r})")
        v = parse_version(data.get("schema_version"), LEGACY_VERSIONS)
        if v not in VERSIONS:
            raise InputError(f"{path}: {WHAT} schema version {data.get('schema_version')!r} is not supported "
                             f"(this reader knows {SCHEMA} versions {list(VERSIONS)})")
        if not isinstance(data.get("scales"), dict):
            raise InputError(f"{path}: {WHAT} lacks the 'scales' object")
        return data["scales"], v
    return data, None


def read_scales_raw(path: str | Path) -> dict[str, float]:
    """The keys as written (still ids, or integer table indices for version 1) -> b, checked positive, finite."""
    path = Path(path)
    data, _ = _load(path)
    out = {}
    for k, v in data.items():
        try:
            b = float(v)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: scale for still {k!r} is not a number: {v!r}") from exc
        if not math.isfinite(b) or b <= 0:
            raise InputError(f"{path}: scale for still {k!r} must be positive and finite, got {b}")
        out[str(k)] = b
    return out


def by_still_id(scales: Mapping[str, float], still_names: Sequence[str] | None, source: str = "scales") -> dict[str, float]:
    """Scales keyed by still id: version-2 keys stay; a version-1 integer key k becomes ``still_names[k]``
    (the observation table's names; InputError when they are needed and missing or k is out of range)."""
    names = [str(n) for n in still_names] if still_names is not None else None
    known = set(names or ())
    out = {}
    for key, b in scales.items():
        if key in known or not _is_index(key):
            out[key] = b
        elif names is None:
            raise InputError(f"{source}: scales keyed by table index ({key!r}, version 1): give the observation "
                             "table whose still_names map indices to still ids")
        elif 0 <= int(key) < len(names):
            out[names[int(key)]] = b
        else:
            raise InputError(f"{source}: scale key {key!r} is outside the observation table's {len(names)} stills")
    return out


def read_scales(path: str | Path, still_names: Sequence[str] | None = None) -> dict[str, float]:
    """{still id: b} from a scales file of either version (``still_names`` needed for version 1 only)."""
    return by_still_id(read_scales_raw(path), still_names, str(path))
