"""Module-level imports show the dependency graph (issue 19, Layout).

An import may stay inside a function only when it has a reason, and a comment (on its line, on the line
before it, or on the line before the block of imports it opens) says so. The reasons the scan accepts:

* the module is heavy or optional: its top package is in :data:`HEAVY` (DIALS/cctbx, torch, numba,
  matplotlib, prefect, h5py, scipy, the Bluesky/NATS clients...), or it is one of the project's modules that
  imports such a package when it is imported (found by following the module-level imports of the tree), and
  the importing module does not load that package already; so a CLI's ``--help`` or a worker's start does not
  pay for it;
* a real import cycle: the comment says "cycle" (or "circular") and the imported module does import, at
  module level and perhaps through others, the module that holds the function.

An import of a module that the file's own module-level imports already load has no reason either.

Everything else belongs at the top of the module. The scan is static (AST and tokenize, nothing is imported),
so it runs in well under a second.
"""
from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Top-level packages an import of which costs a CLI's --help or a worker's start tens of milliseconds to
# seconds, or that only one optional feature needs.
HEAVY = frozenset({
    "dials", "dxtbx", "cctbx", "iotbx", "scitbx", "mmtbx", "libtbx",  # DIALS/cctbx: 1-3 s
    "torch", "numba", "sklearn", "skimage", "scipy",                   # numerical stacks: 0.2-2 s
    "cupy",                                                            # optional GPU arrays: CUDA init, seconds
    "matplotlib", "PIL", "tifffile", "imageio", "rsciio",              # plotting and image formats
    "h5py", "hdf5plugin",                                              # HDF5 (light CLIs skip it)
    "prefect", "fastapi", "uvicorn", "httpx",                          # orchestration server/client
    "pydantic_settings",                                               # worker settings: 60-90 ms
    "nats", "bluesky", "bluesky_nats", "ophyd", "event_model",         # bus and Bluesky clients
    "xraylib", "xraydb",
})

# Packages of the tree: top-level name -> directory.
PACKAGES = {p.name: p for p in (REPO / "services").iterdir() if (p / "__init__.py").is_file()}
PACKAGES["diffractflow"] = REPO / "shared" / "diffractflow"
PACKAGES["orchestration"] = REPO / "orchestration"

# Files other helpers were rewriting while this rule was brought in (issue 19): not scanned yet. Remove an
# entry once its file follows the rule.
NOT_YET = (
)


def module_name(path: Path) -> str | None:
    """Dotted module name of a file of the tree (None outside the packages)."""
    for top, root in PACKAGES.items():
        try:
            rel = path.relative_to(root)
        except ValueError:
            continue
        parts = [top, *rel.with_suffix("").parts]
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return None


def module_file(name: str) -> Path | None:
    """The file of a dotted module of the tree (None for a module outside it or an attribute)."""
    top, *rest = name.split(".")
    root = PACKAGES.get(top)
    if root is None:
        return None
    base = root.joinpath(*rest)
    for cand in (base / "__init__.py", base.with_suffix(".py")):
        if cand.is_file():
            return cand
    return None


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_names(node: ast.Import | ast.ImportFrom, path: Path) -> list[str]:
    """Absolute dotted names an import statement in ``path`` loads (``from a import b`` gives ``a.b`` when
    ``b`` is a submodule of the tree, else ``a``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        here = module_name(path)
        if here is None:
            return []
        pkg = here.split(".") if _is_package(path) else here.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if module_file(sub) is not None else base)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module):
    """Import statements executed when the module is imported (not in functions, not under TYPE_CHECKING)."""
    stack = list(tree.body)
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            yield n
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(n, ast.If) and _is_type_checking(n.test):
            stack.extend(n.orelse)
        elif isinstance(n, ast.stmt):
            stack.extend(ast.iter_child_nodes(n))
        elif isinstance(n, ast.excepthandler):
            stack.extend(n.body)


@cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@cache
def import_edges(name: str) -> frozenset[str]:
    """Modules (absolute names, parents included) that importing tree module ``name`` imports directly."""
    path = module_file(name)
    if path is None:
        return frozenset()
    out = set()
    for node in _module_level_imports(_parse(path)):
        for target in imported_names(node, path):
            out.update(_with_parents(target))
    out.discard(name)
    return frozenset(out)


def reachable(name: str) -> set[str]:
    """Every module importing ``name`` (and its parent packages) loads, following the tree's module-level
    imports; modules outside the tree are leaves."""
    seen: set[str] = set()
    todo = _with_parents(name)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if m.split(".")[0] in PACKAGES:
            todo.extend(import_edges(m))
    return seen


def heavy_reason(name: str, importer: str | None = None) -> str | None:
    """A heavy package importing ``name`` loads that importing ``importer`` (a tree module) does not already load
    (None if there is none)."""
    already = reachable(importer) if importer is not None else set()
    for m in sorted(reachable(name) - already):
        if m.split(".")[0] in HEAVY:
            return m
    return None


def comment_lines(source: str) -> set[int]:
    """Line numbers (1-based) that carry a comment."""
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            lines.add(tok.start[0])
    return lines


@dataclass
class Finding:
    path: Path
    line: int
    module: str
    why: str

    def __str__(self) -> str:
        where = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{where}:{self.line}: import of {self.module} inside a function: {self.why}"


def _function_import_blocks(tree: ast.Module):
    """(block, import) pairs of the imports inside functions; a block is a run of consecutive import
    statements in one body, whose opening comment covers them all."""
    def bodies(node, in_fn):
        for field in ("body", "orelse", "finalbody", "handlers"):
            seq = getattr(node, field, None)
            if isinstance(seq, list):
                yield seq, in_fn
        if isinstance(node, ast.Match):
            for case in node.cases:
                yield case.body, in_fn

    def walk(node, in_fn):
        for seq, inside in bodies(node, in_fn):
            block: list = []
            for stmt in seq + [None]:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    block.append(stmt)
                    continue
                if block and inside:
                    for imp in block:
                        yield block, imp
                block = []
                if stmt is not None:
                    fn = isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))
                    yield from walk(stmt, inside or fn)

    yield from walk(tree, False)


def scan_file(path: Path) -> list[Finding]:
    """The function-level imports of ``path`` that break the rule, each with the reason."""
    source = path.read_text()
    tree = _parse(path)
    comments = comment_lines(source)
    here = module_name(path)
    found = []
    for block, imp in _function_import_blocks(tree):
        start = block[0].lineno
        commented = bool({imp.lineno, imp.lineno - 1, start, start - 1} & comments)
        loaded = reachable(here) if here is not None else set()
        for target in imported_names(imp, path):
            if target in loaded:
                found.append(Finding(path, imp.lineno, target,
                                     "the module already loads it when it is imported; move it to the top"))
                continue
            if not commented:
                found.append(Finding(path, imp.lineno, target, "no comment says why it is not at the top"))
                continue
            if heavy_reason(target, here) is not None:
                continue
            text = "\n".join(source.splitlines()[max(start - 2, 0): imp.lineno]).lower()
            if ("cycle" in text or "circular" in text) and here is not None and here in reachable(target):
                continue
            found.append(Finding(path, imp.lineno, target,
                                 "neither heavy (it loads nothing in HEAVY that the module does not load "
                                 "already) nor a real import cycle; move it to the top of the module"))
    return found


def scanned_files() -> list[Path]:
    roots = [REPO / "services", REPO / "shared", REPO / "orchestration"]
    files = []
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            rel = p.relative_to(REPO).as_posix()
            if "/.venv/" in rel or rel.startswith(NOT_YET):
                continue
            files.append(p)
    return files


def test_function_level_imports_have_a_reason():
    found = [f for p in scanned_files() for f in scan_file(p)]
    assert not found, "\n" + "\n".join(map(str, found))


def test_scan_flags_a_bare_light_import_and_accepts_reasoned_ones(tmp_path, monkeypatch):
    """The checker itself: planted cases, with the file:line it must report."""
    pkg = tmp_path / "toy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "light.py").write_text("import json\n")
    (pkg / "plots.py").write_text("import matplotlib\n")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text(
        "def f():\n"
        "    from . import a  # cycle: a imports b at module level\n"
        "    return a\n")
    (pkg / "mod.py").write_text(
        "def bare():\n"
        "    import os\n"                                   # line 2: no comment -> flagged
        "    return os\n"
        "\n"
        "def light_with_comment():\n"
        "    # looks reasoned, but json is light\n"
        "    from . import light\n"                         # line 7: commented, not heavy -> flagged
        "    return light\n"
        "\n"
        "def heavy():\n"
        "    # matplotlib (2 s) only for the figure\n"
        "    import torch\n"
        "    from . import plots\n"                         # same block: covered, heavy through matplotlib
        "    return torch, plots\n"
        "\n"
        "def fake_cycle():\n"
        "    from . import light  # cycle (not really: light does not import mod)\n"  # line 17 -> flagged
        "    return light\n")
    monkeypatch.setitem(PACKAGES, "toy", pkg)
    for fn in (import_edges, _parse):
        fn.cache_clear()
    try:
        assert heavy_reason("toy.plots") == "matplotlib"
        assert heavy_reason("toy.light") is None
        assert scan_file(pkg / "b.py") == []
        got = [(f.line, f.module) for f in scan_file(pkg / "mod.py")]
        assert got == [(2, "os"), (7, "toy.light"), (17, "toy.light")]
        assert str(scan_file(pkg / "mod.py")[0]).startswith(f"{pkg / 'mod.py'}:2: import of os")
    finally:
        for fn in (import_edges, _parse):
            fn.cache_clear()


if __name__ == "__main__":  # the list without pytest: python tests/platform/test_import_hygiene.py
    for p in scanned_files():
        for f in scan_file(p):
            print(f)
    sys.exit(0)


# What each CLI's start (and so its --help) must not import: the reason the imports above stay in functions.
CLI_MUST_NOT_LOAD = {
    "orchestration.cli": {"prefect", "torch", "dials", "dxtbx", "matplotlib", "h5py", "ophyd", "bluesky_nats"},
    "stills_processor.cli": {"dials", "dxtbx", "torch", "matplotlib", "prefect"},
    "diff_sim_refiner.cli": {"torch", "h5py", "matplotlib", "dials", "prefect"},
    "stem_polar.cli": {"torch", "h5py", "matplotlib", "tifffile", "dials", "prefect"},
    "diffuse_extractor.cli": {"dials", "dxtbx", "cctbx", "skimage", "torch", "matplotlib", "prefect"},
    "voxel_merger.cli": {"dials", "dxtbx", "torch", "matplotlib", "prefect"},
}


def test_cli_start_stays_light():
    """Import each CLI module in a fresh interpreter and list the heavy packages it loaded."""
    code = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    for mod, banned in CLI_MUST_NOT_LOAD.items():
        out = subprocess.run([sys.executable, "-c", code, mod], capture_output=True, text=True, check=True,
                             timeout=120).stdout.split()
        assert mod.split(".")[0] in out
        assert not banned & set(out), f"{mod} loads {sorted(banned & set(out))} at start"
