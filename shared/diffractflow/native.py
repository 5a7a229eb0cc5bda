"""Build a service's C kernels with the system compiler, once per machine, into a shared cache.

The library is named by a hash of its sources, the compiler flags, the compiler's version and the CPU (model and
flags), so a changed source, compiler or machine builds anew and every process of one machine shares one build.
It is written to a temporary file beside its final name and moved into place, so workers that build at once never
load half a file. The cache is ``$<SERVICE>_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/diffractflow``, else
``~/.cache/diffractflow``, else ``<tmp>/diffractflow-<uid>``: the first of them that is writable.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence


def compiler() -> str | None:
    """The C compiler to use: ``$CC``, else ``cc``, else ``gcc``, if on PATH; None when there is none."""
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            return cc
    return None


def cpu_signature() -> str:
    """The CPU's model names and feature flags (what ``-march=native`` builds for)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({ln for ln in f if ln.startswith(("model name", "flags"))}))
    except OSError:  # pragma: no cover - non-Linux
        return os.uname().machine


def cache_dir(env_var: str, what: str) -> Path:
    """The first writable of the cache locations (module docstring); ``what`` names the kernels in the error."""
    cands = [Path(os.environ[env_var])] if os.environ.get(env_var) else []
    if os.environ.get("XDG_CACHE_HOME"):
        cands.append(Path(os.environ["XDG_CACHE_HOME"]) / "diffractflow")
    cands += [Path.home() / ".cache" / "diffractflow", Path(tempfile.gettempdir()) / f"diffractflow-{os.getuid()}"]
    for d in cands:
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise OSError(f"no writable cache directory for the {what}")


def library_path(cc: str, sources: Sequence[Path], flags: Sequence[str], prefix: str, env_var: str,
                 what: str) -> Path:
    """Where the library of ``sources`` built by ``cc`` with ``flags`` on this CPU lives (built or not)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    h = hashlib.sha256()
    for part in (*(Path(f).read_bytes() for f in sources), " ".join(flags).encode(), version.encode(),
                 cpu_signature().encode()):
        h.update(part)
    return cache_dir(env_var, what) / f"{prefix}_{h.hexdigest()[:16]}.so"


def build_library(sources: Sequence[Path], flags: Sequence[str], prefix: str, env_var: str, what: str) -> Path:
    """Compile ``sources[0]`` (the others are headers it includes) unless already cached; returns the library's
    path, raises RuntimeError when there is no compiler or the build fails (with the compiler's last words)."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    path = library_path(cc, sources, flags, prefix, env_var, what)
    if path.exists():
        return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, str(sources[0]), "-o", tmp, "-lm"], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed on {Path(sources[0]).name}: {r.stderr.strip()[-500:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
