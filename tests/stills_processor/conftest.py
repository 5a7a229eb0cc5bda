"""Session fixtures for stills-processor: the real thaumatin stills and a synthetic rotation sequence,
each processed ONCE per session through ``stills-processor run`` (DIALS is costly: ~13 s per still)."""
from __future__ import annotations

import bz2
from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
THAUMATIN = SHARED / "data" / "thaumatin_grid"


@dataclass
class RunResult:
    out: Path
    exit_code: int
    stdout: str
    stderr: str
    inputs: list[Path]
    rows: list[dict]

    def row(self, name: str) -> dict:
        return next(r for r in self.rows if r["name"] == name)


def _invoke_run(args: list[str]):
    from typer.testing import CliRunner

    from stills_processor.cli import app

    res = CliRunner().invoke(app, ["run", *args], catch_exceptions=False)
    try:
        stderr = res.stderr
    except ValueError:  # older click: stderr mixed into stdout
        stderr = res.stdout
    return res, stderr


@pytest.fixture(scope="session")
def thaumatin_images(tmp_path_factory) -> list[Path]:
    """The 19 thaumatin stills, decompressed into a temporary directory."""
    if not THAUMATIN.is_dir():
        pytest.skip(f"team data folder {THAUMATIN} is absent (CI always has it)")
    d = tmp_path_factory.mktemp("thaumatin")
    out = []
    for src in sorted(THAUMATIN.glob("thau_3_2_*.cbf.bz2")):
        dst = d / src.name[: -len(".bz2")]
        dst.write_bytes(bz2.decompress(src.read_bytes()))
        out.append(dst)
    assert len(out) == 19
    return out


@pytest.fixture(scope="session")
def thaumatin_run(thaumatin_images, tmp_path_factory) -> RunResult:
    """All 19 stills plus a truncated copy of image 2, through `stills-processor run --nproc 2`."""
    from stills_processor.artifacts import read_summary

    d = thaumatin_images[0].parent
    truncated = d / "truncated_0002.cbf"
    data = thaumatin_images[1].read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 5])  # header intact, pixel data cut short
    inputs = [*thaumatin_images, truncated]
    out = tmp_path_factory.mktemp("thaumatin_out")
    res, stderr = _invoke_run([*map(str, inputs), "--out", str(out), "--space-group", "P41212",
                               "--unit-cell", "57.8,57.8,150,90,90,90", "--nproc", "2"])
    rows = read_summary(out / "summary.h5") if (out / "summary.h5").exists() else []
    return RunResult(out, res.exit_code, res.stdout, stderr, inputs, rows)


@pytest.fixture(scope="session")
def sequence_run(tmp_path_factory) -> tuple[RunResult, object]:
    """A synthetic 8-frame rotation sequence (planted P 41 21 2 crystal) through `stills-processor run`."""
    from stills_processor.artifacts import read_summary
    from stills_processor.synthetic import write_rotation_sequence

    d = tmp_path_factory.mktemp("sequence")
    truth = write_rotation_sequence(d / "frames", n_frames=8, osc_deg=0.5)
    out = d / "out"
    res, stderr = _invoke_run([*map(str, truth.paths), "--out", str(out), "--space-group", "P41212", "--nproc", "1"])
    rows = read_summary(out / "summary.h5") if (out / "summary.h5").exists() else []
    return RunResult(out, res.exit_code, res.stdout, stderr, list(truth.paths), rows), truth
